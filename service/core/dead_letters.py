"""Dead letters read back from their topic, and what a redrive makes of them.

A dead letter (`service.core.verdicts.DeadLetter`) keeps the record that failed: its value
(base64, cut to `GUARDSTREAM_DEAD_LETTER_ORIGINAL_BYTES`), its headers, and where it was read
(`source`); the dead-letter record is keyed with the original record's key. A redrive publishes
that record again, to the topic it came from (or `--to`), once the cause is fixed:

    value    base64-decoded `original`
    key      the dead-letter record's key (the original key)
    headers  the original headers (text or base64 decoded), so the event id and the
             traceparent are the original's: the redriven event joins the upload's trace;
             plus `guardstream-redrive: {"from": "images.dlq:0:17", "code", "run_id", "at"}`,
             replacing one an earlier redrive left, never stacking them

A dead letter is refused, with a reason, when its record cannot be restored as it was (cut,
absent, damaged) or has nowhere to go; skipped when the ledger (`Ledger`, a compacted topic
`<dlq>.redriven` keyed by the dead letter's coordinates) says it was already redriven, or when
another dead letter of the same input record went earlier in the same run (at-least-once
delivery can dead-letter one record twice). `Planner.plan` decides, in that order; nothing here
does I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from service.core.errors import DEAD_LETTER_CODES
from service.core.verdicts import DeadLetter, Header, Source

REDRIVE_HEADER = "guardstream-redrive"

REASONS: dict[str, str] = {
    "not_a_dead_letter": "not a guardstream dead letter",
    "no_original": "no original value",
    "truncated": "original truncated",
    "bad_original": "original not decodable",
    "no_such_topic": "target topic missing",
    "already_redriven": "already redriven",
    "duplicate": "input record already redriven in this run",
}
"""Why a dead letter is not redriven: the reason's name (in summaries) and its words."""

SKIPS = frozenset({"already_redriven", "duplicate"})
"""Reasons that are not refusals: the event was, or is being, published already."""


class SelectionError(ValueError):
    """The command line selects no dead letters it may; the message says why, in one line."""


def instant(moment: datetime) -> str:
    """A moment as the dlq tools write it: UTC, to the millisecond, `2026-12-08T09:30:00.123Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def coordinates(place: Source) -> str:
    """A record's coordinates as the ledger keys them: `images.dlq:0:17`."""
    return f"{place.topic}:{place.partition}:{place.offset}"


@dataclass(frozen=True)
class Letter:
    """One record of the dead-letter topic: the dead letter it holds, or why it holds none."""

    at: Source
    key: bytes | None
    timestamp_ms: int
    dead_letter: DeadLetter | None
    unreadable: str | None = None
    """Why the record is not a guardstream dead letter (None when it is one)."""
    raw: bytes | None = None
    """The record's value, kept only for a record that is not a dead letter (to show it)."""

    @property
    def event_id(self) -> str | None:
        """The dead letter's event id, else the record's key as text (dead letters of events
        too broken to name one are keyed like their record)."""
        if self.dead_letter is not None and self.dead_letter.event_id is not None:
            return self.dead_letter.event_id
        return None if self.key is None else self.key.decode("utf-8", "replace")

    @property
    def code(self) -> str | None:
        return None if self.dead_letter is None else self.dead_letter.error.code


