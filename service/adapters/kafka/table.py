"""A compacted topic read as a table: every key's latest value, kept up to date.

The hash-bank entries (`guardstream.banks`) and the reviewers' decisions (`verdicts.decisions`)
are compacted topics: a key's newest record is its value, a tombstone (no value) removes it.
Every consumer pod reads such a topic whole, from the beginning, before it judges anything (so
a restarted pod knows every decision at once), then follows it, so that an entry added or
removed anywhere reaches every pod within a poll.

No consumer group: each pod reads every partition itself and commits nothing, since the table
is rebuilt from the topic at each start. Only committed records are read (`read_committed`).

`apply(key, value, where)` is the table's own code (`service.core.known`): it parses the value
and returns False for a record it cannot use, which is counted and logged with its position,
never raised. A record's key may be None only for records the writer got wrong: those are
counted too.

`ensure_table_topic` creates such a topic where it is missing (the banks topic, a redrive
ledger): compacted, one partition, min(3, brokers) replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from service.adapters.kafka.ranges import plain_consumer
from service.config import Settings
from service.core.positions import where

log = logging.getLogger(__name__)

Apply = Callable[[bytes, bytes | None, str], bool]
"""(key, value or None for a tombstone, "topic[partition]@offset") -> whether it was usable."""


class TableReader:
    """Reads `topic` into `apply`: `load()` to the end, then `follow()` until stopped."""

    def __init__(self, settings: Settings, topic: str, apply: Apply) -> None:
        self.topic = topic
        self._settings = settings
        self._apply = apply
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self.records = 0
        self.rejected = 0

    async def load(self, timeout_s: float) -> None:
        """Read every record there is now; TimeoutError if that takes longer than timeout_s."""
        consumer = plain_consumer(self._settings)
        self._consumer = consumer
        await consumer.start()
        await consumer.topics()  # a consumer with no subscription has no metadata until asked
        numbers = consumer.partitions_for_topic(self.topic)
        if not numbers:
            raise LookupError(f"topic {self.topic!r} does not exist")
        partitions = [TopicPartition(self.topic, number) for number in sorted(numbers)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        started = time.monotonic()
        async with asyncio.timeout(timeout_s):
            while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
                await self._poll(consumer, timeout_ms=200)
        log.info(
            "read %s: %d records (%d unusable) in %.1fs",
            self.topic,
            self.records,
            self.rejected,
            time.monotonic() - started,
        )

    def follow(self) -> None:
        """Apply new records as they come, in the background, until `stop()`."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("load() first")

        async def poll_forever() -> None:
            while True:
                await self._poll(consumer, timeout_ms=1000)

        self._follower = asyncio.create_task(poll_forever(), name=f"table {self.topic}")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._consumer is not None:
            await self._consumer.stop()

    async def _poll(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> None:
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=1000)
        for records in batches.values():
            for record in records:
                self._one(record)

    def _one(self, record: ConsumerRecord[bytes, bytes]) -> None:
        self.records += 1
        position = where(record.topic, record.partition, record.offset)
        if record.key is None:
            self.rejected += 1
            log.warning("%s: record without a key skipped (a table needs keys)", position)
        elif not self._apply(record.key, record.value, position):
            self.rejected += 1  # apply logged why


async def ensure_table_topic(settings: Settings, topic: str) -> bool:
    """Create `topic`, compacted, unless it exists; True when this call created it.

    aiokafka returns the broker's per-topic errors in the response instead of raising them:
    "already exists" means another writer was quicker (fine); any other error (a policy that
    forbids creating topics, an invalid config) is raised as the KafkaError its code names.
    """
    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    try:
        await admin.start()
        if topic in await admin.list_topics():
            return False
        # Three copies where the cluster has three brokers: the table outlives a lost broker.
        replicas = min(3, len((await admin.describe_cluster())["brokers"]))
        compact = {"cleanup.policy": "compact"}
        response = await admin.create_topics([NewTopic(topic, 1, replicas, topic_configs=compact)])
        for _, code, *message in response.topic_errors:
            error = for_code(code)
            if code and error is not TopicAlreadyExistsError:
                raise error(f"creating {topic!r}: {message[0] if message else ''}")
        return all(code == 0 for _, code, *_ in response.topic_errors)
    finally:
        await admin.close()
