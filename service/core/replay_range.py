"""Which records a batch tool reads: a range of a topic, per partition `[first, end)`.

A replay judges a range of the input topic again; `dlq` lists, shows and redrives a range of the
dead-letter topic. The command line names the range by timestamps (`--since`, `--until`) or by
offsets (`--offsets P:FIRST-END`); the Kafka adapter turns timestamps into offsets. Everything
here is checked before anything is read, and every problem is a `ReplayRangeError` whose
message is the one line the command prints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

_OFFSETS = re.compile(r"(\d+):(\d+)-(\d+)")


class ReplayRangeError(ValueError):
    """The range cannot be replayed; the message says why, in one line."""


@dataclass(frozen=True, order=True)
class Span:
    """The offsets `[first, end)` of one partition."""

    partition: int
    first: int
    end: int

    @property
    def records(self) -> int:
        """At most this many records (compaction and transaction markers leave gaps)."""
        return self.end - self.first

    def holds(self, offset: int) -> bool:
        return self.first <= offset < self.end

    def __str__(self) -> str:
        return f"{self.partition}:{self.first}-{self.end}"


def parse_offsets(texts: Iterable[str]) -> list[Span]:
    """`P:FIRST-END` arguments as spans, sorted; each partition at most once, FIRST < END."""
    spans: dict[int, Span] = {}
    for text in texts:
        matched = _OFFSETS.fullmatch(text.strip())
        if matched is None:
            raise ReplayRangeError(f"--offsets {text!r}: expected P:FIRST-END, e.g. 0:100-250")
        span = Span(*(int(group) for group in matched.groups()))
        if span.first >= span.end:
            raise ReplayRangeError(f"--offsets {text}: FIRST must be below END (END is exclusive)")
        if span.partition in spans:
            raise ReplayRangeError(f"--offsets: partition {span.partition} is named twice")
        spans[span.partition] = span
    return sorted(spans.values())


def parse_instant(text: str, option: str) -> int:
    """An ISO 8601 timestamp as Unix milliseconds; without a zone it is taken as UTC."""
    try:
        # fromisoformat takes "Z" since Python 3.11; a bare date means its midnight.
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReplayRangeError(
            f"{option} {text!r}: not an ISO 8601 timestamp (e.g. 2026-12-07T10:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class TimeRange:
    """`[since_ms, until_ms)`; `until_ms` None: to the end of the topic as it is now."""

    since_ms: int
    until_ms: int | None


def time_range(since: str, until: str | None) -> TimeRange:
    since_ms = parse_instant(since, "--since")
    until_ms = None if until is None else parse_instant(until, "--until")
    if until_ms is not None and since_ms >= until_ms:
        raise ReplayRangeError(f"--since {since} is not before --until {until}")
    return TimeRange(since_ms, until_ms)


WHOLE_TOPIC_SINCE = "1970-01-01T00:00Z"
"""The `--since` of a tool that reads the whole topic when none is given: every record."""


def range_request(
    since: str | None, until: str | None, offsets: list[str], *, whole_topic: bool = False
) -> TimeRange | list[Span]:
    """What the command line asks for: a time range, or offsets per partition (not both).
    Without either, the whole topic when `whole_topic` (to `--until`, if given), else refused."""
    if offsets and (since is not None or until is not None):
        raise ReplayRangeError("give --offsets or --since/--until, not both")
    if offsets:
        return parse_offsets(offsets)
    if since is None and whole_topic:
        since = WHOLE_TOPIC_SINCE
    if since is None:
        # A replay of a whole topic by omission could judge months of events: say so instead.
        raise ReplayRangeError("give the range: --since (and --until), or --offsets P:FIRST-END")
    return time_range(since, until)


def range_words(since: str | None, until: str | None, offsets: list[str]) -> str:
    """The range as the command line named it, for messages: "between A and B", "in offsets
    0:3-9", or "" for the whole topic."""
    if offsets:
        return f"in offsets {', '.join(offsets)}"
    if since is None and until is None:
        return ""
    return f"between {since or 'the beginning'} and {until or 'the end'}"


def check_spans(
    topic: str,
    spans: Iterable[Span],
    beginnings: Mapping[int, int],
    ends: Mapping[int, int],
    *,
    empty_ok: bool = False,
) -> list[Span]:
    """The spans, each inside its partition's offsets now (`beginnings`, `ends`: every
    partition of the topic), and not all empty unless `empty_ok`; spans with no records are
    dropped."""
    kept = []
    for span in spans:
        if span.partition not in ends:
            known = ", ".join(map(str, sorted(ends))) or "none"
            raise ReplayRangeError(
                f"{topic} has no partition {span.partition} (partitions: {known})"
            )
        low, high = beginnings[span.partition], ends[span.partition]
        if span.first < low or span.end > high:
            raise ReplayRangeError(
                f"offsets {span} are outside {topic}[{span.partition}]'s offsets {low}-{high}"
            )
        if span.records > 0:
            kept.append(span)
    if not kept and not empty_ok:
        raise ReplayRangeError(f"the range holds no records of {topic}")
    return sorted(kept)


def spans_between(firsts: Mapping[int, int], ends: Mapping[int, int]) -> list[Span]:
    """The spans from offsets found by time: `firsts` (first offset at or after since) and
    `ends` (first offset at or after until, or the partition's end), per partition."""
    return [Span(p, firsts[p], max(firsts[p], ends[p])) for p in sorted(firsts)]