def letter_from(at: Source, key: bytes | None, value: bytes | None, timestamp_ms: int) -> Letter:
    """What a record of the dead-letter topic holds; never raises."""
    if value is None:
        return Letter(at, key, timestamp_ms, None, "no value (a tombstone)")
    try:
        return Letter(at, key, timestamp_ms, DeadLetter.model_validate_json(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            why = "not JSON"
        else:
            field = ".".join(str(part) for part in first["loc"]) or "the record"
            why = f"not a guardstream dead letter ({field}: {first['msg']})"
        return Letter(at, key, timestamp_ms, None, why, raw=value)


@dataclass(frozen=True)
class Selection:
    """Which dead letters of the range a command takes: by code and event id (any of each
    kind given; both kinds must match), or every one (`--all`, or no filter in `list`)."""

    codes: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()

    def matches(self, letter: Letter) -> bool:
        if self.codes and letter.code not in self.codes:
            return False  # a record that is not a dead letter has no code
        return not self.event_ids or letter.event_id in self.event_ids

    def describe(self, range_words: str) -> str:
        """The selection in the words of the command line, e.g. "--code unknown_policy
        between A and B"."""
        words = [f"--code {code}" for code in sorted(self.codes)]
        words += [f"--event-id {event_id}" for event_id in sorted(self.event_ids)]
        return " ".join([*words, range_words]).strip()

    def nothing_to_redrive(self, topic: str, range_words: str) -> str:
        """The one line of a redrive whose selection holds no dead letter."""
        words = self.describe(range_words)
        return f"no dead letters in {topic}{' match ' + words if words else ''}: nothing to redrive"


def check_codes(codes: Collection[str]) -> frozenset[str]:
    """The codes, each one a dead letter can carry; SelectionError naming those it cannot."""
    unknown = sorted(set(codes) - set(DEAD_LETTER_CODES))
    if unknown:
        raise SelectionError(
            f"--code {', '.join(unknown)}: no such dead-letter code "
            f"(codes: {', '.join(DEAD_LETTER_CODES)})"
        )
    return frozenset(codes)


def selection_from(
    codes: Collection[str], event_ids: Collection[str], *, everything: bool, ranged: bool
) -> Selection:
    """A redrive's selection from its selectors; SelectionError when it has none (and not
    `--all`), has `--all` beside another, or names a code no dead letter can carry."""
    check_codes(codes)
    given = bool(codes or event_ids or ranged)
    if everything and given:
        raise SelectionError("give selectors or --all, not both")
    if not everything and not given:
        raise SelectionError(
            "say which dead letters: --code, --event-id, --since/--until or --offsets "
            "(or --all for every one)"
        )
    return Selection(frozenset(codes), frozenset(event_ids))


class LedgerEntry(BaseModel):
    """A redrive, recorded once the broker acknowledged the redriven record: the ledger
    topic's value, keyed by `coordinates(dead_letter)`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    dead_letter: Source
    source: Source | None
    """The input record the dead letter was about: a second dead letter of it is a repeat."""
    event_id: str | None
    code: str
    to: Source
    """Where the redriven record was published."""
    run_id: str
    at: datetime


class Ledger:
    """The ledger topic read whole: every redrive recorded, by dead letter and input record."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._by_key: dict[str, list[LedgerEntry]] = {}
        self._by_source: dict[str, LedgerEntry] = {}
        self.unusable = 0
        for entry in entries:
            self.add(entry)

    def add(self, entry: LedgerEntry) -> None:
        self._by_key.setdefault(coordinates(entry.dead_letter), []).append(entry)
        if entry.source is not None:
            self._by_source[coordinates(entry.source)] = entry

    def apply(self, key: bytes, value: bytes | None, where: str) -> bool:
        """A record of the ledger topic (`service.adapters.kafka.table.Apply`); a tombstone
        forgets the dead letter's redrives, so that it may be redriven without `--again`."""
        if value is None:
            for entry in self._by_key.pop(key.decode("utf-8", "replace"), []):
                if entry.source is not None:
                    self._by_source.pop(coordinates(entry.source), None)
            return True
        try:
            self.add(LedgerEntry.model_validate_json(value))
        except ValidationError:
            self.unusable += 1
            return False
        return True

    def redrives(self, at: Source) -> list[LedgerEntry]:
        """The dead letter's redrives, in the order the ledger holds them (newest last)."""
        return list(self._by_key.get(coordinates(at), []))

    def redriven(self, letter: Letter) -> LedgerEntry | None:
        """The latest redrive of this dead letter, or of another dead letter of its input
        record; None when neither was redriven."""
        mine = self._by_key.get(coordinates(letter.at))
        if mine:
            return mine[-1]
        source = None if letter.dead_letter is None else letter.dead_letter.source
        return None if source is None else self._by_source.get(coordinates(source))

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_key.values())


@dataclass(frozen=True)
class Restored:
    """A dead letter's original record, ready to publish again."""

    letter: Letter
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Refusal:
    """Why a dead letter is not redriven: a reason of `REASONS` and the line that says it."""

    letter: Letter
    reason: str
    message: str

    @property
    def skipped(self) -> bool:
        return self.reason in SKIPS


def header_value(header: Header) -> bytes:
    """A header as the original record carried it; binascii.Error if its base64 is damaged."""
    if header.value_base64 is not None:
        return base64.b64decode(header.value_base64, validate=True)
    return (header.value or "").encode("utf-8")


def redrive_stamp(letter: Letter, run_id: str, at: datetime) -> bytes:
    """The `guardstream-redrive` header's value: compact JSON naming the dead letter."""
    return orjson.dumps(
        {"from": coordinates(letter.at), "code": letter.code, "run_id": run_id, "at": instant(at)}
    )


def restored_headers(original: Iterable[Header], stamp: bytes) -> list[tuple[str, bytes]]:
    """The original headers, in order, with an earlier redrive's stamp replaced by `stamp`."""
    kept = [(h.key, header_value(h)) for h in original if h.key != REDRIVE_HEADER]
    return [*kept, (REDRIVE_HEADER, stamp)]


class Planner:
    """Decides, dead letter by dead letter, what a redrive run does with each."""

    def __init__(
        self,
        ledger: Ledger,
        topics: Collection[str],
        run_id: str,
        *,
        to: str | None = None,
        again: bool = False,
    ) -> None:
        self._ledger = ledger
        self._topics = topics
        self._run_id = run_id
        self._to = to
        self._again = again
        self._this_run: dict[str, Source] = {}
        """Input records planned for redrive in this run (their coordinates), and from which
        dead letter."""

    def plan(self, letter: Letter, now: datetime) -> Restored | Refusal:
        dead_letter = letter.dead_letter
        if dead_letter is None:
            return Refusal(letter, "not_a_dead_letter", letter.unreadable or "")
        redriven = None if self._again else self._ledger.redriven(letter)
        if redriven is not None:
            return Refusal(
                letter,
                "already_redriven",
                f"already redriven by run {redriven.run_id} at {instant(redriven.at)} "
                f"from {coordinates(redriven.dead_letter)} to {coordinates(redriven.to)} "
                "(--again to redrive it again)",
            )
        source = coordinates(dead_letter.source)
        first = self._this_run.get(source)
        if first is not None:
            return Refusal(
                letter,
                "duplicate",
                f"another dead letter of input record {source}: redriven once, from "
                f"{coordinates(first)}",
            )
        restored = self._restore(letter, dead_letter, now)
        if isinstance(restored, Restored):
            self._this_run[source] = letter.at
        return restored

    def _restore(
        self, letter: Letter, dead_letter: DeadLetter, now: datetime
    ) -> Restored | Refusal:
        if dead_letter.original is None:
            return Refusal(
                letter, "no_original", "the original record had no value: nothing to send"
            )
        try:
            value = base64.b64decode(dead_letter.original, validate=True)
        except binascii.Error:
            value = None
        if dead_letter.original_truncated:
            kept = "?" if value is None else str(len(value))
            return Refusal(
                letter,
                "truncated",
                f"original cut at {kept} of {dead_letter.original_size} bytes by "
                "GUARDSTREAM_DEAD_LETTER_ORIGINAL_BYTES: cannot be restored; ask the producer "
                "to send it again",
            )
        if value is None or len(value) != dead_letter.original_size:
            found = "not base64" if value is None else f"{len(value)} bytes"
            return Refusal(
                letter,
                "bad_original",
                f"original is {found}, the dead letter says {dead_letter.original_size} bytes: "
                "cannot be restored as it was",
            )
        try:
            headers = restored_headers(
                dead_letter.original_headers, redrive_stamp(letter, self._run_id, now)
            )
        except binascii.Error:
            return Refusal(letter, "bad_original", "an original header's base64 is damaged")
        topic = self._to or dead_letter.source.topic
        if topic not in self._topics:
            return Refusal(
                letter,
                "no_such_topic",
                f"topic {topic!r} does not exist (the broker would create it on a first write)",
            )
        return Restored(letter, topic, letter.key, value, headers)


def ledger_record(restored: Restored, to: Source, run_id: str, at: datetime) -> tuple[bytes, bytes]:
    """The ledger topic's record for a redrive the broker acknowledged at `to`."""
    letter = restored.letter
    entry = LedgerEntry(
        dead_letter=letter.at,
        source=None if letter.dead_letter is None else letter.dead_letter.source,
        event_id=letter.event_id,
        code=letter.code or "",
        to=to,
        run_id=run_id,
        at=at,
    )
    return coordinates(letter.at).encode(), entry.model_dump_json().encode()
