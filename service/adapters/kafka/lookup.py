"""Find one event in the input topic by its id: what `python -m service ask EVENT_ID` judges.

A reviewer holds a verdict, which names the event, not where it was read. Events are keyed by
their id (`service.client`), so the scan compares keys first and parses only records whose key
or value could be the event: a topic of a million events is read, not decoded. The scan reads
committed records only, from the beginning of every partition to the end it saw at the start,
and gives up after `max_records` so that a mistyped id does not read a topic of any size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.config import Settings
from service.core.errors import EventRejected
from service.core.events import (
    EventLimits,
    ImageEvent,
    RawImageEvent,
    is_raw_image,
    parse_event,
    parse_raw_event,
)


class EventNotFound(LookupError):
    """No such event in the topic, or not within the scan's bounds."""


@dataclass(frozen=True)
class FoundEvent:
    event: ImageEvent | RawImageEvent
    topic: str
    partition: int
    offset: int

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def matching_event(
    record: ConsumerRecord[bytes, bytes], event_id: str, limits: EventLimits
) -> ImageEvent | RawImageEvent | None:
    """The record's event when it is `event_id`'s, else None (a record that cannot be parsed is
    not the one looked for: the service dead-lettered it, it did not judge it)."""
    wanted = event_id.encode()
    headers = list(record.headers)
    if record.key != wanted and (record.value is None or wanted not in record.value):
        return None
    try:
        event = (
            parse_raw_event(record.value, record.key, headers, limits)
            if is_raw_image(headers)
            else parse_event(record.value, limits)
        )
    except EventRejected:
        return None
    return event if event.event_id == event_id else None


async def find_event(
    settings: Settings, event_id: str, *, max_records: int = 1_000_000, timeout_s: float = 60.0
) -> FoundEvent:
    """The newest event of `settings.input_topic` with this id; EventNotFound when none is."""
    limits = EventLimits(
        max_event_bytes=settings.max_event_bytes, max_metadata_bytes=settings.max_metadata_bytes
    )
    topic = settings.input_topic
    consumer = AIOKafkaConsumer(
        **settings.kafka_connection(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        await consumer.start()  # inside: a consumer that failed to start still has to close
        await consumer.topics()  # a consumer with no subscription has no metadata until asked
        numbers = consumer.partitions_for_topic(topic) or set()
        partitions = [TopicPartition(topic, number) for number in sorted(numbers)]
        if not partitions:
            raise EventNotFound(f"topic {topic!r} does not exist or has no partitions")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: FoundEvent | None = None
        scanned = 0
        deadline = time.monotonic() + timeout_s
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining and scanned < max_records and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            for tp, records in batches.items():
                for record in records:
                    scanned += 1
                    event = matching_event(record, event_id, limits)
                    if event is not None:
                        found = FoundEvent(event, topic, record.partition, record.offset)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        if found is not None:
            return found
        stopped = "" if not remaining else f" (stopped after {scanned} records, before the end)"
        raise EventNotFound(f"no event {event_id!r} in topic {topic!r}{stopped}")
    finally:
        await consumer.stop()
