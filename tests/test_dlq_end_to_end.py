"""`dlq redrive` against the real broker and the real Triton with the CPU guard.

Four events name a policy the service does not have: three small JPEGs, and one photo larger
than the service keeps of an original (GUARDSTREAM_DEAD_LETTER_ORIGINAL_BYTES is set below its
size), all with a traceparent and a binary header. The service dead-letters all four as
`unknown_policy`. The fix: the service runs again with a policy directory that has the policy.
Then `dlq redrive --code unknown_policy`: the three small ones are published again with their
original key and headers plus the redrive stamp, and each now gets a verdict with the same event
id, in the upload's trace; the photo is refused (its original was cut). A second redrive
publishes nothing (already redriven), `--again` publishes again, `--dry-run` publishes nothing,
and an empty range says so.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from service.__main__ import build_parser
from service.adapters.kafka.ranges import bounded_read, topic_ends
from service.app import serve
from service.client import encode_event, image_event
from service.config import Settings
from service.core.dead_letters import REDRIVE_HEADER
from service.core.replay_range import Span
from service.dev import stack
from service.dev.samples import photo_bytes
from service.dlq import list_dead_letters, show_dead_letters
from service.dlq_redrive import redrive
from tests.support.outputs import collect
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

POLICY = "redrive-fixed"
FIXED = f'id = "{POLICY}"\nversion = "1.0.0"\nextends = "llavaguard-v1.2"\n'
KEPT_BYTES = 20_000
"""The service keeps this much of an original: the small events fit, the photo does not."""


def jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(out, "JPEG")
    return out.getvalue()


def traceparent(n: int) -> bytes:
    return f"00-{n:032x}-{n:016x}-01".encode()


async def publish(bootstrap: str, topic: str, tag: str) -> dict[str, list[tuple[str, bytes]]]:
    """The four events, keyed by event id; each one's headers by id."""
    images = {
        f"dlq-{tag}-red": jpeg((200, 30, 30)),
        f"dlq-{tag}-green": jpeg((30, 200, 30)),
        f"dlq-{tag}-blue": jpeg((30, 30, 200)),
        f"dlq-{tag}-photo": photo_bytes("rocket.jpg"),  # ~110 KB: cut in its dead letter
    }
    sent = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2**21)
    await producer.start()
    try:
        for n, (event_id, image) in enumerate(images.items(), start=1):
            headers = [
                ("traceparent", traceparent(n)),
                ("event-id", event_id.encode()),
                ("x-upload-digest", b"\xff\x00" + bytes([n])),  # not UTF-8: kept as base64
            ]
            value = encode_event(image_event(event_id, image=image, policy_id=POLICY))
            await producer.send_and_wait(topic, value, key=event_id.encode(), headers=headers)
            sent[event_id] = headers
    finally:
        await producer.stop()
    return sent


async def judge(settings: Settings, until: Any) -> None:
    """Run the service until `until()` returns."""
    stop = asyncio.Event()
    service = asyncio.create_task(serve(settings, stop))
    try:
        await until()
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)


async def input_records(settings: Settings, since: dict[int, int]) -> list[Any]:
    """The input topic's records after `since` (its ends earlier)."""
    ends = await topic_ends(settings, settings.input_topic)
    spans = [Span(p, since.get(p, 0), end) for p, end in ends.items() if end > since.get(p, 0)]
    async with bounded_read(settings, settings.input_topic, spans) as bounded:
        return [record async for record in bounded.records]


def args(topics: Topics, *argv: str) -> Any:
    return build_parser().parse_args(
        ["dlq", "redrive", "--no-progress", "--rate", "0", "--topic", topics.dead_letters, *argv]
    )


