"""`python -m service dlq` without a broker: which dead letters a redrive takes, the record it
restores from each (value, key, headers, the redrive stamp), every refusal and its reason, the
ledger that keeps a second redrive from publishing an event twice, the order of publishing and
recording, Ctrl-C, the summary and exit codes, and what `list` and `show` print.

The dead letters are made by the pipeline's own functions (`keep_original`, `describe_headers`),
so what is restored is what the service keeps. The Kafka side is replaced by fakes at the
adapter functions `service.dlq_redrive` calls; the real broker is in test_dlq_end_to_end.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from service import dlq, dlq_redrive
from service.__main__ import build_parser
from service.adapters.kafka.ranges import Bounded
from service.config import Settings
from service.core.dead_letters import (
    REDRIVE_HEADER,
    Ledger,
    LedgerEntry,
    Letter,
    Planner,
    Refusal,
    Restored,
    Selection,
    SelectionError,
    coordinates,
    ledger_record,
    letter_from,
    selection_from,
)
from service.core.dlq_report import Listing, Tally, fault_of, preview, show_lines
from service.core.errors import DEAD_LETTER_CODES
from service.core.pacing import Pacer
from service.core.replay_range import (
    ReplayRangeError,
    Span,
    TimeRange,
    check_spans,
    range_request,
    range_words,
)
from service.core.verdicts import (
    DeadLetter,
    DeadLetterError,
    Source,
    describe_headers,
    keep_original,
    serialize,
)
from service.dlq_redrive import RedriveFailed, Redriver

NOW = datetime(2026, 12, 8, 9, 30, tzinfo=UTC)
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
EVENT = b'{"event_id": "e1", "image": {"data": "' + b"QUJD" * 100 + b'"}, "policy_id": "p"}'
HEADERS = [("traceparent", TRACEPARENT), ("event-id", b"e1"), ("x-bin", b"\xff\x00\x81")]
TOPICS = frozenset({"images", "images.dlq", "verdicts"})


def dead_letter(
    event_id: str | None = "e1",
    *,
    code: str = "unknown_policy",
    value: bytes | None = EVENT,
    headers: list[tuple[str, bytes]] = HEADERS,
    limit: int = 65_536,
    source: tuple[str, int, int] = ("images", 2, 41),
    failed_at: datetime = NOW,
) -> DeadLetter:
    """A dead letter as the pipeline makes one (`service.core.pipeline._dead_letter`)."""
    original, size, truncated = keep_original(value, limit)
    return DeadLetter(
        event_id=event_id,
        error=DeadLetterError(code=code, message=f"policy 'p' is not loaded ({code})"),
        source=Source(topic=source[0], partition=source[1], offset=source[2]),
        original=original,
        original_size=size,
        original_truncated=truncated,
        original_headers=describe_headers(headers),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        failed_at=failed_at,
    )


DEFAULT = serialize(dead_letter())


def letter(
    made: DeadLetter | bytes | None = DEFAULT, offset: int = 17, key: bytes | None = b"e1"
) -> Letter:
    value = serialize(made) if isinstance(made, DeadLetter) else made
    at = Source(topic="images.dlq", partition=0, offset=offset)
    return letter_from(at, key, value, int(NOW.timestamp() * 1000))


def planner(ledger: Ledger | None = None, **options: Any) -> Planner:
    return Planner(ledger or Ledger(), TOPICS, "run-1", **options)


# --- reading the dead-letter topic ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "no value (a tombstone)"),
        (b"\x89 not json {", "not JSON"),
        (b'{"event_id": "e1"}', "not a guardstream dead letter (error: Field required)"),
        (
            serialize(dead_letter()).replace(b"unknown_policy", b"new_code"),
            "not a guardstream dead letter (error.code: Value error, 'new_code' is not a "
            "dead-letter code)",
        ),
    ],
)
def test_a_record_that_is_not_a_dead_letter_says_why(value: bytes | None, why: str) -> None:
    read = letter(value, key=b"k")
    assert read.dead_letter is None
    assert read.unreadable == why
    assert read.event_id == "k"  # the key stands in for the id
    assert planner().plan(read, NOW) == Refusal(read, "not_a_dead_letter", why)


# --- restoring ------------------------------------------------------------------------------


def test_the_restored_record_is_the_original_value_key_and_headers_plus_the_stamp() -> None:
    restored = planner().plan(letter(), NOW)
    assert isinstance(restored, Restored)
    assert (restored.topic, restored.key, restored.value) == ("images", b"e1", EVENT)
    # Text and binary headers come back as they were, in order: the event id and the
    # traceparent are the original's, so the redriven event joins the upload's trace.
    assert restored.headers[:3] == HEADERS
    name, stamp = restored.headers[3]
    assert name == REDRIVE_HEADER
    assert orjson.loads(stamp) == {
        "from": "images.dlq:0:17",
        "code": "unknown_policy",
        "run_id": "run-1",
        "at": "2026-12-08T09:30:00.000Z",
    }
    assert b" " not in stamp  # compact


def test_an_earlier_redrive_stamp_is_replaced_not_stacked() -> None:
    # The redriven record failed again: its dead letter keeps the first redrive's stamp.
    old = (REDRIVE_HEADER, b'{"from": "images.dlq:0:3", "run_id": "run-0"}')
    again = dead_letter(headers=[*HEADERS[:2], old, HEADERS[2]], source=("images", 1, 80))
    restored = planner().plan(letter(again, offset=90), NOW)
    assert isinstance(restored, Restored)
    stamps = [value for key, value in restored.headers if key == REDRIVE_HEADER]
    assert len(stamps) == 1
    assert orjson.loads(stamps[0])["from"] == "images.dlq:0:90"
    assert [key for key, _ in restored.headers] == [
        "traceparent",
        "event-id",
        "x-bin",
        REDRIVE_HEADER,
    ]


def test_to_names_another_topic_and_a_record_without_a_key_stays_without() -> None:
    restored = planner(to="verdicts").plan(letter(key=None), NOW)
    assert isinstance(restored, Restored)
    assert (restored.topic, restored.key) == ("verdicts", None)


def _damaged_header() -> bytes:
    made = orjson.loads(serialize(dead_letter()))
    made["original_headers"][2]["value_base64"] = "@@"
    return orjson.dumps(made)


def _damaged_original() -> bytes:
    made = orjson.loads(serialize(dead_letter()))
    made["original"] = "not base64!"
    return orjson.dumps(made)


def _shorter_original() -> bytes:
    made = orjson.loads(serialize(dead_letter()))
    made["original_size"] += 5
    return orjson.dumps(made)


@pytest.mark.parametrize(
    ("made", "reason", "message"),
    [
        (
            dead_letter(limit=100),
            "truncated",
            f"original cut at 100 of {len(EVENT)} bytes by GUARDSTREAM_DEAD_LETTER_ORIGINAL_BYTES: "
            "cannot be restored; ask the producer to send it again",
        ),
        (dead_letter(value=None), "no_original", "the original record had no value"),
        (_damaged_original(), "bad_original", "original is not base64, the dead letter says"),
        (_shorter_original(), "bad_original", f"original is {len(EVENT)} bytes, the dead letter"),
        (_damaged_header(), "bad_original", "an original header's base64 is damaged"),
        (
            dead_letter(source=("uploads", 0, 1)),
            "no_such_topic",
            "topic 'uploads' does not exist (the broker would create it on a first write)",
        ),
    ],
)
def test_what_cannot_be_restored_is_refused_with_the_reason(
    made: DeadLetter | bytes, reason: str, message: str
) -> None:
    refused = planner().plan(letter(made), NOW)
    assert isinstance(refused, Refusal)
    assert (refused.reason, refused.skipped) == (reason, False)
    assert refused.message.startswith(message)


def test_a_target_topic_named_by_to_must_exist_too() -> None:
    refused = planner(to="images.v2").plan(letter(), NOW)
    assert isinstance(refused, Refusal)
    assert refused.reason == "no_such_topic"


# --- the ledger -----------------------------------------------------------------------------


def entry_for(restored: Restored, offset: int = 7, run_id: str = "run-1") -> tuple[bytes, bytes]:
    return ledger_record(restored, Source(topic="images", partition=2, offset=offset), run_id, NOW)


def test_a_redriven_dead_letter_is_skipped_the_second_time_unless_again() -> None:
    ledger = Ledger()
    first = planner(ledger).plan(letter(), NOW)
    assert isinstance(first, Restored)
    key, value = entry_for(first)
    assert key == b"images.dlq:0:17"
    assert orjson.loads(value) == {
        "dead_letter": {"topic": "images.dlq", "partition": 0, "offset": 17},
        "source": {"topic": "images", "partition": 2, "offset": 41},
        "event_id": "e1",
        "code": "unknown_policy",
        "to": {"topic": "images", "partition": 2, "offset": 7},
        "run_id": "run-1",
        "at": "2026-12-08T09:30:00Z",
    }
    assert ledger.apply(key, value, "images.dlq.redriven[0]@0")

    second = planner(ledger).plan(letter(), NOW)
    assert isinstance(second, Refusal)
    assert (second.reason, second.skipped) == ("already_redriven", True)
    assert second.message == (
        "already redriven by run run-1 at 2026-12-08T09:30:00.000Z from images.dlq:0:17 to "
        "images:2:7 (--again to redrive it again)"
    )
    assert isinstance(planner(ledger, again=True).plan(letter(), NOW), Restored)


def test_another_dead_letter_of_a_redriven_input_record_is_skipped_too() -> None:
    # At-least-once delivery dead-lettered input record images:2:41 twice (offsets 17, 18).
    ledger = Ledger()
    run = planner(ledger)
    first = run.plan(letter(offset=17), NOW)
    assert isinstance(first, Restored)
    repeat = run.plan(letter(offset=18), NOW)
    assert isinstance(repeat, Refusal)
    assert (repeat.reason, repeat.skipped) == ("duplicate", True)
    assert "input record images:2:41: redriven once, from images.dlq:0:17" in repeat.message
    # ... also in a later run, by the input record the ledger names; --again still once a run.
    ledger.apply(*entry_for(first), "")
    later = planner(ledger).plan(letter(offset=18), NOW)
    assert isinstance(later, Refusal)
    assert later.reason == "already_redriven"
    again = planner(ledger, again=True)
    assert isinstance(again.plan(letter(offset=17), NOW), Restored)
    assert getattr(again.plan(letter(offset=18), NOW), "reason", None) == "duplicate"


def test_the_ledger_keeps_every_redrive_forgets_on_a_tombstone_and_counts_junk() -> None:
    ledger = Ledger()
    restored = planner().plan(letter(), NOW)
    assert isinstance(restored, Restored)
    ledger.apply(*entry_for(restored, offset=7, run_id="a"), "")
    ledger.apply(*entry_for(restored, offset=9, run_id="b"), "")
    at = letter().at
    assert [entry.run_id for entry in ledger.redrives(at)] == ["a", "b"]  # newest last
    assert len(ledger) == 2
    assert not ledger.apply(b"images.dlq:0:1", b"not json", "")
    assert ledger.unusable == 1
    ledger.apply(b"images.dlq:0:17", None, "")  # an operator's tombstone
    assert ledger.redrives(at) == []
    assert ledger.redriven(letter(offset=18)) is None


# --- selecting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "ids", "everything", "ranged", "message"),
    [
        ([], [], False, False, "say which dead letters: --code, --event-id, --since/--until"),
        (["unknown_policy"], [], True, False, "give selectors or --all, not both"),
        ([], [], True, True, "give selectors or --all, not both"),
        (["unknown_polcy"], [], False, False, "--code unknown_polcy: no such dead-letter code"),
    ],
)
def test_a_redrive_without_a_valid_selector_is_refused(
    codes: list[str], ids: list[str], everything: bool, ranged: bool, message: str
) -> None:
    with pytest.raises(SelectionError, match=message):
        selection_from(codes, ids, everything=everything, ranged=ranged)


def test_selectors_of_one_kind_are_alternatives_and_kinds_combine() -> None:
    selection = selection_from(
        ["unknown_policy", "image_decode_failed"], ["e1", "e2"], everything=False, ranged=False
    )
    assert selection.matches(letter())
    assert selection.matches(letter(dead_letter("e2", code="image_decode_failed")))
    assert not selection.matches(letter(dead_letter("e3")))
    assert not selection.matches(letter(dead_letter("e1", code="guard_error")))
    assert not selection.matches(letter(b"junk"))  # no code to match
    everything = selection_from([], [], everything=True, ranged=False)
    assert everything.matches(letter(b"junk"))
    # A dead letter without an event id (an invalid event) is found by its record's key.
    assert Selection(event_ids=frozenset({"k9"})).matches(letter(dead_letter(None), key=b"k9"))


def test_an_empty_selection_says_what_it_asked_for() -> None:
    selection = selection_from(["unknown_policy"], [], everything=False, ranged=True)
    words = range_words("2026-12-07T10:00Z", None, [])
    assert selection.nothing_to_redrive("images.dlq", words) == (
        "no dead letters in images.dlq match --code unknown_policy between 2026-12-07T10:00Z "
        "and the end: nothing to redrive"
    )
    assert Selection().nothing_to_redrive("images.dlq", "") == (
        "no dead letters in images.dlq: nothing to redrive"
    )
    assert range_words(None, None, ["0:3-9"]) == "in offsets 0:3-9"


def test_without_a_range_a_dead_letter_tool_reads_the_whole_topic() -> None:
    assert range_request(None, None, [], whole_topic=True) == TimeRange(0, None)
    until = range_request(None, "2026-12-07T10:00Z", [], whole_topic=True)
    assert until == TimeRange(0, 1_796_637_600_000)
    with pytest.raises(ReplayRangeError, match="give the range"):
        range_request(None, None, [])  # a replay still refuses it
    # An empty range is the tool's to report, not an error.
    assert check_spans("images.dlq", [Span(0, 5, 5)], {0: 0}, {0: 5}, empty_ok=True) == []


# --- the run: publishing, then recording ----------------------------------------------------


class FakeSink:
    """The broker: acknowledges each record at the next offset of its topic's partition 0."""

    def __init__(self, fail_publish: bool = False, fail_record: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ends: dict[str, int] = {}
        self.fail_publish, self.fail_record = fail_publish, fail_record
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def publish(self, restored: Restored) -> Source:
        from aiokafka.errors import KafkaTimeoutError

        if self.fail_publish:
            raise KafkaTimeoutError()
        offset = self.ends.get(restored.topic, 0)
        self.ends[restored.topic] = offset + 1
        self.calls.append(("publish", restored))
        return Source(topic=restored.topic, partition=0, offset=offset)

    async def record(self, key: bytes, value: bytes) -> None:
        from aiokafka.errors import NotEnoughReplicasError

        if self.fail_record:
            raise NotEnoughReplicasError()
        self.calls.append(("record", (key, orjson.loads(value))))


async def _letters(*made: Letter) -> AsyncIterator[Letter]:
    for one in made:
        yield one


def redriver(
    sink: FakeSink | None, stop: asyncio.Event | None = None, **options: Any
) -> tuple[Redriver, list[str]]:
    said: list[str] = []
    everything = Selection()
    run = Redriver(
        planner(**options),
        everything,
        sink,
        Pacer(None),
        stop or asyncio.Event(),
        "run-1",
        said.append,
        Tally(dry_run=sink is None),
        now=lambda: NOW,
    )
    return run, said


async def test_each_record_is_recorded_in_the_ledger_only_after_it_was_acknowledged() -> None:
    sink = FakeSink()
    run, said = redriver(sink)
    assert not await run.all(_letters(letter(offset=17), letter(b"junk", offset=18)), list)
    assert [call for call, _ in sink.calls] == ["publish", "record"]
    key, entry = sink.calls[1][1]
    assert key == b"images.dlq:0:17"
    assert entry["to"] == {"topic": "images", "partition": 0, "offset": 0}
    assert said == [
        "redriven images.dlq:0:17 event e1 (unknown_policy) → images:0:0",
        "refused images.dlq:0:18 event e1: not JSON",
    ]
    assert run.tally.summary() == (
        "redriven 1, already redriven 0 (skipped), refused 1: not_a_dead_letter 1"
    )
    assert run.tally.exit_code(interrupted=False) == 0


async def test_a_record_the_broker_did_not_take_is_not_recorded_and_stops_the_run() -> None:
    sink = FakeSink(fail_publish=True)
    run, _ = redriver(sink)
    with pytest.raises(RedriveFailed, match="may or may not have been written, and is not in"):
        await run.all(_letters(letter()), list)
    assert sink.calls == []
    sink = FakeSink(fail_record=True)
    run, _ = redriver(sink)
    with pytest.raises(RedriveFailed, match="published at images:0:0 but its ledger entry"):
        await run.all(_letters(letter()), list)


async def test_a_dry_run_publishes_nothing_and_says_what_it_would_do() -> None:
    run, said = redriver(None)
    truncated = letter(dead_letter(limit=10, source=("images", 0, 3)), offset=3)
    assert not await run.all(_letters(letter(), truncated), list)
    assert said[0] == "would redrive images.dlq:0:17 event e1 (unknown_policy) → images"
    assert said[1].startswith("refused images.dlq:0:3 event e1 (unknown_policy): original cut")
    assert run.tally.summary() == (
        "dry run: would redrive 1, already redriven 0 (skipped), refused 1: truncated 1; "
        "nothing published"
    )
    assert run.tally.exit_code(interrupted=False) == 0


async def test_a_stop_finishes_the_record_in_flight_then_takes_no_more() -> None:
    stop = asyncio.Event()
    sink = FakeSink()
    original_record = sink.record

    async def record_then_stop(key: bytes, value: bytes) -> None:
        stop.set()  # Ctrl-C while the first record's ledger entry is in flight
        await original_record(key, value)

    sink.record = record_then_stop  # type: ignore[method-assign]
    run, _ = redriver(sink, stop)
    made = [letter(dead_letter(f"e{i}", source=("images", 0, i)), offset=i) for i in range(3)]
    assert await run.all(_letters(*made), list)
    assert [call for call, _ in sink.calls] == ["publish", "record"]
    assert run.tally.exit_code(interrupted=True) == 130


@pytest.mark.parametrize(
    ("redriven", "reasons", "dry_run", "selected", "code"),
    [
        (1, {}, False, 1, 0),
        (0, {"already_redriven": 2}, False, 2, 1),
        (0, {"truncated": 1}, False, 1, 1),
        (0, {"truncated": 1}, True, 1, 0),
    ],
)
def test_exit_codes(
    redriven: int, reasons: dict[str, int], dry_run: bool, selected: int, code: int
) -> None:
    tally = Tally(dry_run=dry_run, selected=selected, redriven=redriven)
    tally.reasons.update(reasons)
    assert tally.exit_code(interrupted=False) == code


# --- the command, its Kafka side faked ------------------------------------------------------


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["dlq", *argv])


