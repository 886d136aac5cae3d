"""Getting outcomes to the broker and offsets committed: at least once, or exactly once.

`service.adapters.kafka.consumer` judges records concurrently and hands each outcome to a
`Delivery`, with the topics it goes to (`destinations`): a dead letter to the dead-letter topic,
a verdict to the verdict topic and, when it is marked for review (`Verdict.review`), the same
record to the review topic too.

- `AtLeastOnce` publishes it at once with an idempotent producer, to each of its topics
  concurrently, and reports it finished when the broker has acknowledged every one; offsets
  are committed by the consumer afterwards, so a crash between the two re-publishes at most
  the records in flight.
- `ExactlyOnce` keeps outcomes until the next commit and then, in one Kafka transaction, adds
  the consumed offsets (`send_offsets_to_transaction`) and publishes the outcomes of every
  partition's finished prefix, to each of their topics. Consumers reading with
  `read_committed` see each outcome once on each of its topics: an aborted or interrupted
  transaction leaves neither outcomes nor offsets behind.

aiokafka 0.14 has two known transaction bugs that shape the commit: a race when offsets are
added after the records of the same transaction (aiokafka issue 1004: add them first) and a
KeyError when offset commits of one producer overlap (issue 1098: one `send_offsets_to_
transaction` per transaction, one transaction at a time).

Broker errors that may pass (connection lost, leader moved, timeouts) are retried until
`publish_timeout_s`; a producer that cannot continue (sequence numbers lost when a broker died
mid-write) is replaced. What is still failing after that stops the service, uncommitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
)
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer

from service.adapters.kafka.clients import KafkaConsumer, KafkaProducer, transactional_id
from service.config import Settings
from service.core.backoff import exponential
from service.core.pipeline import Outcome
from service.core.positions import where
from service.core.verdicts import DeadLetter
from service.ops.metrics import Metrics, exemplar
from service.ops.tracing import inject

log = logging.getLogger(__name__)

_JSON = ("content-type", b"application/json")
_PRODUCER_BROKEN = (OutOfOrderSequenceNumber,)
_PUBLISH_FIRST_BACKOFF_S = 0.1
_PUBLISH_MAX_BACKOFF_S = 5.0


class PublishFailed(Exception):
    """Outcomes could not be published in time, or this instance was fenced: stop, uncommitted."""


@dataclass(frozen=True)
class Outgoing:
    """One outcome as the record to publish, with what metrics and tracing need."""

    source: TopicPartition
    offset: int
    topic: str
    key: bytes | None
    value: bytes
    outcome: Outcome
    timestamp_ms: int | None
    context: Context
    """The trace context of the record's process span: the publish span's parent."""
    also_to: tuple[str, ...] = ()
    """Topics the same record goes to besides `topic`: the review topic, for a verdict marked
    for review."""

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.topic, *self.also_to)

    @property
    def where(self) -> str:
        """The record this is the outcome of, as `topic[partition]@offset`."""
        return where(self.source.topic, self.source.partition, self.offset)

    def headers(self) -> list[tuple[str, bytes]]:
        """The current (publish) span's context, the content type, the event id, the code."""
        headers = [*inject(), _JSON]
        if self.outcome.event_id is not None:
            headers.append(("event-id", self.outcome.event_id.encode()))
        if isinstance(self.outcome, DeadLetter):
            headers.append(("error-code", self.outcome.error.code.encode()))
        return headers


class Delivery(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def hand_over(self, outgoing: Outgoing) -> bool:
        """Take an outcome; True when it is already safely published (the record finished)."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int]:
        """Commit the finished prefix of each partition; the positions actually committed."""
        ...

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop what is held for partitions this instance no longer owns."""
        ...


def destinations(settings: Settings, outcome: Outcome) -> tuple[str, tuple[str, ...]]:
    """The topic an outcome is published to, and the topics the same record also goes to."""
    if isinstance(outcome, DeadLetter):
        return settings.dead_letter_topic, ()
    if outcome.review:  # its action is review, or quality sampling picked it
        return settings.verdict_topic, (settings.review_topic,)
    return settings.verdict_topic, ()


def retriable(exc: KafkaError) -> bool:
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, (KafkaConnectionError, KafkaTimeoutError, *_PRODUCER_BROKEN)
    )


