"""Kafka in memory, for in-process tests of the consumer and the deliveries under a virtual clock.

`Broker` holds the input partitions, what was published (at once, or when its transaction
committed), the group's commits, and a script of faults by call name ("send",
"commit_transaction", "consumer.stop", ...; "send <topic>" for sends to one topic): each step
an exception to raise, seconds to hang, or None to let that call through.
`FakeConsumer` and `FakeProducer` implement the protocols of `service.adapters.kafka.clients`
over it and note every call with the loop time, so that tests assert what happened when.
`Service` is a `ModerationConsumer` over them with the real `Pipeline` and a `ScriptedGuard`
(and, where a test gives one, a stand-in for the decision rules that sets verdicts' actions).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Executor, Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import RecordMetadata
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

from service.adapters.kafka.clients import Batches
from service.adapters.kafka.consumer import ModerationConsumer
from service.adapters.kafka.delivery import Outgoing, delivery_from, destinations
from service.client import encode_event, image_event
from service.config import Settings
from service.core.breaker import Breaker
from service.core.pipeline import Outcome, Record
from service.core.verdicts import Action, Verdict, serialize
from service.ops.metrics import Metrics
from tests.support.pipeline import SAFE, Deciding, ScriptedGuard, jpeg, make_pipeline

TP0 = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)

T = TypeVar("T")
Step = BaseException | float | None
"""A scripted fault: an exception to raise, seconds to hang first, or None (no fault)."""


class InlinePool(Executor):
    """Runs each job at once on the event loop's thread. A job on a real thread takes real
    time, during which looptime may move the virtual clock to the next timer; inline, decoding
    takes no virtual time at all and exact times stay exact."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            done.set_exception(exc)
        return done


def event(number: int) -> bytes:
    """The value of a valid image event (about 1 KB)."""
    return encode_event(image_event(f"ev-{number}", image=jpeg()))


def now() -> float:
    return asyncio.get_running_loop().time()


@dataclass(frozen=True)
class Published:
    """A record on an output topic, readable by a read_committed consumer since `time`."""

    time: float
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def source(self) -> tuple[int, int]:
        """The partition and offset of the input record this is the outcome of."""
        source = orjson.loads(self.value)["source"]
        return source["partition"], source["offset"]

    @property
    def code(self) -> str | None:
        """The dead letter's error code; None for a verdict."""
        error = orjson.loads(self.value).get("error")
        return None if error is None else str(error["code"])


@dataclass(frozen=True)
class Commit:
    time: float
    offsets: dict[TopicPartition, int]


@dataclass
class Broker:
    logs: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    calls: list[tuple[float, str]] = field(default_factory=list)
    """Every call the service made of a client, with the loop time, in order."""
    faults: dict[str, list[Step]] = field(default_factory=dict)
    always: dict[str, Step] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, tp: TopicPartition, *values: bytes) -> None:
        log = self.logs.setdefault(tp, [])
        for value in values:
            log.append(
                ConsumerRecord(
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=len(log),
                    timestamp=0,
                    timestamp_type=0,
                    key=b"k",
                    value=value,
                    checksum=None,
                    serialized_key_size=1,
                    serialized_value_size=len(value),
                    headers=[],
                )
            )
        self.arrived.set()

    def fail(self, call: str, *steps: Step, always: Step | None = None) -> None:
        """Script the next calls named `call` (then every one, with `always`)."""
        self.faults.setdefault(call, []).extend(steps)
        if always is not None:
            self.always[call] = always

    async def act(self, call: str, who: str = "", *, particular: str = "") -> None:
        """Note a call, then play its next scripted step, if any: one scripted for the
        `particular` name ("send verdicts.review"), once scripted, else the call's name's."""
        self.calls.append((now(), f"{who}{call}"))
        name = particular if particular in self.faults or particular in self.always else call
        steps = self.faults.get(name)
        step = steps.pop(0) if steps else self.always.get(name)
        if isinstance(step, float):
            await asyncio.sleep(step)
        elif step is not None:
            raise step

    def to(self, topic: str) -> list[Published]:
        """What was published to `topic`, in order."""
        return [p for p in self.published if p.topic == topic]

    def committed(self) -> dict[TopicPartition, int]:
        """The group's offsets now."""
        latest: dict[TopicPartition, int] = {}
        for commit in self.commits:
            latest |= commit.offsets
        return latest

    def called(self, call: str) -> list[float]:
        """When `call` (as noted, e.g. "producer-0.stop") was made."""
        return [time for time, name in self.calls if name == call]


