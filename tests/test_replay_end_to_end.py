"""`replay` against the real broker and the real Triton with the CPU guard.

Six photo events are judged once by the service (in this process) under the default policy;
then the whole range is replayed under a policy that declares nudity (O4) non-violating, which
the CPU guard honours: the two colour-wheel events, Unsafe in O4 and blocked the first time,
come back Safe in O4 and allowed, and only those two are in the diff. A second test stops a
replay part-way and resumes it with the same run id: every event judged once, all present.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.__main__ import build_parser
from service.adapters.kafka.ranges import topic_ends
from service.app import serve
from service.client import ImageEventProducer, image_event
from service.config import Settings
from service.dev import stack
from service.dev.samples import photo_bytes
from service.replay import REPLAY_HEADER, main
from tests.support.outputs import collect
from tests.support.stack import Topics
from tests.support.waiting import eventually

pytestmark = pytest.mark.stack

PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "camera": "camera.png",
    "color-a": "color.png",  # Unsafe in O4 under the default rules: NudeNet errs on it
    "color-b": "color.png",
}

NUDITY_ALLOWED = """\
id = "nudity-allowed"
version = "0.1.0"
extends = "llavaguard-v1.2"
exceptions = ["O4"]
"""


async def publish(bootstrap: str, topics: Topics, tag: str) -> dict[str, str]:
    """The photo events, keyed by event id; their event ids by name."""
    ids = {name: f"replay-{tag}-{name}" for name in PHOTOS}
    async with ImageEventProducer(bootstrap, topics.input, max_request_size=2_000_000) as out:
        for name, photo in PHOTOS.items():
            await out.send(image_event(ids[name], image=photo_bytes(photo)))
    return ids


async def replay_topic(state: stack.StackState, topics: Topics) -> Topics:
    """The replay verdicts' topics, as a `Topics` whose outputs `collect` reads."""
    replays = dataclasses.replace(
        topics, verdicts=f"{topics.verdicts}.replay", dead_letters=f"{topics.verdicts}.replay.dlq"
    )
    await stack.create_topics(state.bootstrap_servers, [replays.verdicts, replays.dead_letters], 3)
    return replays


def replay_args(out: Path, replays: Topics, *more: str) -> Any:
    return build_parser().parse_args(
        ["replay", "--topic", replays.verdicts, "--out", str(out), "--no-progress", *more]
    )


async def test_a_replay_under_another_policy_names_what_changed(
    embedded_stack: stack.StackState,
    topics: Topics,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = embedded_stack.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    ids = await publish(bootstrap, topics, tag)

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "nudity-allowed.toml").write_text(NUDITY_ALLOWED)
    settings = topics.settings(embedded_stack, policy_dir=policies)
    stop = asyncio.Event()
    service = asyncio.create_task(serve(settings, stop))
    try:
        originals = await collect(bootstrap, topics, len(PHOTOS))
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)
    original = {key.decode(): got[-1][1] for key, got in originals.items()}
    assert original[ids["color-a"]]["action"] == "block"

    replays = await replay_topic(embedded_stack, topics)
    out = tmp_path / "run"
    args = replay_args(out, replays, "--since", since, "--policy", "nudity-allowed", "--rate", "0")
    assert await main(settings, args, asyncio.Event()) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("replay run ")

    replayed = await collect(bootstrap, replays, len(PHOTOS))
    assert sorted(key.decode() for key in replayed) == sorted(ids.values())
    run_id = printed.split()[2]
    for key, got in replayed.items():
        assert len(got) == 1, key  # one replay verdict per event
        topic, verdict, headers = got[0]
        assert topic == replays.verdicts
        assert headers[REPLAY_HEADER] == run_id.encode()
        assert headers["event-id"] == key
        assert verdict["policy_id"] == "nudity-allowed"
        before = original[key.decode()]
        supersedes = verdict["replay"]["supersedes"]
        assert verdict["replay"]["run_id"] == run_id
        assert supersedes["policy_version"] == before["policy_version"]
        assert supersedes["policy_id"] == "llavaguard-v1.2"
        assert supersedes["source"]["topic"] == topics.verdicts

    report = orjson.loads((out / "diff.json").read_bytes())
    changed = sorted([ids["color-a"], ids["color-b"]])
    assert report["events"] == len(PHOTOS)
    assert report["changed"] == 2
    assert sorted(report["examples"]["rating_changed"]) == changed
    assert sorted(report["examples"]["unsafe_to_safe"]) == changed
    assert sorted(report["examples"]["action_changed"]) == changed
    assert report["counts"]["category_changed"] == 0  # Safe, in O4: the exception's answer
    assert report["counts"]["no_original"] == report["counts"]["dead_letters"] == 0
    by_category = {row["category"]: row for row in report["categories"]}
    assert by_category["O4"]["rating_changed"] == 2
    assert by_category["NA"] == {
        "category": "NA",
        "events": 4,
        "rating_changed": 0,
        "category_changed": 0,
        "action_changed": 0,
    }
    assert "<img" in (out / "diff.html").read_text()

    # The same range by offsets: its start in time is found from its first records.
    ends = await topic_ends(settings, topics.input)
    by_offsets = replay_args(
        tmp_path / "by-offsets", replays, "--rate=0", *_offsets(ends), "--policy=nudity-allowed"
    )
    assert await main(settings, by_offsets, asyncio.Event()) == 0
    state = orjson.loads((tmp_path / "by-offsets" / "state.json").read_bytes())
    assert state["since_ms"] is not None
    assert all(row["original"] is not None for row in _rows(tmp_path / "by-offsets"))
    capsys.readouterr()

    # A finished run, asked again, only reports.
    again = replay_args(out, replays, "--run-id", run_id)
    assert await main(settings, again, asyncio.Event()) == 0
    assert capsys.readouterr().out.startswith("6 events replayed, 2 changed")


async def test_a_stopped_replay_resumes_where_it_stopped(
    embedded_stack: stack.StackState, topics: Topics, tmp_path: Path
) -> None:
    bootstrap = embedded_stack.bootstrap_servers
    ids = await publish(bootstrap, topics, uuid.uuid4().hex[:8])
    settings: Settings = topics.settings(embedded_stack)
    replays = await replay_topic(embedded_stack, topics)
    out = tmp_path / "run"
    ends = await topic_ends(settings, settings.input_topic)
    first = replay_args(
        out, replays, "--run-id=resume-1", "--rate=4", "--concurrency=1", *_offsets(ends)
    )

    stop = asyncio.Event()
    running = asyncio.create_task(main(settings, first, stop))
    await eventually(lambda: len(_rows(out)) >= 2, timeout_s=60)
    stop.set()
    assert await running == 130
    done_first = _rows(out)
    assert 2 <= len(done_first) < len(PHOTOS)

    resumed = replay_args(out, replays, "--run-id", "resume-1")
    assert await main(settings, resumed, asyncio.Event()) == 0
    rows = _rows(out)
    places = [(row["partition"], row["offset"]) for row in rows]
    assert len(places) == len(set(places)) == len(PHOTOS)  # none judged twice
    replayed = await collect(bootstrap, replays, len(PHOTOS))
    assert sorted(key.decode() for key in replayed) == sorted(ids.values())
    assert all(len(got) == 1 for got in replayed.values())
    report = orjson.loads((out / "diff.json").read_bytes())
    assert report["counts"]["no_original"] == len(PHOTOS)  # the service never ran here


def _offsets(ends: dict[int, int]) -> list[str]:
    """The whole topic, by offsets."""
    return [f"--offsets={p}:0-{end}" for p, end in ends.items() if end]


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "outcomes.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