class _Producer:
    """One producer, replaced when it breaks (by whichever caller sees it first)."""

    def __init__(self, factory: Callable[[], KafkaProducer]) -> None:
        self._factory = factory
        self.current = factory()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.current.start()

    async def stop(self) -> None:
        await self.current.stop()

    async def replace(self, broken: KafkaProducer) -> None:
        async with self._lock:
            if self.current is not broken:
                return
            log.warning("replacing the Kafka producer after an error it cannot recover from")
            fresh = self._factory()
            await fresh.start()
            # Swapped before the old one closes: a send failing on it with ProducerClosed
            # sees that it was replaced and retries on the new one.
            self.current = fresh
            with contextlib.suppress(KafkaError):  # it is broken: a clean close is a bonus
                await broken.stop()


def _record_outcome(metrics: Metrics, outgoing: Outgoing) -> None:
    outcome = outgoing.outcome
    if isinstance(outcome, DeadLetter):
        metrics.dead_letter(outcome.error.code)
    else:
        metrics.verdicts.labels(outcome.rating, outcome.category_code).inc()
        if outcome.action is not None and outcome.would_action is not None:
            metrics.decisions.labels(outcome.action, outcome.would_action).inc()
    if outgoing.also_to:  # the review topic, the only one a record goes to besides its own
        metrics.reviews.inc()
    if outgoing.timestamp_ms is not None and outgoing.timestamp_ms > 0:
        metrics.end_to_end_latency.observe(
            max(0.0, time.time() - outgoing.timestamp_ms / 1000), exemplar(outcome.trace_id)
        )


def _publish_span(
    tracer: Tracer, topic: str, parent: Context | None = None
) -> contextlib.AbstractContextManager[Span]:
    """The PRODUCER span of one record's publication to one topic (current while it lasts)."""
    return tracer.start_as_current_span(
        f"{topic} publish",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": topic,
        },
    )


