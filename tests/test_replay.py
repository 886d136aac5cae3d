"""The replay's rules without a broker: its range and the errors that refuse one, the pacing under
a virtual clock, the resume point that advances only past a partition's finished prefix, the
marks on a replay verdict, and the diff against hand-made originals."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.__main__ import build_parser
from service.adapters.kafka.ranges import read_range
from service.config import Settings
from service.core.pacing import Pacer
from service.core.replay_diff import (
    Compared,
    Original,
    Replayed,
    diff,
    original_from,
    summary_lines,
    superseding,
)
from service.core.replay_range import (
    ReplayRangeError,
    Span,
    TimeRange,
    check_spans,
    parse_offsets,
    range_request,
    spans_between,
)
from service.core.verdicts import DeadLetter, Source, Verdict
from service.replay import main
from service.replay_run import ReplayState, Run
from tests.support.pipeline import SAFE, ScriptedGuard, event_record, judge

# --- the range ------------------------------------------------------------------------------


def test_offsets_are_parsed_per_partition_end_exclusive() -> None:
    assert parse_offsets(["1:5-9", " 0:100-250 "]) == [Span(0, 100, 250), Span(1, 5, 9)]
    assert Span(0, 100, 250).records == 150
    assert Span(0, 100, 250).holds(100)
    assert not Span(0, 100, 250).holds(250)


@pytest.mark.parametrize(
    ("since", "until", "offsets", "message"),
    [
        ("2026-12-07T10:00Z", "2026-12-07T10:00Z", [], "is not before --until"),
        ("2026-12-07T11:00Z", "2026-12-07T10:00Z", [], "is not before --until"),
        ("yesterday", None, [], "--since 'yesterday': not an ISO 8601 timestamp"),
        ("2026-12-07", "13 o'clock", [], '--until "13 o\'clock": not an ISO 8601'),
        (None, None, ["0:9-9"], "FIRST must be below END"),
        (None, None, ["0:10-9"], "FIRST must be below END"),
        (None, None, ["0:1-9", "0:3-4"], "partition 0 is named twice"),
        (None, None, ["zero:1-9"], "expected P:FIRST-END"),
        ("2026-12-07", None, ["0:1-9"], "not both"),
        (None, None, [], "give the range"),
    ],
)
def test_a_bad_request_is_refused(
    since: str | None, until: str | None, offsets: list[str], message: str
) -> None:
    with pytest.raises(ReplayRangeError, match=message.replace("(", r"\(")):
        range_request(since, until, offsets)


def test_timestamps_without_a_zone_are_utc() -> None:
    assert range_request("2026-12-07T10:00", None, []) == range_request(
        "2026-12-07T10:00+00:00", None, []
    )
    assert range_request("2026-12-07T10:00Z", "2026-12-07T11:30+01:00", []) == TimeRange(
        1_796_637_600_000, 1_796_639_400_000
    )
    with pytest.raises(ReplayRangeError, match="not before"):  # 11:00+01:00 is 10:00Z
        range_request("2026-12-07T10:00Z", "2026-12-07T11:00+01:00", [])


BEGINNINGS, ENDS = {0: 0, 1: 10, 2: 0}, {0: 50, 1: 20, 2: 0}


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([Span(3, 0, 1)], r"images has no partition 3 \(partitions: 0, 1, 2\)"),
        ([Span(1, 5, 15)], r"offsets 1:5-15 are outside images\[1\]'s offsets 10-20"),
        ([Span(0, 10, 51)], r"outside images\[0\]'s offsets 0-50"),
        ([Span(2, 0, 0)], "the range holds no records of images"),
    ],
)
def test_spans_must_lie_inside_the_topic(spans: list[Span], message: str) -> None:
    with pytest.raises(ReplayRangeError, match=message):
        check_spans("images", spans, BEGINNINGS, ENDS)


def test_spans_found_by_time_drop_empty_partitions() -> None:
    spans = spans_between({0: 3, 1: 20, 2: 0}, {0: 40, 1: 20, 2: 0})
    assert check_spans("images", spans, BEGINNINGS, ENDS) == [Span(0, 3, 40)]


async def test_a_bad_range_is_one_line_and_exit_2_before_any_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        [
            "replay",
            "--since",
            "2026-12-07T10:00Z",
            "--until",
            "2026-12-07T09:00Z",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    settings = Settings(bootstrap_servers="127.0.0.1:1")  # nothing listens: never reached
    assert await main(settings, args, asyncio.Event()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("replay: --since")
    assert not (tmp_path / "run").exists()


async def test_an_unknown_policy_is_refused_before_any_broker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["replay", "--offsets", "0:0-5", "--policy", "no-such"])
    assert await main(Settings(bootstrap_servers="127.0.0.1:1"), args, asyncio.Event()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no-such" in err


@pytest.mark.parametrize(
    ("state_json", "more", "message"),
    [
        (None, ["--rate", "-1"], r"--rate must be 0 \(no limit\) or more"),
        (None, ["--concurrency", "0"], "--concurrency at least 1"),
        ("{}", ["--run-id", "r1"], r"state.json: not a replay state: Field required"),
        ("OTHER", [], "holds run r1: resume it with --run-id r1, or give another --out"),
        ("OTHER", ["--run-id", "r2"], "holds run r1: resume it with --run-id r1"),
        ("NONE", [], "outcomes.jsonl exists without a state.json"),
    ],
)
async def test_an_out_that_is_not_this_run_is_refused(
    state_json: str | None,
    more: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if state_json == "OTHER":
        Run(tmp_path, state()).save()
    elif state_json == "NONE":
        (tmp_path / "outcomes.jsonl").write_text("")
    elif state_json is not None:
        (tmp_path / "state.json").write_text(state_json)
    argv = ["replay", "--offsets", "0:0-5", "--out", str(tmp_path), *more]
    args = build_parser().parse_args(argv)
    assert await main(Settings(bootstrap_servers="127.0.0.1:1"), args, asyncio.Event()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err


class RangeConsumer:
    """A consumer of one topic scripted with its records: fetches up to 2 of a partition a poll,
    and keeps going past the end as a live topic does."""

    def __init__(self, logs: dict[int, list[int]]) -> None:
        self.logs = logs  # partition -> offsets of its records
        self.positions: dict[int, int] = {}
        self.paused: set[int] = set()

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = {tp.partition: 0 for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp.partition] = offset

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp.partition)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp.partition]

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        batches = {}
        for tp in partitions:
            assert tp.partition not in self.paused
            ahead = [o for o in self.logs[tp.partition] if o >= self.positions[tp.partition]][:2]
            if ahead:
                self.positions[tp.partition] = ahead[-1] + 1
                batches[tp] = [_record(tp, offset) for offset in ahead]
        return batches


def _record(tp: TopicPartition, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, b"{}", None, 0, 2, ())


async def test_a_range_is_read_to_its_end_and_no_further() -> None:
    # Partition 0 has gaps (compaction); partition 1 grows past the end fixed at the start.
    fake = RangeConsumer({0: [3, 4, 7, 9, 12], 1: list(range(10))})
    read = read_range(cast(AIOKafkaConsumer, fake), "images", {0: (4, 10), 1: (2, 5), 2: (0, 0)})
    got = [(m.partition, m.offset) async for m in read]
    assert sorted(got) == [(0, 4), (0, 7), (0, 9), (1, 2), (1, 3), (1, 4)]
    assert fake.paused == {0, 1}
    assert 2 not in fake.positions  # an empty span is not even assigned


# --- pacing ---------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.looptime(end=600)
async def test_the_pacer_spreads_starts_at_the_rate() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(4.0)
    starts: list[float] = []

    async def one() -> None:
        await pacer.wait()
        starts.append(loop.time())

    await asyncio.gather(*(one() for _ in range(5)))  # all waiting at once
    assert starts == [0.0, 0.25, 0.5, 0.75, 1.0]
    await asyncio.sleep(10)  # idle: no burst saved up
    await one()
    await one()
    assert starts[-2:] == [11.0, 11.25]


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.looptime(end=600)
async def test_without_a_rate_nothing_waits() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(None)
    for _ in range(100):
        await pacer.wait()
    assert loop.time() == 0.0
    with pytest.raises(ValueError, match="positive"):
        Pacer(0)


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.looptime(end=600)
async def test_a_stop_cuts_a_slow_pacers_wait_short() -> None:
    loop = asyncio.get_running_loop()
    pacer, stop = Pacer(0.01), asyncio.Event()  # one start every 100 s
    await pacer.wait_unless(stop)  # the first slot is now
    loop.call_later(3, stop.set)
    await pacer.wait_unless(stop)
    assert loop.time() == 3.0
    await pacer.wait_unless(stop)  # stopped: no wait at all
    assert loop.time() == 3.0


# --- resuming -------------------------------------------------------------------------------


def state(**changes: object) -> ReplayState:
    values: dict[str, object] = {
        "run_id": "r1",
        "input_topic": "images",
        "topic": "verdicts.replay",
        "policy": None,
        "model": None,
        "spans": [Span(0, 10, 20), Span(1, 0, 5)],
        "next": {0: 10, 1: 0},
    }
    return ReplayState.model_validate(values | changes)


def row(partition: int, offset: int, judged: Compared | None = None, **fields: object) -> Replayed:
    values: dict[str, object] = {
        "partition": partition,
        "offset": offset,
        "event_id": f"e{partition}-{offset}",
        "judged": judged,
        "original": None,
    }
    return Replayed.model_validate(values | fields)


def test_progress_advances_only_past_the_finished_prefix(tmp_path: Path) -> None:
    run = Run(tmp_path, state())
    # Offsets need not be contiguous (compaction, transaction markers): 13 follows 11.
    for offset in (10, 11, 13, 14):
        run.take(0, offset)
    with (tmp_path / "outcomes.jsonl").open("a") as outcomes:
        run.finish(row(0, 11), outcomes)
        run.finish(row(0, 14), outcomes)
        assert Run.load(tmp_path).state.next == {0: 10, 1: 0}  # type: ignore[union-attr]
        run.finish(row(0, 10), outcomes)
        assert Run.load(tmp_path).state.next[0] == 12  # type: ignore[union-attr]
        run.finish(row(0, 13), outcomes)
    resumed = Run.load(tmp_path)
    assert resumed is not None
    assert resumed.state.next[0] == 15
    assert resumed.state.remaining() == [Span(0, 15, 20), Span(1, 0, 5)]
    assert (resumed.state.total, resumed.state.done) == (15, 5)
    assert [(r.partition, r.offset) for r in resumed.rows()] == [(0, 11), (0, 14), (0, 10), (0, 13)]


def test_a_new_run_with_a_bad_state_file_is_not_taken_for_another(tmp_path: Path) -> None:
    assert Run.load(tmp_path) is None


# --- the replay verdict ---------------------------------------------------------------------


async def verdict() -> Verdict:
    outcome = await judge(ScriptedGuard(SAFE), event_record())
    assert isinstance(outcome, Verdict)
    return outcome


ORIGINAL = Original(
    event_id="ev-1",
    rating="Unsafe",
    category_code="O4",
    category="O4: Nudity Content",
    action="block",
    policy_id="llavaguard-v1.2",
    policy_version="1.2.1+abc",
    at=Source(topic="verdicts", partition=1, offset=7),
)


async def test_a_replay_verdict_names_the_verdict_it_supersedes() -> None:
    reviewed = (await verdict()).model_copy(update={"review": True, "action": "review"})
    marked = superseding(reviewed, "r1", ORIGINAL)
    assert isinstance(marked, Verdict)
    assert marked.replay is not None
    assert marked.replay.run_id == "r1"
    assert (marked.action, marked.review) == ("review", False)  # no replay goes to reviewers
    supersedes = marked.replay.supersedes
    assert (supersedes.event_id, supersedes.policy_id, supersedes.policy_version) == (
        "ev-1",
        "llavaguard-v1.2",
        "1.2.1+abc",
    )
    assert supersedes.source == ORIGINAL.at
    alone = superseding(await verdict(), "r1", None)
    assert isinstance(alone, Verdict)
    assert alone.replay is not None
    assert alone.replay.supersedes.policy_version is None
    assert alone.replay.supersedes.event_id == "ev-1"


async def test_the_originals_are_verdicts_not_replays() -> None:
    document = (await verdict()).model_dump(mode="json")
    found = original_from(document, ORIGINAL.at)
    assert found is not None
    assert found.rating == "Safe"
    assert found.at == ORIGINAL.at
    replayed = superseding(await verdict(), "r0", None).model_dump(mode="json")
    assert original_from(replayed, ORIGINAL.at) is None
    assert original_from({"error": {"code": "invalid_json"}}, ORIGINAL.at) is None


async def test_a_row_records_a_dead_letter_by_its_code() -> None:
    outcome = await judge(ScriptedGuard(SAFE), event_record(policy_id="no-such"))
    assert isinstance(outcome, DeadLetter)
    assert Replayed.of(outcome, None).dead_letter == "unknown_policy"


# --- the diff -------------------------------------------------------------------------------

SAFE_NA = Compared(rating="Safe", category_code="NA", category="NA: None applying", action="allow")
UNSAFE_O4 = Compared(rating="Unsafe", category_code="O4", category="O4: Nudity", action="block")
SAFE_O4 = Compared(rating="Safe", category_code="O4", category="O4: Nudity", action="allow")


def original(judged: Compared) -> dict[str, object]:
    return ORIGINAL.model_copy(update=judged.model_dump()).model_dump()


def test_the_diff_counts_changes_per_original_category() -> None:
    rows = [
        row(0, 1, UNSAFE_O4, original=original(UNSAFE_O4)),  # unchanged
        row(0, 2, SAFE_O4, original=original(UNSAFE_O4)),  # rating and action
        row(0, 3, UNSAFE_O4, original=original(SAFE_NA)),  # all three
        row(0, 4, SAFE_NA, original=original(SAFE_NA)),  # unchanged
        row(1, 1, SAFE_NA),  # no original
        row(1, 2, None, dead_letter="invalid_json", event_id=None, original=original(SAFE_NA)),
        row(0, 2, SAFE_NA, original=original(UNSAFE_O4)),  # judged again: this row wins
    ]
    result = diff(rows)
    assert (result.events, result.changed) == (6, 2)
    assert result.counts == {
        "rating_changed": 2,
        "category_changed": 2,
        "action_changed": 2,
        "safe_to_unsafe": 1,
        "unsafe_to_safe": 1,
        "no_original": 1,
        "dead_letters": 1,
    }
    assert result.examples["rating_changed"] == ["e0-2", "e0-3"]
    assert result.examples["category_changed"] == ["e0-2", "e0-3"]
    assert result.examples["safe_to_unsafe"] == ["e0-3"]
    assert result.examples["dead_letters"] == ["1@2"]
    rows_by_category = {r.category: r.model_dump() for r in result.categories}
    assert rows_by_category == {
        "(no original)": {
            "category": "(no original)",
            "events": 1,
            "rating_changed": 0,
            "category_changed": 0,
            "action_changed": 0,
        },
        "NA": {
            "category": "NA",
            "events": 3,
            "rating_changed": 1,
            "category_changed": 1,
            "action_changed": 1,
        },
        "O4": {
            "category": "O4",
            "events": 2,
            "rating_changed": 1,
            "category_changed": 1,
            "action_changed": 1,
        },
    }
    lines = summary_lines(result)
    assert lines[0].startswith("6 events replayed, 2 changed: rating 2 (Safe→Unsafe 1")
    assert "dead letters: 1@2" in lines


def test_examples_are_bounded() -> None:
    rows = [row(0, i, SAFE_NA, original=original(UNSAFE_O4)) for i in range(25)]
    result = diff(rows)
    assert result.counts["rating_changed"] == 25
    assert len(result.examples["rating_changed"]) == 10


def test_replay_arguments_parse() -> None:
    args = build_parser().parse_args(["replay", "--offsets", "0:1-5", "--offsets", "2:0-3"])
    assert isinstance(args, argparse.Namespace)
    assert args.offsets == ["0:1-5", "2:0-3"]
    assert args.rate == 20.0
    assert args.topic is None  # verdicts.replay for a new run; a resumed run keeps its own