async def test_dead_letters_redriven_after_a_fix_get_verdicts_once(
    embedded_stack: stack.StackState,
    topics: Topics,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = embedded_stack.bootstrap_servers
    sent = await publish(bootstrap, topics.input, uuid.uuid4().hex[:8])
    ids = sorted(sent)
    photo = next(event_id for event_id in ids if event_id.endswith("-photo"))
    small = [event_id for event_id in ids if event_id != photo]

    broken = topics.settings(embedded_stack, dead_letter_original_bytes=KEPT_BYTES)
    await judge(broken, lambda: collect(bootstrap, topics, len(ids), timeout_s=60))
    fixed_rules = tmp_path / "policies"
    fixed_rules.mkdir()
    (fixed_rules / f"{POLICY}.toml").write_text(FIXED)
    fixed = topics.settings(embedded_stack, policy_dir=fixed_rules)
    before = await topic_ends(fixed, topics.input)

    async def redrive_and_wait() -> None:
        assert (
            await redrive(fixed, args(topics, "--code", "unknown_policy", "--dry-run"), stop) == 0
        )
        dry = capsys.readouterr().out
        assert sum(line.startswith("would redrive ") for line in dry.splitlines()) == len(small)
        assert await topic_ends(fixed, topics.input) == before  # nothing published
        assert await redrive(fixed, args(topics, "--code", "unknown_policy"), stop) == 0
        await collect(bootstrap, topics, len(ids) + len(small), timeout_s=60)

    stop = asyncio.Event()  # never set: the redrives run to their end
    await judge(fixed, redrive_and_wait)
    out = capsys.readouterr().out
    assert f"created the ledger topic {topics.dead_letters}.redriven (compacted" in out
    assert sum(line.startswith("redriven ") for line in out.splitlines()) == len(small)
    refused = [line for line in out.splitlines() if line.startswith("refused ")]
    assert len(refused) == 1
    assert f"event {photo} (unknown_policy): original cut at {KEPT_BYTES} of " in refused[0]
    assert "ask the producer to send it again" in refused[0]
    assert out.splitlines()[-1].endswith(
        f"redriven {len(small)}, already redriven 0 (skipped), refused 1: truncated 1"
    )

    # Each event now has its dead letter and a verdict with the same event id, in its trace.
    outcomes = await collect(bootstrap, topics, len(ids) + len(small), timeout_s=10)
    for n, event_id in enumerate(sent, start=1):
        got = outcomes[event_id.encode()]
        verdicts = [value for topic, value, _ in got if topic == topics.verdicts]
        assert len(verdicts) == (0 if event_id == photo else 1), event_id
        for verdict in verdicts:
            assert verdict["event_id"] == event_id
            assert verdict["policy_id"] == POLICY
            assert verdict["trace_id"] == f"{n:032x}"  # the upload's, from its traceparent

    # The redriven records: original key and headers, one redrive stamp naming the dead letter.
    records = await input_records(fixed, before)
    assert sorted(record.key.decode() for record in records) == small
    run_ids = set()
    for record in records:
        headers = list(record.headers)
        assert headers[:3] == sent[record.key.decode()]
        assert [key for key, _ in headers].count(REDRIVE_HEADER) == 1
        stamp = orjson.loads(headers[3][1])
        assert stamp["code"] == "unknown_policy"
        assert stamp["from"].startswith(f"{topics.dead_letters}:")
        run_ids.add(stamp["run_id"])
    assert len(run_ids) == 1

    # Twice: nothing published. --again: published again. An empty range: said so.
    ends = await topic_ends(fixed, topics.input)
    assert await redrive(fixed, args(topics, "--code", "unknown_policy"), stop) == 1
    second = capsys.readouterr().out
    assert second.count("already redriven by run") == len(small)
    assert await topic_ends(fixed, topics.input) == ends
    assert await redrive(fixed, args(topics, "--event-id", small[0], "--again"), stop) == 0
    assert [r.key.decode() for r in await input_records(fixed, before)].count(small[0]) == 2
    capsys.readouterr()
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%MZ")
    assert await redrive(fixed, args(topics, "--since", later), stop) == 1
    assert capsys.readouterr().out.strip() == (
        f"no dead letters in {topics.dead_letters} match between {later} and the end: "
        "nothing to redrive"
    )

    # list and show see the same: four dead letters, three of them redriven.
    parse = build_parser().parse_args
    listing = parse(["dlq", "list", "--json", "--topic", topics.dead_letters])
    assert await list_dead_letters(fixed, listing) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert (listed["dead_letters"], listed["redriven"]) == (len(ids), len(small))
    assert (
        await show_dead_letters(
            fixed, parse(["dlq", "show", small[0], "--topic", topics.dead_letters])
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "(find the trace by this id in your tracing backend)" in shown
    assert shown.count(" run ") == 2  # its redrives: the first, then --again