async def _together(publications: list[Coroutine[Any, Any, None]]) -> None:
    """Await all at once; the first to fail cancels the others and is raised as it is."""
    if len(publications) == 1:
        return await publications[0]  # the usual case costs no task
    tasks = [asyncio.ensure_future(publication) for publication in publications]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class AtLeastOnce:
    def __init__(
        self,
        settings: Settings,
        consumer: KafkaConsumer,
        new_producer: Callable[[], KafkaProducer],
        metrics: Metrics,
        tracer: Tracer,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._metrics = metrics
        self._tracer = tracer
        self._producer = _Producer(new_producer)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def hand_over(self, outgoing: Outgoing) -> bool:
        # Finished once every topic's copy is acknowledged; a failure of either stops the
        # service uncommitted, and whoever judges the record again publishes both again.
        await _together([self._publish(outgoing, topic) for topic in outgoing.topics])
        _record_outcome(self._metrics, outgoing)
        return True

    async def _publish(self, outgoing: Outgoing, topic: str) -> None:
        with _publish_span(self._tracer, topic):
            await self._send_until_acknowledged(outgoing, topic, outgoing.headers())

    async def _send_until_acknowledged(
        self, outgoing: Outgoing, topic: str, headers: list[tuple[str, bytes]]
    ) -> None:
        clock = asyncio.get_running_loop().time  # the clock of asyncio's timeouts, as elsewhere
        deadline = clock() + self._settings.publish_timeout_s
        for attempt in itertools.count():
            backoff = exponential(attempt, _PUBLISH_FIRST_BACKOFF_S, _PUBLISH_MAX_BACKOFF_S)
            producer = self._producer.current
            try:
                delivery = await producer.send(
                    topic, value=outgoing.value, key=outgoing.key, headers=headers
                )
                await delivery
                return
            except KafkaError as exc:
                replaced = producer is not self._producer.current  # closed by another task
                if not (replaced or retriable(exc)) or clock() + backoff > deadline:
                    raise PublishFailed(
                        f"could not publish the outcome of {outgoing.where} to {topic}: {exc!r}"
                    ) from exc
                log.warning("publish to %s failed, retrying: %r", topic, exc)
                if isinstance(exc, _PRODUCER_BROKEN) and not replaced:
                    await self._producer.replace(producer)
            self._metrics.publish_retries.inc()
            await asyncio.sleep(backoff)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int]:
        try:
            await self._consumer.commit(dict(offsets))
        except KafkaError as exc:
            # Not fatal: the offsets stay uncommitted and are tried again next interval; if
            # the partition moved to another member meanwhile, it re-judges those records.
            log.warning("commit of %s failed: %r", describe(offsets), exc)
            return {}
        return offsets

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Nothing is held: every outcome is published as soon as it exists."""


class ExactlyOnce:
    def __init__(
        self,
        settings: Settings,
        new_producer: Callable[[], KafkaProducer],
        metrics: Metrics,
        tracer: Tracer,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tracer = tracer
        self.transactional_id = transactional_id(settings)
        self._producer = _Producer(new_producer)
        self._held: dict[TopicPartition, dict[int, Outgoing]] = {}
        self._failing_since: float | None = None

    async def start(self) -> None:
        # Starting registers the transactional id with the coordinator, which aborts whatever
        # a previous instance with the same id left open and fences it from committing more.
        await self._producer.start()
        log.info("exactly-once delivery with transactional id %r", self.transactional_id)

    async def stop(self) -> None:
        await self._producer.stop()

    async def hand_over(self, outgoing: Outgoing) -> bool:
        self._held.setdefault(outgoing.source, {})[outgoing.offset] = outgoing
        return False

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int]:
        batch = [
            outgoing
            for tp, position in offsets.items()
            for offset, outgoing in sorted(self._held.get(tp, {}).items())
            if offset < position
        ]
        producer = self._producer.current
        try:
            await self._transaction(producer, offsets, batch)
        except ProducerFenced as exc:
            raise PublishFailed(
                f"transactional id {self.transactional_id!r} was taken over by another "
                "instance; this one stops"
            ) from exc
        except (KafkaError, TimeoutError, KeyError) as exc:
            # KeyError: aiokafka issue 1098, raised from its sender on overlapping commits.
            self._failed(exc)
            await self._producer.replace(producer)
            return {}
        self._failing_since = None
        for outgoing in batch:
            del self._held[outgoing.source][outgoing.offset]
            _record_outcome(self._metrics, outgoing)
        return offsets

    async def _transaction(
        self,
        producer: KafkaProducer,
        offsets: Mapping[TopicPartition, int],
        batch: list[Outgoing],
    ) -> None:
        async with asyncio.timeout(self._settings.publish_timeout_s):
            await producer.begin_transaction()
            try:
                await producer.send_offsets_to_transaction(dict(offsets), self._settings.group_id)
                deliveries = [
                    await self._send(producer, outgoing, topic)
                    for outgoing in batch
                    for topic in outgoing.topics
                ]
                await asyncio.gather(*deliveries)
            except BaseException:
                await _abort(producer)
                raise
            await producer.commit_transaction()

    async def _send(
        self, producer: KafkaProducer, outgoing: Outgoing, topic: str
    ) -> asyncio.Future[object]:
        parent = trace.set_span_in_context(trace.get_current_span(outgoing.context))
        with _publish_span(self._tracer, topic, parent):
            future: asyncio.Future[object] = await producer.send(
                topic, value=outgoing.value, key=outgoing.key, headers=outgoing.headers()
            )
            return future

    def _failed(self, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:  # not `or`: a virtual clock may well read 0.0
            self._failing_since = now
        if now - self._failing_since > self._settings.publish_timeout_s:
            raise PublishFailed(
                f"transactions failing for {now - self._failing_since:.0f}s: {exc!r}"
            ) from exc
        self._metrics.publish_retries.inc()
        log.warning("transaction failed, outcomes kept for the next one: %r", exc)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._held.pop(tp, None)


def delivery_from(
    settings: Settings,
    consumer: KafkaConsumer,
    new_producer: Callable[[], KafkaProducer],
    metrics: Metrics,
    tracer: Tracer,
) -> Delivery:
    """The delivery `settings.delivery` asks for (at least once commits through `consumer`)."""
    if settings.delivery == "exactly-once":
        return ExactlyOnce(settings, new_producer, metrics, tracer)
    return AtLeastOnce(settings, consumer, new_producer, metrics, tracer)


async def _abort(producer: KafkaProducer) -> None:
    try:
        async with asyncio.timeout(10):
            await producer.abort_transaction()
    except (KafkaError, TimeoutError) as exc:
        # The producer is replaced next; its new epoch aborts the transaction on the broker.
        log.warning("abort failed: %r", exc)


def describe(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{where(tp.topic, tp.partition)}={o}" for tp, o in sorted(offsets.items()))
