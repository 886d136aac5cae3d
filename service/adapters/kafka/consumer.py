"""Consume → judge → deliver → commit; the window, pausing, rebalances and shutdown.

1. Records are taken from the input topic while the window has room: at most
   `max_in_flight` records and `max_in_flight_bytes` of values not yet finished. A full window
   is waited out without polling (pausing would make aiokafka drop and re-fetch what it
   prefetched); while the guard breaker is open, or before `max_poll_interval_ms` runs out,
   every assigned partition is paused and polled, so the group does not evict the member.
2. Each record is judged concurrently by `Pipeline.judge`, which always returns a verdict or a
   dead letter, and handed to the `Delivery` (`service.adapters.kafka.delivery`) with its
   topics (a verdict marked for review goes to the review topic too): at least once
   publishes it now, exactly once holds it for the next transaction.
3. Every `commit_interval_ms`, each partition's offset is committed up to its first unfinished
   record (`PartitionOffsets`), by the consumer (at least once) or inside the transaction that
   publishes those outcomes (exactly once). Commits never pass unfinished work.
4. Revoked partitions get `drain_timeout_s` to finish, are committed, and everything held for
   them is dropped; the new owner re-judges what was not committed.
5. On stop (SIGTERM): fetching stops, in-flight records get `drain_timeout_s`, the last commit
   is made, then the producer and the consumer close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from service.adapters.kafka.clients import Batches, KafkaConsumer
from service.adapters.kafka.delivery import Delivery, Outgoing, describe, destinations
from service.adapters.kafka.offsets import PartitionOffsets
from service.config import Settings
from service.core.breaker import Breaker
from service.core.pipeline import Outcome, Pipeline, Record
from service.core.positions import where
from service.core.verdicts import DeadLetter, serialize
from service.ops.metrics import Metrics
from service.ops.tracing import extract

log = logging.getLogger(__name__)
_LAG_REFRESH_S = 5.0  # Prometheus scrapes every 15 s or so: no fresher figure is needed


class Window:
    """Records taken and not yet finished, by count and by bytes of their values."""

    def __init__(self, max_records: int, max_bytes: int, metrics: Metrics) -> None:
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._sizes: dict[TopicPartition, dict[int, int]] = {}
        self.records = 0
        self.bytes = 0

    def room(self) -> int:
        """How many more records may be taken now (one at least when empty, whatever its size)."""
        if self.records and self.bytes >= self._max_bytes:
            return 0
        return max(0, self._max_records - self.records)

    def take(self, tp: TopicPartition, offset: int, size: int) -> None:
        self._sizes.setdefault(tp, {})[offset] = size
        self._changed(1, size)

    def release(self, tp: TopicPartition, offsets: Iterable[int]) -> None:
        sizes = self._sizes.get(tp, {})
        for offset in offsets:
            size = sizes.pop(offset, None)
            if size is not None:
                self._changed(-1, -size)

    def release_below(self, tp: TopicPartition, position: int) -> None:
        self.release(tp, [o for o in self._sizes.get(tp, {}) if o < position])

    def forget(self, tp: TopicPartition) -> None:
        self.release(tp, list(self._sizes.get(tp, {})))
        self._sizes.pop(tp, None)

    def _changed(self, records: int, size: int) -> None:
        self.records += records
        self.bytes += size
        self._metrics.in_flight.set(self.records)
        self._metrics.in_flight_bytes.set(self.bytes)


class Shadowing(Protocol):
    def offer(self, record: Record, live: Outcome) -> None:
        """Judge `record` with a candidate too, if there is room; returns at once."""
        ...


class ModerationConsumer:
    def __init__(
        self,
        settings: Settings,
        consumer: KafkaConsumer,
        delivery: Delivery,
        pipeline: Pipeline,
        breaker: Breaker,
        metrics: Metrics,
        tracer: Tracer,
        shadow: Shadowing | None = None,
    ) -> None:
        """`shadow`: offered every outcome, never waited on (`service.shadow`)."""
        self._settings = settings
        self._pipeline = pipeline
        self._shadow = shadow
        self._breaker = breaker
        self._metrics = metrics
        self._tracer = tracer
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._window = Window(settings.max_in_flight, settings.max_in_flight_bytes, metrics)
        self._changed = asyncio.Event()
        # One commit at a time: the revocation callback commits while the serve loop may be
        # committing too, and a transactional producer takes one transaction at a time.
        self._committing = asyncio.Lock()
        self._failure: BaseException | None = None
        self.connected = False
        self.consumer = consumer
        self._delivery = delivery

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain, commit and close. Raises if delivery failed."""
        await self._delivery.start()
        try:
            await self.consumer.start()
            self.connected = True
            try:
                self.consumer.subscribe([self._settings.input_topic], listener=_Rebalance(self))
                log.info(
                    "consuming %s as group %s (%s); verdicts to %s (those for review to %s "
                    "too), dead letters to %s",
                    self._settings.input_topic,
                    self._settings.group_id,
                    self._settings.delivery,
                    self._settings.verdict_topic,
                    self._settings.review_topic,
                    self._settings.dead_letter_topic,
                )
                lag = asyncio.create_task(self._watch_lag(stop))
                try:
                    await self._serve(stop)
                finally:
                    lag.cancel()
                await self._drain(self._all_tasks())
                await self._commit()
            finally:
                self.connected = False
                await self._close_consumer()
        finally:
            await self._delivery.stop()
        if self._failure is not None:
            raise self._failure

    async def _serve(self, stop: asyncio.Event) -> None:
        # The event loop's clock (time.monotonic) is the one asyncio's timeouts use, so one
        # virtual clock drives both in tests.
        clock = asyncio.get_running_loop().time
        next_commit = clock()
        interval = self._settings.commit_interval_ms / 1000
        # A member that does not poll within max.poll.interval.ms is dropped from the group.
        must_poll_s = self._settings.max_poll_interval_ms / 2000
        last_poll = clock()
        while not stop.is_set() and self._failure is None:
            room = self._window.room()
            if room > 0 and not self._breaker.is_open:
                self._resume()
                batches = await self._poll(
                    stop, timeout_ms=min(100, int(interval * 1000)), max_records=room
                )
                last_poll = clock()
            elif self._breaker.is_open or clock() - last_poll > must_poll_s:
                # Paused, and polled only to stay in the group. Pausing makes aiokafka drop
                # what it prefetched, so a merely full window is waited out without it.
                self._pause_all()
                batches = await self._poll(stop, timeout_ms=0, max_records=1)
                last_poll = clock()
                await self._until_changed(stop, max_wait_s=min(1.0, interval))
            else:
                batches = {}
                await self._until_changed(stop, max_wait_s=min(1.0, interval))
            # Whatever a poll returned is taken, even past the window: a partition assigned
            # since the pause is not paused, and a record handed out is never dropped.
            for tp, messages in batches.items():
                for message in messages:
                    self._start(tp, message)
            if clock() >= next_commit:
                await self._commit()
                next_commit = clock() + interval

    async def _poll(self, stop: asyncio.Event, timeout_ms: int, max_records: int) -> Batches:
        """getmany, given up when stop is set: during a rebalance aiokafka waits for the new
        assignment whatever the timeout, and a rebalance that never completes must not keep
        SIGTERM from working. Nothing is lost by cancelling: records are handed out only when
        getmany returns."""
        fetch = asyncio.ensure_future(
            self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        )
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([fetch, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if fetch.done():
            return fetch.result()
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        return {}

    async def _close_consumer(self) -> None:
        """Leave the group; bounded, since leaving during a stuck rebalance can hang."""
        try:
            async with asyncio.timeout(self._settings.drain_timeout_s):
                await self.consumer.stop()
        except TimeoutError:
            log.warning(
                "the consumer did not close in %.0fs; exiting anyway",
                self._settings.drain_timeout_s,
            )

    def _pause_all(self) -> None:
        unpaused = self.consumer.assignment() - self.consumer.paused()
        if unpaused:
            self.consumer.pause(*unpaused)

    async def _until_changed(self, stop: asyncio.Event, max_wait_s: float) -> None:
        """Wait until a record finishes or is committed, the breaker closes, or stop."""
        self._changed.clear()
        waits: list[asyncio.Future[object]] = [
            asyncio.ensure_future(self._changed.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        if self._breaker.is_open:
            waits.append(asyncio.ensure_future(self._breaker.wait_closed()))
        try:
            await asyncio.wait(waits, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _resume(self) -> None:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    def _start(self, tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> None:
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        if not offsets.is_new(message.offset):
            # The client moved back on a partition it kept (an offset reset after a broker
            # restart): this record was taken already and is finished or in flight.
            log.warning("skipping %s: already taken", where(tp.topic, tp.partition, message.offset))
            return
        offsets.take(message.offset)
        self._window.take(tp, message.offset, len(message.value or b""))
        self._metrics.consumed.labels(tp.topic, str(tp.partition)).inc()
        task = asyncio.create_task(self._handle(tp, record_from(message), offsets))
        self._tasks.setdefault(tp, set()).add(task)
        task.add_done_callback(lambda t: self._finished(tp, t))

    def _finished(self, tp: TopicPartition, task: asyncio.Task[None]) -> None:
        self._tasks.get(tp, set()).discard(task)
        self._changed.set()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    async def _handle(self, tp: TopicPartition, record: Record, offsets: PartitionOffsets) -> None:
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
            if self._shadow is not None:
                self._shadow.offer(record, outcome)
            if outcome.event_id is not None:
                span.set_attribute("messaging.message.id", outcome.event_id)
            if isinstance(outcome, DeadLetter):
                span.set_attribute("error.type", outcome.error.code)
                span.set_status(Status(StatusCode.ERROR, outcome.error.message))
                log.warning(
                    "dead letter %s for %s: %s",
                    outcome.error.code,
                    record.where,
                    outcome.error.message,
                    extra={"event_id": outcome.event_id, "code": outcome.error.code},
                )
            else:
                span.set_attribute("guardstream.rating", outcome.rating)
                span.set_attribute("guardstream.category_code", outcome.category_code)
                log.debug(
                    "verdict %s %s for %s",
                    outcome.rating,
                    outcome.category_code,
                    record.where,
                    extra={"event_id": outcome.event_id},
                )
            topic, also_to = destinations(self._settings, outcome)
            published = await self._delivery.hand_over(
                Outgoing(
                    source=tp,
                    offset=record.offset,
                    topic=topic,
                    also_to=also_to,
                    key=record.key,
                    value=serialize(outcome),
                    outcome=outcome,
                    timestamp_ms=record.timestamp_ms,
                    context=otel_context.get_current(),
                )
            )
        offsets.finish(record.offset)
        if published:
            self._window.release(tp, [record.offset])

    async def _commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit each partition up to its first unfinished record, if that moved."""
        async with self._committing:
            await self._commit_now(partitions)

    async def _commit_now(self, partitions: Iterable[TopicPartition] | None) -> None:
        wanted = self.consumer.assignment() if partitions is None else set(partitions)
        offsets = {}
        for tp in wanted:
            tracker = self._offsets.get(tp)
            position = tracker.committable() if tracker else None
            if position is not None and position != self._committed.get(tp):
                offsets[tp] = position
        if not offsets:
            return
        committed = await self._delivery.commit(offsets)
        for tp, position in committed.items():
            self._committed[tp] = position
            self._window.release_below(tp, position)
            self._metrics.committed.labels(tp.topic, str(tp.partition)).set(position)
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(highwater - position)
        if committed:
            self._changed.set()
            log.debug("committed %s", describe(committed))

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        """Refresh each owned partition's lag from the broker: set only at commits, it would
        freeze just when the consumer is stuck and the alerts need to see it grow."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _LAG_REFRESH_S)
            assigned = self.consumer.assignment()
            try:
                async with asyncio.timeout(_LAG_REFRESH_S):
                    ends = await self.consumer.end_offsets(sorted(assigned))
                    for tp, end in ends.items():
                        committed = self._committed.get(tp)
                        if committed is None:
                            committed = await self.consumer.committed(tp)
                        if committed is not None and tp in self.consumer.assignment():
                            self._metrics.lag.labels(tp.topic, str(tp.partition)).set(
                                max(0, end - committed)
                            )
            except Exception as exc:  # the next round tries again; a bug is worth a warning
                quiet = isinstance(exc, KafkaError | TimeoutError)
                log.log(logging.DEBUG if quiet else logging.WARNING, "lag not refreshed: %r", exc)

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
        try:
            await self._drain(tasks)
            await self._commit(revoked)
        finally:
            # Whatever happened, these partitions are no longer ours to track.
            self._delivery.forget(revoked)
            for tp in revoked:
                self._offsets.pop(tp, None)
                self._committed.pop(tp, None)
                self._tasks.pop(tp, None)
                self._window.forget(tp)
                self._metrics.forget_partition(tp.topic, tp.partition)
        if revoked:
            log.info("partitions revoked: %s", _describe_partitions(revoked))

    def assignment(self) -> str:
        """The partitions this instance owns, in words (for /readyz)."""
        assigned = self.consumer.assignment()
        return f"{len(assigned)} partitions assigned" if assigned else "waiting for an assignment"


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: ModerationConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._consumer.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _describe_partitions(assigned))


def record_from(message: ConsumerRecord[bytes, bytes]) -> Record:
    """A consumed record as the pipeline takes it."""
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers),
        timestamp_ms=message.timestamp,
    )


def _describe_partitions(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(where(tp.topic, tp.partition) for tp in sorted(partitions)) or "none"