SETTINGS = Settings(bootstrap_servers="127.0.0.1:1")  # nothing listens: never reached here


def _record(one: Letter, value: bytes | None) -> ConsumerRecord[bytes, bytes]:
    at = one.at
    return ConsumerRecord(
        at.topic, at.partition, at.offset, one.timestamp_ms, 0, one.key, value, None, 0, 0, ()
    )


class FakeKafka:
    """The adapter functions `service.dlq` and `service.dlq_redrive` call, over a list of
    dead-letter records and a ledger kept in memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, records: Iterable[bytes | None]) -> None:
        made = [letter(value, offset=i) for i, value in enumerate(records)]
        self.records = [_record(one, value) for one, value in zip(made, records, strict=True)]
        self.ledger: Ledger | None = None
        self.sinks: list[FakeSink] = []
        for module in (dlq, dlq_redrive):
            monkeypatch.setattr(module, "bounded_read", self.bounded_read, raising=False)
        monkeypatch.setattr(dlq, "read_ledger", self.read_ledger)
        monkeypatch.setattr(dlq_redrive, "read_ledger", self.read_ledger)
        monkeypatch.setattr(dlq_redrive, "ensure_table_topic", self.ensure_table_topic)
        monkeypatch.setattr(dlq_redrive, "RedriveProducer", self.producer)

    @contextlib.asynccontextmanager
    async def bounded_read(self, settings: Settings, topic: str, request: Any) -> Any:
        since = request.since_ms if isinstance(request, TimeRange) else 0
        chosen = [r for r in self.records if r.timestamp >= since]

        async def records() -> AsyncGenerator[ConsumerRecord[bytes, bytes], None]:
            for record in chosen:
                yield record

        yield Bounded([Span(0, 0, len(chosen))] if chosen else [], records(), TOPICS)

    async def read_ledger(self, settings: Settings, topic: str, timeout_s: float) -> Any:
        return self.ledger

    async def ensure_table_topic(self, settings: Settings, topic: str) -> bool:
        self.ledger = Ledger()
        return True

    def producer(self, settings: Settings, ledger_topic: str) -> FakeSink:
        sink = FakeSink()
        original_record = sink.record

        async def record(key: bytes, value: bytes) -> None:
            await original_record(key, value)
            assert self.ledger is not None
            self.ledger.apply(key, value, ledger_topic)

        sink.record = record  # type: ignore[method-assign]
        self.sinks.append(sink)
        return sink


async def run_redrive(*argv: str) -> int:
    return await dlq_redrive.redrive(
        SETTINGS, args("redrive", "--no-progress", *argv), asyncio.Event()
    )


async def test_redriving_twice_publishes_once_unless_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = dead_letter(limit=9, source=("images", 0, 3))
    kafka = FakeKafka(monkeypatch, [serialize(dead_letter()), serialize(cut)])
    assert await run_redrive("--code", "unknown_policy", "--rate", "0") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "created the ledger topic images.dlq.redriven (compacted, 1 partition)"
    assert out[1] == "redriven images.dlq:0:0 event e1 (unknown_policy) → images:0:0"
    assert out[2].startswith("refused images.dlq:0:1 event e1 (unknown_policy): original cut at 9")
    assert out[3].endswith(": redriven 1, already redriven 0 (skipped), refused 1: truncated 1")
    assert kafka.sinks[0].started
    assert kafka.sinks[0].stopped

    assert await run_redrive("--code", "unknown_policy") == 1  # nothing left to redrive
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("skipped images.dlq:0:0 event e1 (unknown_policy): already redriven")
    assert out[-1].endswith(": redriven 0, already redriven 1 (skipped), refused 1: truncated 1")
    assert [call for call, _ in kafka.sinks[1].calls] == []

    assert await run_redrive("--event-id", "e1", "--again") == 0
    assert [call for call, _ in kafka.sinks[2].calls] == ["publish", "record"]
    assert len(kafka.ledger or []) == 2


async def test_a_dry_run_creates_no_ledger_and_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = FakeKafka(monkeypatch, [serialize(dead_letter())])
    assert await run_redrive("--all", "--dry-run") == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == "ledger topic images.dlq.redriven does not exist yet: nothing was redriven before"
    )
    assert out[1] == "would redrive images.dlq:0:0 event e1 (unknown_policy) → images"
    assert kafka.ledger is None
    assert kafka.sinks == []


async def test_an_empty_selection_says_so_in_one_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeKafka(monkeypatch, [serialize(dead_letter())])
    since = "2030-01-01T00:00Z"
    assert await run_redrive("--code", "image_decode_failed", "--since", since) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "no dead letters in images.dlq match --code image_decode_failed between "
        "2030-01-01T00:00Z and the end: nothing to redrive"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "dlq redrive: say which dead letters"),
        (["--all", "--rate", "-1"], "dlq redrive: --rate must be 0 (no limit) or more"),
        (["--all", "--to", "images.dlq"], "dlq redrive: --to images.dlq: that is the dead-letter"),
        (["--since", "yesterday"], "dlq redrive: --since 'yesterday': not an ISO 8601"),
        (["--code", "nope"], "dlq redrive: --code nope: no such dead-letter code"),
    ],
)
async def test_bad_arguments_are_one_line_and_exit_2_before_any_broker(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_redrive(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(message)


# --- list and show --------------------------------------------------------------------------


def test_the_listing_counts_by_code_and_hour_with_bounded_examples() -> None:
    listing = Listing(examples=2)
    later = datetime(2026, 12, 8, 11, 5, tzinfo=UTC)
    for i in range(3):
        listing.add(letter(dead_letter(f"p{i}"), offset=i), redriven=i == 0)
    listing.add(letter(dead_letter("d1", code="image_decode_failed", failed_at=later), 3), False)
    listing.add(letter(b"junk", offset=4), False)
    report = listing.as_json("images.dlq", "")
    assert (report["dead_letters"], report["not_dead_letters"], report["redriven"]) == (4, 1, 1)
    assert (report["first_failed_at"], report["last_failed_at"]) == (
        "2026-12-08T09:30:00.000Z",
        "2026-12-08T11:05:00.000Z",
    )
    assert report["codes"][0] == {
        "code": "unknown_policy",
        "fault": "input",
        "count": 3,
        "redriven": 1,
        "examples": [{"event_id": "p0", "place": "0@0"}, {"event_id": "p1", "place": "0@1"}],
    }
    assert report["hours"] == [
        {"hour": "2026-12-08T09:00Z", "count": 3},
        {"hour": "2026-12-08T11:00Z", "count": 1},
    ]
    json.dumps(report)  # one machine-readable object
    lines = listing.lines("images.dlq", "between 2026-12-08 and the end")
    assert lines[0].startswith("images.dlq (between 2026-12-08 and the end): 4 dead letters, 1 of")
    assert lines[1] == "1 records that are not dead letters: 0@4"
    assert any(line.startswith("unknown_policy") and "p0 0@0, p1 0@1" in line for line in lines)
    assert Listing(3).lines("images.dlq", "") == ["no dead letters in images.dlq"]


def test_every_code_has_a_fault() -> None:
    assert {code: fault_of(code) for code in DEAD_LETTER_CODES if fault_of(code) == "unknown"} == {}
    assert fault_of("fetch_timeout") == "input"
    assert fault_of("guard_unavailable") == "service"
    assert fault_of("no_such_code") == "unknown"


def test_show_decodes_the_original_and_names_the_trace_and_the_redrives() -> None:
    one = letter()
    restored = planner().plan(one, NOW)
    assert isinstance(restored, Restored)
    entry = LedgerEntry.model_validate_json(entry_for(restored)[1])
    text = "\n".join(show_lines(one, [entry]))
    assert "  code         unknown_policy  (fault: input)" in text
    assert "  input        images:2:41  key 'e1'" in text
    assert "(find the trace by this id in your tracing backend)" in text
    assert f"  original     {len(EVENT)} bytes, complete" in text
    assert "traceparent: 00-4bf92f35" in text
    assert "x-bin (binary, base64): /wCB" in text
    assert '"data": "<base64, 400 characters>"' in text  # elided to its length
    assert '"policy_id": "p"' in text
    assert "  redrives     2026-12-08T09:30:00.000Z  run run-1 → images:2:7" in text

    cut = "\n".join(show_lines(letter(dead_letter(limit=40)), []))
    assert f"{len(EVENT)} bytes, TRUNCATED: 40 kept, cannot be redriven" in cut
    assert "… (cut: the rest was not kept)" in cut
    assert "  redrives     none" in cut
    junk = "\n".join(show_lines(letter(b"\x89PNG\r\n\x1a\n binary", key=b"k"), []))
    assert "not a guardstream dead letter: not JSON" in junk
    assert "15 bytes of binary data: 89 50 4e 47" in junk


def test_only_base64_is_elided_not_long_text() -> None:
    words = "a plain sentence of words without any punctuation at all " * 4
    shown = preview(orjson.dumps({"note": words, "data": "QUJD" * 40}), cut=False)
    assert f'"note": "{words}"' in shown[1]
    assert '"data": "<base64, 160 characters>"' in shown[2]


def test_a_long_preview_is_cut_to_its_first_lines() -> None:
    shown = preview(orjson.dumps({f"k{i}": i for i in range(100)}), cut=False, max_lines=5)
    assert len(shown) == 6
    assert shown[-1] == "… 97 more lines"


def test_coordinates_are_the_ledger_key() -> None:
    assert coordinates(Source(topic="images.dlq", partition=0, offset=17)) == "images.dlq:0:17"


async def test_show_says_when_there_is_no_such_dead_letter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeKafka(monkeypatch, [serialize(dead_letter("e1")), serialize(dead_letter("e1"))])
    assert await dlq.show_dead_letters(SETTINGS, args("show", "nope")) == 1
    assert capsys.readouterr().err == "dlq show: no dead letter for event 'nope' in images.dlq\n"
    assert await dlq.show_dead_letters(SETTINGS, args("show", "e1")) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 dead letters for event 'e1' in images.dlq, newest last")
    assert "images.dlq:0:0" in out
    assert "images.dlq:0:1" in out


async def test_list_prints_one_json_object(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeKafka(monkeypatch, [serialize(dead_letter("e1")), b"junk"])
    assert await dlq.list_dead_letters(SETTINGS, args("list", "--json", "--examples", "1")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dead_letters"], report["not_dead_letters"]) == (1, 1)
    assert await dlq.list_dead_letters(SETTINGS, args("list", "--code", "guard_error")) == 0
    assert capsys.readouterr().out == "no dead letters in images.dlq match --code guard_error\n"
