"""Reading a bounded range of a topic without joining a group: what a replay and `dlq` read.

A replay must not disturb the live consumers: no consumer group (so no rebalance and no commit
to the service's group), partitions assigned by hand, only committed records (`read_committed`).
Its range is fixed when it starts (`end_offsets` then), so it ends by itself even while the
topic keeps growing. The original verdicts are read the same way, the verdict topic whole to
the end it had at the start, keeping only those whose source lies in the range. `dlq` reads
the dead-letter topic the same way (`bounded_read`): a redrive's failures that land on it
again while it runs are beyond its end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.config import Settings
from service.core.replay_diff import Original, original_from, source_of
from service.core.replay_range import (
    ReplayRangeError,
    Span,
    TimeRange,
    check_spans,
    spans_between,
)
from service.core.verdicts import Source

log = logging.getLogger(__name__)

_POLL_MS = 200
FIRST_RECORD_POLLS = 25

QUIET_POLLS = 150
"""Empty polls in a row (30 s) after which partitions whose position stopped short of their end
are taken as read, with a warning. aiokafka moves a position past transaction markers and
aborted records (seen on noida-db), so this only keeps a broker that does not from hanging
the run; it is long, so that a slow broker does not cut a range short."""

ORIGINALS_MARGIN_MS = 15 * 60 * 1000
"""How long before a range's start its original verdicts are looked for: a verdict is
published after its event, so only clock skew between the producers (the upload service's and
the consumer's) can put one earlier."""

Message: TypeAlias = ConsumerRecord[bytes, bytes]


def plain_consumer(settings: Settings) -> AIOKafkaConsumer:
    """A consumer of no group that commits nothing and sees only committed records."""
    return AIOKafkaConsumer(
        **settings.kafka_connection(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",  # offsets gone to retention: the oldest still there
    )


async def partition_offsets(
    consumer: AIOKafkaConsumer, topic: str
) -> tuple[dict[int, int], dict[int, int]]:
    """Each partition's first offset and end (the next offset to be written) now."""
    await consumer.topics()  # a consumer with no subscription has no metadata until asked
    numbers = consumer.partitions_for_topic(topic)
    if not numbers:
        raise ReplayRangeError(f"topic {topic!r} does not exist")
    partitions = [TopicPartition(topic, n) for n in sorted(numbers)]
    beginnings = await consumer.beginning_offsets(partitions)
    ends = await consumer.end_offsets(partitions)
    return (
        {tp.partition: o for tp, o in beginnings.items()},
        {tp.partition: o for tp, o in ends.items()},
    )


async def topic_ends(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's end now: for tools and tests that name a whole topic by offsets."""
    consumer = plain_consumer(settings)
    await consumer.start()
    try:
        return (await partition_offsets(consumer, topic))[1]
    finally:
        await consumer.stop()


async def resolve(
    consumer: AIOKafkaConsumer,
    topic: str,
    request: TimeRange | list[Span],
    *,
    empty_ok: bool = False,
) -> list[Span]:
    """The offsets the request names, checked against the topic as it is now; a range with
    no records is refused unless `empty_ok`."""
    beginnings, ends = await partition_offsets(consumer, topic)
    if isinstance(request, TimeRange):
        firsts = await _offsets_at(consumer, topic, request.since_ms, ends)
        lasts = (
            ends
            if request.until_ms is None
            else await _offsets_at(consumer, topic, request.until_ms, ends)
        )
        spans = spans_between(firsts, lasts)
        return check_spans(topic, spans, beginnings, ends, empty_ok=empty_ok)
    return check_spans(topic, request, beginnings, ends, empty_ok=empty_ok)


@dataclass(frozen=True)
class Bounded:
    """A range of a topic being read: its spans (fixed at the start), its records, and the
    topics the cluster had then (a metadata request that creates none)."""

    spans: list[Span]
    records: AsyncGenerator[Message, None]
    topics: frozenset[str]

    @property
    def total(self) -> int:
        """At most this many records (compaction and transaction markers leave gaps)."""
        return sum(span.records for span in self.spans)


@contextlib.asynccontextmanager
async def bounded_read(
    settings: Settings, topic: str, request: TimeRange | list[Span]
) -> AsyncIterator[Bounded]:
    """The records of `topic` in the range the request names, to the ends it has now, read
    by a consumer of no group; an empty range reads nothing (ReplayRangeError for a topic
    that does not exist or offsets outside it)."""
    consumer = plain_consumer(settings)
    await consumer.start()
    try:
        topics = frozenset(await consumer.topics())
        spans = await resolve(consumer, topic, request, empty_ok=True)
        positions = {span.partition: (span.first, span.end) for span in spans}
        records = read_range(consumer, topic, positions)
        async with contextlib.aclosing(records):
            yield Bounded(spans, records, topics)
    finally:
        await consumer.stop()


async def first_timestamp(
    consumer: AIOKafkaConsumer, topic: str, spans: Sequence[Span]
) -> int | None:
    """When a range given by offsets starts: the earliest timestamp of its partitions' first
    records, so that its original verdicts are looked for from then on; None when a partition's
    first record cannot be read within seconds (the verdict topic is then read whole)."""
    partitions = {TopicPartition(topic, span.partition): span.first for span in spans}
    consumer.assign(list(partitions))
    for tp, first in partitions.items():
        consumer.seek(tp, first)
    found: dict[TopicPartition, int] = {}
    for _ in range(FIRST_RECORD_POLLS):
        pending = [tp for tp in partitions if tp not in found]
        if not pending:
            break
        batches = await consumer.getmany(*pending, timeout_ms=_POLL_MS, max_records=len(pending))
        found |= {tp: messages[0].timestamp for tp, messages in batches.items() if messages}
    consumer.unsubscribe()  # the consumer is handed back as it came
    if len(found) < len(partitions) or min(found.values()) <= 0:
        return None
    return min(found.values())


async def _offsets_at(
    consumer: AIOKafkaConsumer, topic: str, at_ms: int, ends: Mapping[int, int]
) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after `at_ms` (else its end)."""
    found = await consumer.offsets_for_times({TopicPartition(topic, p): at_ms for p in ends})
    return {
        tp.partition: ends[tp.partition] if hit is None else hit.offset for tp, hit in found.items()
    }


async def read_range(
    consumer: AIOKafkaConsumer, topic: str, positions: Mapping[int, tuple[int, int]]
) -> AsyncGenerator[Message, None]:
    """The records of each partition from `next` up to `end` (`positions[p] = (next, end)`),
    partitions interleaved as fetched; stops once every partition is read to its end."""
    partitions = {p: TopicPartition(topic, p) for p, (nxt, end) in positions.items() if nxt < end}
    consumer.assign(list(partitions.values()))
    for p, tp in partitions.items():
        consumer.seek(tp, positions[p][0])
    ends = {tp: positions[p][1] for p, tp in partitions.items()}
    async for message in _until_ends(consumer, ends):
        yield message


async def _until_ends(
    consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]
) -> AsyncIterator[Message]:
    """Poll the assigned partitions until each is read to its end in `ends`."""
    open_ = set(ends)
    quiet = 0
    while open_:
        batches = await consumer.getmany(*open_, timeout_ms=_POLL_MS, max_records=100)
        quiet = 0 if batches else quiet + 1
        for tp, messages in batches.items():
            for message in messages:
                if message.offset < ends[tp]:
                    yield message
        for tp in list(open_):
            position = await consumer.position(tp)
            if quiet >= QUIET_POLLS:
                log.warning(
                    "%s: nothing from %d to %d in 30 s; taken as read", tp, position, ends[tp]
                )
            if quiet >= QUIET_POLLS or position >= ends[tp]:
                open_.discard(tp)
                consumer.pause(tp)  # the rest of it is beyond the range


async def read_originals(
    settings: Settings,
    verdict_topic: str,
    input_topic: str,
    spans: Sequence[Span],
    since_ms: int | None,
) -> dict[tuple[int, int], Original]:
    """The latest verdict on `verdict_topic` for each input record in `spans`, by (partition,
    offset): a record judged twice (at-least-once) has two, and the later one is what
    downstream consumers saw last. The topic is read from `since_ms` (when the range starts)
    less a margin, or whole when that is not known; either way to its end at the start."""
    by_partition = {span.partition: span for span in spans}
    originals: dict[tuple[int, int], Original] = {}

    def keep(message: Message) -> None:
        document = orjson.loads(message.value) if message.value else None
        source = source_of(document)
        span = by_partition.get(source.partition) if source else None
        inside = source is not None and source.topic == input_topic and span is not None
        if source is None or span is None or not (inside and span.holds(source.offset)):
            return  # outside the range: not kept, so memory is bounded by the range
        at = Source(topic=message.topic, partition=message.partition, offset=message.offset)
        original = original_from(document, at)
        if original is not None:
            originals[(source.partition, source.offset)] = original

    consumer = plain_consumer(settings)
    await consumer.start()
    try:
        await _read_from(consumer, verdict_topic, keep, since_ms)
    except ReplayRangeError:
        log.warning("verdict topic %r does not exist: no original verdicts", verdict_topic)
    finally:
        await consumer.stop()
    return originals


async def _read_from(
    consumer: AIOKafkaConsumer, topic: str, each: Callable[[Message], None], since_ms: int | None
) -> None:
    beginnings, ends = await partition_offsets(consumer, topic)
    if since_ms is not None:
        beginnings = await _offsets_at(consumer, topic, since_ms - ORIGINALS_MARGIN_MS, ends)
    positions = {p: (beginnings[p], ends[p]) for p in ends}
    async for message in read_range(consumer, topic, positions):
        try:
            each(message)
        except orjson.JSONDecodeError:
            continue  # not a verdict: nothing to supersede
