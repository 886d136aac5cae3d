"""Consume → judge → publish → commit, at least once.

The delivery contract lives here and nowhere else:

1. Records are taken from the input topic while fewer than `max_in_flight` are unfinished;
   when the window is full the assigned partitions are paused and the consumer keeps polling,
   so the group does not evict it for being slow.
2. Each record is judged concurrently by `Pipeline.judge`, which always returns a verdict or a
   dead letter.
3. That outcome is published with an idempotent, `acks=all` producer; the record counts as
   finished only once the broker has acknowledged the outcome.
4. Every `commit_interval_ms`, and when partitions are revoked or the service stops, each
   partition's offset is committed up to its first unfinished record (`PartitionOffsets`), so
   outcomes are published in any order but commits never pass unfinished work.
5. A publish that fails even after the producer's own retries stops the service without
   committing that record: it is judged again after a restart rather than lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from service.config import Settings
from service.offsets import PartitionOffsets
from service.pipeline import Outcome, Pipeline, Record
from service.tracing import extract, inject
from service.verdicts import DeadLetter, serialize

log = logging.getLogger(__name__)

_JSON = ("content-type", b"application/json")


class PublishFailed(Exception):
    """An outcome could not be published; its record must not be committed."""


class ModerationConsumer:
    def __init__(self, settings: Settings, pipeline: Pipeline, tracer: Tracer) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._tracer = tracer
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._slot_freed = asyncio.Event()
        self._failure: BaseException | None = None
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.group_id,
            client_id=settings.client_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            isolation_level="read_committed",
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )

    @property
    def in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._tasks.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain, commit and close. Raises if publishing failed."""
        await self._producer.start()
        try:
            await self._consumer.start()
            try:
                self._consumer.subscribe([self._settings.input_topic], listener=_Rebalance(self))
                log.info(
                    "consuming %s as group %s; verdicts to %s, dead letters to %s",
                    self._settings.input_topic,
                    self._settings.group_id,
                    self._settings.verdict_topic,
                    self._settings.dead_letter_topic,
                )
                await self._serve(stop)
                await self._drain(self._all_tasks())
                await self._commit()
            finally:
                await self._consumer.stop()
        finally:
            await self._producer.stop()
        if self._failure is not None:
            raise self._failure

    async def _serve(self, stop: asyncio.Event) -> None:
        next_commit = time.monotonic()
        interval = self._settings.commit_interval_ms / 1000
        while not stop.is_set() and self._failure is None:
            free = self._settings.max_in_flight - self.in_flight
            if free > 0:
                self._resume()
            else:
                await self._wait_for_slot(stop)
            # Polled even when paused: aiokafka counts polls to decide we are still alive.
            # Whatever it returns is taken (a partition assigned since the pause is not paused).
            batches = await self._consumer.getmany(
                timeout_ms=100 if free > 0 else 0, max_records=max(free, 1)
            )
            for tp, messages in batches.items():
                for message in messages:
                    self._start(tp, message)
            if time.monotonic() >= next_commit:
                await self._commit()
                next_commit = time.monotonic() + interval

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        """Window full: pause fetching until a record finishes (or a second passes)."""
        unpaused = self._consumer.assignment() - self._consumer.paused()
        if unpaused:
            self._consumer.pause(*unpaused)
        self._slot_freed.clear()
        waits = [asyncio.ensure_future(self._slot_freed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _resume(self) -> None:
        paused = self._consumer.paused()
        if paused:
            self._consumer.resume(*paused)

    def _start(self, tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        offsets.take(message.offset)
        task = asyncio.create_task(self._handle(_record(message), offsets))
        tasks = self._tasks.setdefault(tp, set())
        tasks.add(task)
        task.add_done_callback(lambda t: self._finished(tp, t))

    def _finished(self, tp: TopicPartition, task: asyncio.Task[None]) -> None:
        self._tasks.get(tp, set()).discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    async def _handle(self, record: Record, offsets: PartitionOffsets) -> None:
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self._settings.group_id,
            "messaging.message.body.size": len(record.value or b""),
        }
        with self._tracer.start_as_current_span(
            f"{record.topic} process",
            context=extract(record.headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            outcome = await self._pipeline.judge(record)
            if outcome.event_id is not None:
                span.set_attribute("messaging.message.id", outcome.event_id)
            if isinstance(outcome, DeadLetter):
                span.set_attribute("error.type", outcome.error.code)
                span.set_status(Status(StatusCode.ERROR, outcome.error.message))
            else:
                span.set_attribute("guardstream.rating", outcome.rating)
                span.set_attribute("guardstream.category_code", outcome.category_code)
            await self._publish(outcome, record)
        offsets.finish(record.offset)
        if isinstance(outcome, DeadLetter):
            log.warning(
                "dead letter %s for %s: %s",
                outcome.error.code,
                record.where,
                outcome.error.message,
            )
        else:
            log.debug("verdict %s %s for %s", outcome.rating, outcome.category_code, record.where)

    async def _publish(self, outcome: Outcome, record: Record) -> None:
        topic = (
            self._settings.dead_letter_topic
            if isinstance(outcome, DeadLetter)
            else self._settings.verdict_topic
        )
        with self._tracer.start_as_current_span(
            f"{topic} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": topic,
            },
        ):
            headers = [*inject(), _JSON]
            if outcome.event_id is not None:
                headers.append(("event-id", outcome.event_id.encode()))
            if isinstance(outcome, DeadLetter):
                headers.append(("error-code", outcome.error.code.encode()))
            try:
                delivery = await self._producer.send(
                    topic, value=serialize(outcome), key=record.key, headers=headers
                )
                await delivery
            except KafkaError as exc:
                raise PublishFailed(
                    f"could not publish the outcome of {record.where} to {topic}: {exc!r}"
                ) from exc

    async def _commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit each partition up to its first unfinished record, if that moved."""
        wanted = self._consumer.assignment() if partitions is None else set(partitions)
        offsets = {}
        for tp in wanted:
            tracker = self._offsets.get(tp)
            position = tracker.committable() if tracker else None
            if position is not None and position != self._committed.get(tp):
                offsets[tp] = position
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: the offsets stay uncommitted and are tried again next interval; if
            # the partition moved to another member meanwhile, it re-judges those records.
            log.warning("commit of %s failed: %r", _describe(offsets), exc)
            return
        self._committed.update(offsets)
        log.debug("committed %s", _describe(offsets))

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self._settings.drain_timeout_s)
        if late:
            log.warning(
                "%d events unfinished after %.1fs drain; they will be judged again",
                len(late),
                self._settings.drain_timeout_s,
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _all_tasks(self) -> set[asyncio.Task[None]]:
        return set().union(*self._tasks.values()) if self._tasks else set()

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Finish (or give up) what the revoked partitions have in flight and commit it."""
        tasks: set[asyncio.Task[None]] = set()
        for tp in revoked:
            tasks |= self._tasks.get(tp, set())
        await self._drain(tasks)
        await self._commit(revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
            self._committed.pop(tp, None)
            self._tasks.pop(tp, None)
        if revoked:
            log.info("partitions revoked: %s", _describe_partitions(revoked))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: ModerationConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._consumer.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _describe_partitions(assigned))


def _record(message: ConsumerRecord[bytes, bytes]) -> Record:
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers),
    )


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]={o}" for tp, o in sorted(offsets.items()))


def _describe_partitions(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"
