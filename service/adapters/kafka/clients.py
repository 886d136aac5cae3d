"""The Kafka clients as the few calls this service makes of them, and the one place they are built.

`ModerationConsumer` and the deliveries (`service.adapters.kafka.delivery`) reach Kafka only
through `KafkaConsumer` and `KafkaProducer`, so their rules (commits, pausing, rebalances,
shutdown, transaction retries) are tested in-process with scripted fakes under a virtual clock
(`tests/support/kafka.py`). `consumer_from` and `producer_factory` build the aiokafka clients
those protocols stand for from `Settings`; `service.app` calls them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import RecordMetadata

from service.config import Settings

Batches = Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
"""What one poll returns: the records fetched, by partition, in offset order."""


class KafkaConsumer(Protocol):
    """What the service calls of a group member (`aiokafka.AIOKafkaConsumer`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Leave the group and close."""
        ...

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None: ...

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Batches:
        """Records of the assigned, unpaused partitions; waits up to `timeout_ms` for some."""
        ...

    def assignment(self) -> set[TopicPartition]: ...

    def paused(self) -> set[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def highwater(self, partition: TopicPartition) -> int | None:
        """The offset the next record of `partition` will get, if known (for the lag)."""
        ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...

    async def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset of `partition`, asked of the broker."""
        ...

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's end (the offset its next record will get), asked of the broker."""
        ...

    async def topics(self) -> set[str]:
        """The topics the cluster shows (a metadata request: readiness)."""
        ...


class KafkaProducer(Protocol):
    """What the service calls of a producer (`aiokafka.AIOKafkaProducer`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        *,
        headers: list[tuple[str, bytes]],
    ) -> asyncio.Future[RecordMetadata]:
        """Queue a record; the future resolves when the broker acknowledges it."""
        ...

    async def begin_transaction(self) -> None: ...

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None: ...

    async def commit_transaction(self) -> None: ...

    async def abort_transaction(self) -> None: ...


def consumer_from(settings: Settings) -> KafkaConsumer:
    """The group member that reads the input topic; offsets are committed by the service only,
    and records of aborted transactions are never read."""
    consumer: KafkaConsumer = AIOKafkaConsumer(
        **settings.kafka_connection(),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        isolation_level="read_committed",
        group_instance_id=settings.group_instance_id or None,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(1000, settings.session_timeout_ms // 3),
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    return consumer


def producer_factory(settings: Settings) -> Callable[[], KafkaProducer]:
    """Makes the producer `settings.delivery` needs, again each time a broken one is replaced:
    idempotent with acks from all replicas (at least once), or transactional (exactly once)."""
    options: dict[str, Any] = (
        {"transactional_id": transactional_id(settings)}
        if settings.delivery == "exactly-once"
        else {"acks": "all", "enable_idempotence": settings.enable_idempotence}
    )

    def new_producer() -> KafkaProducer:
        producer: KafkaProducer = AIOKafkaProducer(
            **settings.kafka_connection(), **options, linger_ms=5
        )
        return producer

    return new_producer


def transactional_id(settings: Settings) -> str:
    """This instance's transactional id: stable across restarts, so that a restarted instance
    fences its predecessor."""
    return settings.transactional_id or (
        f"{settings.group_id}-{settings.group_instance_id or socket.gethostname()}"
    )