@dataclass(frozen=True)
class Poll:
    time: float
    timeout_ms: int
    max_records: int
    returned: int


class FakeConsumer:
    """A group member over a `Broker`: its assignment, a position per partition, pausing, and
    rebalances the test drives (`rebalance`), during which fetching waits as in aiokafka."""

    def __init__(self, broker: Broker, assignment: Iterable[TopicPartition]) -> None:
        self.broker = broker
        self.listener: ConsumerRebalanceListener | None = None
        self.polls: list[Poll] = []
        self.pausing: list[tuple[float, str, set[TopicPartition]]] = []
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._not_rebalancing = asyncio.Event()
        self._not_rebalancing.set()
        self._assign(assignment)
        self.end_offsets_failures: list[Exception] = []
        """Raised by the next calls of `end_offsets`, in order."""

    async def start(self) -> None:
        await self.broker.act("consumer.start")

    async def stop(self) -> None:
        await self.broker.act("consumer.stop")

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None:
        self.listener = listener

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Batches:
        await self._not_rebalancing.wait()
        started = now()
        batches = self._fetch(max_records)
        if not batches and timeout_ms > 0:
            self.broker.arrived.clear()
            try:
                async with asyncio.timeout(timeout_ms / 1000):
                    await self.broker.arrived.wait()
            except TimeoutError:
                pass
            batches = self._fetch(max_records)
        returned = sum(map(len, batches.values()))
        self.polls.append(Poll(started, timeout_ms, max_records, returned))
        return batches

    def _fetch(self, max_records: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        batches = {}
        for tp in sorted(self._assigned - self._paused):
            position = self._positions[tp]
            batch = self.broker.logs.get(tp, [])[position : position + max_records]
            if batch:
                batches[tp] = batch
                self._positions[tp] += len(batch)
                max_records -= len(batch)
        return batches

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions)
        self.pausing.append((now(), "pause", set(partitions)))

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)
        self.pausing.append((now(), "resume", set(partitions)))

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.broker.logs.get(partition, []))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.broker.act("consumer.commit")
        self.broker.commits.append(Commit(now(), dict(offsets)))

    async def committed(self, partition: TopicPartition) -> int | None:
        return self.broker.committed().get(partition)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.end_offsets_failures:
            raise self.end_offsets_failures.pop(0)
        return {tp: len(self.broker.logs.get(tp, [])) for tp in partitions}

    async def topics(self) -> set[str]:
        return {tp.topic for tp in self.broker.logs}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Move back as aiokafka does on an offset reset (e.g. after a broker restart)."""
        self._positions[partition] = offset

    async def rebalance(
        self, revoked: Iterable[TopicPartition] = (), assigned: Iterable[TopicPartition] = ()
    ) -> None:
        """What the group coordinator does: fetching waits, the listener hears what is revoked
        (and may take its time), the assignment changes, the listener hears what is new."""
        assert self.listener is not None, "not subscribed"
        revoked, assigned = set(revoked), set(assigned)
        self.begin_rebalance()
        try:
            await self.listener.on_partitions_revoked(revoked)
            self._assigned -= revoked
            self._paused -= revoked
            self._assign(assigned)
            await self.listener.on_partitions_assigned(assigned)
        finally:
            self._not_rebalancing.set()

    def begin_rebalance(self) -> None:
        """Fetching waits until the rebalance completes (never, if `rebalance` is not called)."""
        self._not_rebalancing.clear()

    def _assign(self, partitions: Iterable[TopicPartition]) -> None:
        committed = self.broker.committed()
        for tp in partitions:
            self._assigned.add(tp)
            self._positions[tp] = committed.get(tp, 0)


class FakeProducer:
    """A producer over a `Broker`: a record is published when acknowledged, or inside a
    transaction when the transaction commits, together with the transaction's offsets."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name
        self._transaction: list[Published] | None = None
        self._offsets: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self._act("start")

    async def stop(self) -> None:
        await self._act("stop")

    async def send(
        self, topic: str, value: bytes, key: bytes | None, *, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[RecordMetadata]:
        acknowledged: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        try:
            await self._act("send", particular=f"send {topic}")
        except Exception as exc:  # the broker refused it: the delivery future fails
            acknowledged.set_exception(exc)
            return acknowledged
        record = Published(now(), topic, key, value, headers)
        if self._transaction is None:
            self.broker.published.append(record)
        else:
            self._transaction.append(record)
        acknowledged.set_result(RecordMetadata(topic, 0, None, 0, None, 0, None))
        return acknowledged

    async def begin_transaction(self) -> None:
        await self._act("begin_transaction")
        self._transaction, self._offsets = [], {}

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        await self._act("send_offsets_to_transaction")
        self._offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        await self._act("commit_transaction")
        assert self._transaction is not None, "no transaction to commit"
        at = now()
        self.broker.published.extend(
            Published(at, p.topic, p.key, p.value, p.headers) for p in self._transaction
        )
        self.broker.commits.append(Commit(at, self._offsets))
        self._transaction = None

    async def abort_transaction(self) -> None:
        await self._act("abort_transaction")
        self._transaction = None

    async def _act(self, call: str, particular: str = "") -> None:
        await self.broker.act(call, f"{self.name}.", particular=particular)


class Producers:
    """The `new_producer` of a delivery: a fresh `FakeProducer` per call, each one kept."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.made: list[FakeProducer] = []

    def __call__(self) -> FakeProducer:
        producer = FakeProducer(self.broker, f"producer-{len(self.made)}")
        self.made.append(producer)
        return producer


@dataclass
class Service:
    """A `ModerationConsumer` over a `FakeConsumer` and fake producers, judging with the real
    `Pipeline` and a `ScriptedGuard` (whose script is followed in the order records arrive)."""

    settings: Settings
    broker: Broker
    kafka: FakeConsumer
    producers: Producers
    guard: ScriptedGuard
    consumer: ModerationConsumer
    metrics: Metrics
    stop: asyncio.Event

    @classmethod
    def make(
        cls,
        guard: ScriptedGuard,
        assignment: Iterable[TopicPartition] = (TP0,),
        breaker: Breaker | None = None,
        deadline_s: float = 30.0,
        actions: Callable[[Verdict], Action | None] | None = None,
        **settings: Any,
    ) -> Service:
        config = Settings(**{"commit_interval_ms": 500, "drain_timeout_s": 3.0, **settings})
        broker = Broker()
        kafka = FakeConsumer(broker, assignment)
        producers = Producers(broker)
        metrics = Metrics()
        tracer = TracerProvider().get_tracer("test")
        breaker = breaker or Breaker(100, _always_ready, 1.0)
        pipeline = make_pipeline(guard, InlinePool(), breaker, deadline_s)
        if actions is not None:
            pipeline = Deciding(pipeline, actions)  # type: ignore[assignment]
        delivery = delivery_from(config, kafka, producers, metrics, tracer)
        consumer = ModerationConsumer(config, kafka, delivery, pipeline, breaker, metrics, tracer)
        return cls(config, broker, kafka, producers, guard, consumer, metrics, asyncio.Event())

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve while the block runs, then stop (SIGTERM) and wait for the end of `run`.

        `run` ends within two drain timeouts (draining, then closing the consumer); a minute
        of virtual time is a bound that fails a hung stop at once rather than hanging the test.
        """
        serving = asyncio.create_task(self.consumer.run(self.stop))
        try:
            yield
        finally:
            self.stop.set()
            async with asyncio.timeout(60):
                await serving


async def _always_ready() -> bool:
    return True


async def outgoing(
    tp: TopicPartition, offset: int, action: Action | None = None, *, sampled: bool = False
) -> Outgoing:
    """The verdict of a valid event at `tp`@`offset`, with `action` (and marked for review when
    its action is review or it was `sampled`), as a delivery is handed it (to the topics the
    consumer would give it)."""
    record = Record(tp.topic, tp.partition, offset, b"k", event(offset), ())
    outcome: Outcome = await make_pipeline(ScriptedGuard(SAFE), InlinePool()).judge(record)
    assert isinstance(outcome, Verdict), outcome
    marked = {"action": action, "would_action": action, "review": action == "review" or sampled}
    outcome = outcome.model_copy(update=marked)
    topic, also_to = destinations(Settings(), outcome)
    return Outgoing(
        source=tp,
        offset=offset,
        topic=topic,
        also_to=also_to,
        key=record.key,
        value=serialize(outcome),
        outcome=outcome,
        timestamp_ms=None,
        context=otel_context.get_current(),
    )
