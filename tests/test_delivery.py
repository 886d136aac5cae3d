"""The deliveries' rules, in-process with fake producers and a virtual clock (see test_consumer
for how looptime is set up): at least once retries what may pass until publish_timeout_s;
exactly once publishes outcomes with their offsets in one transaction, aborts and retries a
failed one on a fresh producer, and stops when fenced or failing for too long. A verdict whose
action is review goes to the review topic too: at least once finishes it when both copies are
acknowledged, exactly once sends both in the transaction of its offset."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.adapters.kafka.delivery import AtLeastOnce, ExactlyOnce, PublishFailed, destinations
from service.config import Settings
from service.core.pipeline import Record
from service.core.verdicts import Action, DeadLetter
from service.ops.metrics import Metrics
from tests.support.kafka import (
    TP0,
    TP1,
    Broker,
    FakeConsumer,
    InlinePool,
    Producers,
    now,
    outgoing,
)
from tests.support.pipeline import SAFE, ScriptedGuard, make_pipeline

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.looptime(end=600)]

SETTINGS = Settings(publish_timeout_s=5.0)


def at_least_once(broker: Broker, metrics: Metrics | None = None) -> AtLeastOnce:
    return AtLeastOnce(
        SETTINGS,
        FakeConsumer(broker, [TP0]),
        Producers(broker),
        metrics or Metrics(),
        TracerProvider().get_tracer("test"),
    )


def exactly_once(broker: Broker, publish_timeout_s: float = 5.0) -> ExactlyOnce:
    settings = Settings(
        delivery="exactly-once", transactional_id="tx", publish_timeout_s=publish_timeout_s
    )
    return ExactlyOnce(settings, Producers(broker), Metrics(), TracerProvider().get_tracer("t"))


async def test_publishing_retries_what_may_pass_with_delays_doubling_from_100_ms() -> None:
    broker, metrics = Broker(), Metrics()
    broker.fail("send", KafkaConnectionError(), KafkaTimeoutError(), NotLeaderForPartitionError())
    delivery = at_least_once(broker, metrics)
    await delivery.start()

    assert await delivery.hand_over(await outgoing(TP0, 7)) is True
    assert broker.called("producer-0.send") == [0.0, 0.1, 0.3, 0.7]
    assert [(p.time, p.source) for p in broker.published] == [(0.7, (0, 7))]
    assert metrics.registry.get_sample_value("guardstream_publish_retries_total") == 3


async def test_publishing_gives_up_when_the_next_retry_would_pass_publish_timeout_s() -> None:
    """publish_timeout_s is 5: tries at 0, 0.1, 0.3, 0.7, 1.5 and 3.1; the next, at 6.3, is
    too late, so the service stops at 3.1 with the offset uncommitted."""
    broker = Broker()
    broker.fail("send", always=KafkaConnectionError())
    delivery = at_least_once(broker)
    await delivery.start()

    with pytest.raises(PublishFailed, match=r"outcome of images\[0\]@7 to verdicts"):
        await delivery.hand_over(await outgoing(TP0, 7))
    assert broker.called("producer-0.send") == [0.0, 0.1, 0.3, 0.7, 1.5, 3.1]
    assert now() == 3.1
    assert broker.published == []


async def test_an_error_that_cannot_pass_fails_publishing_at_once() -> None:
    broker = Broker()
    broker.fail("send", RecordTooLargeError())
    delivery = at_least_once(broker)
    await delivery.start()

    with pytest.raises(PublishFailed):
        await delivery.hand_over(await outgoing(TP0, 7))
    assert broker.called("producer-0.send") == [0.0]


async def test_a_producer_that_lost_its_sequence_numbers_is_replaced_and_the_send_retried() -> None:
    broker = Broker()
    broker.fail("send", OutOfOrderSequenceNumber())
    delivery = at_least_once(broker)
    await delivery.start()

    assert await delivery.hand_over(await outgoing(TP0, 7)) is True
    assert broker.calls == [
        (0.0, "producer-0.start"),
        (0.0, "producer-0.send"),
        (0.0, "producer-1.start"),
        (0.0, "producer-0.stop"),
        (0.1, "producer-1.send"),
    ]
    assert [p.source for p in broker.published] == [(0, 7)]


async def test_a_failed_commit_is_not_fatal_and_commits_nothing() -> None:
    """The offsets stay uncommitted and the consumer tries again next interval."""
    broker = Broker()
    broker.fail("consumer.commit", KafkaConnectionError())
    delivery = at_least_once(broker)

    assert await delivery.commit({TP0: 3}) == {}
    assert await delivery.commit({TP0: 3}) == {TP0: 3}
    assert [c.offsets for c in broker.commits] == [{TP0: 3}]


async def test_exactly_once_holds_outcomes_until_a_transaction_publishes_them_with_offsets() -> (
    None
):
    broker = Broker()
    delivery = exactly_once(broker)
    await delivery.start()
    for offset in range(4):
        assert await delivery.hand_over(await outgoing(TP0, offset)) is False
    assert broker.published == []

    assert await delivery.commit({TP0: 3}) == {TP0: 3}
    # Offsets first, then the records (aiokafka issue 1004), in one transaction.
    assert [call for _, call in broker.calls] == [
        "producer-0.start",
        "producer-0.begin_transaction",
        "producer-0.send_offsets_to_transaction",
        "producer-0.send",
        "producer-0.send",
        "producer-0.send",
        "producer-0.commit_transaction",
    ]
    assert [p.source for p in broker.published] == [(0, 0), (0, 1), (0, 2)]
    assert await delivery.commit({TP0: 4}) == {TP0: 4}  # offset 3 was held for this one
    assert [p.source for p in broker.published] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [c.offsets for c in broker.commits] == [{TP0: 3}, {TP0: 4}]


@pytest.mark.parametrize(
    ("call", "error", "aborted"),
    [
        ("send", KafkaConnectionError(), True),
        ("send", OutOfOrderSequenceNumber(), True),
        ("send_offsets_to_transaction", KeyError("aiokafka issue 1098"), True),
        ("commit_transaction", KafkaTimeoutError(), False),
    ],
)
async def test_a_failed_transaction_is_aborted_and_retried_on_a_fresh_producer(
    call: str, error: Exception, aborted: bool
) -> None:
    """A commit_transaction that failed is not aborted: the next producer's epoch aborts it."""
    broker = Broker()
    broker.fail(call, error)
    delivery = exactly_once(broker)
    await delivery.start()
    for offset in range(2):
        await delivery.hand_over(await outgoing(TP0, offset))

    assert await delivery.commit({TP0: 2}) == {}
    assert (broker.published, broker.commits) == ([], [])
    assert bool(broker.called("producer-0.abort_transaction")) is aborted
    assert broker.calls[-2:] == [(0.0, "producer-1.start"), (0.0, "producer-0.stop")]

    await asyncio.sleep(0.5)
    assert await delivery.commit({TP0: 2}) == {TP0: 2}
    assert [(p.time, p.source) for p in broker.published] == [(0.5, (0, 0)), (0.5, (0, 1))]
    assert broker.called("producer-1.commit_transaction") == [0.5]


async def test_a_transaction_that_hangs_is_aborted_after_publish_timeout_s() -> None:
    broker = Broker()
    broker.fail("send", 100.0)
    delivery = exactly_once(broker)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0))

    assert await delivery.commit({TP0: 1}) == {}
    assert now() == 5.0
    assert broker.called("producer-0.abort_transaction") == [5.0]
    assert broker.called("producer-1.start") == [5.0]


async def test_transactions_failing_for_longer_than_publish_timeout_s_stop_the_service() -> None:
    """publish_timeout_s is 2.5: failures at 0, 1 and 2 are retried, a success at 3 ends the
    streak, and of the failures from 4 on, the one at 7 (3 s into the streak) stops."""
    broker = Broker()
    failed = KafkaTimeoutError()
    broker.fail("commit_transaction", failed, failed, failed, None, failed, failed, failed, failed)
    delivery = exactly_once(broker, publish_timeout_s=2.5)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0))

    committed = []
    for _ in range(7):
        committed.append(await delivery.commit({TP0: 1}))
        await asyncio.sleep(1)
    assert committed == [{}, {}, {}, {TP0: 1}, {}, {}, {}]
    with pytest.raises(PublishFailed, match="transactions failing for 3s"):
        await delivery.commit({TP0: 1})
    assert now() == 7.0


async def test_a_fenced_producer_stops_the_service_and_is_not_replaced() -> None:
    broker = Broker()
    broker.fail("begin_transaction", ProducerFenced())
    delivery = exactly_once(broker)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0))

    with pytest.raises(PublishFailed, match="transactional id 'tx' was taken over"):
        await delivery.commit({TP0: 1})
    assert broker.called("producer-1.start") == []


async def test_outcomes_held_for_revoked_partitions_are_dropped() -> None:
    """The new owner judges them again from the last commit."""
    broker = Broker()
    delivery = exactly_once(broker)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0))
    await delivery.hand_over(await outgoing(TP1, 0))

    delivery.forget([TP0])
    await delivery.commit({TP0: 1, TP1: 1})
    assert [p.source for p in broker.published] == [(1, 0)]


# --- the review topic: a verdict marked for review (action review, or sampled) goes there too --


@pytest.mark.parametrize(
    ("action", "sampled", "topics"),
    [
        ("review", False, ("verdicts", "verdicts.review")),
        ("allow", False, ("verdicts",)),
        ("block", False, ("verdicts",)),
        (None, False, ("verdicts",)),
        ("allow", True, ("verdicts", "verdicts.review")),
        ("block", True, ("verdicts", "verdicts.review")),
    ],
)
async def test_only_verdicts_marked_for_review_go_to_the_review_topic_too(
    action: Action | None, sampled: bool, topics: tuple[str, ...]
) -> None:
    assert (await outgoing(TP0, 0, action, sampled=sampled)).topics == topics


async def test_dead_letters_go_to_the_dead_letter_topic_only() -> None:
    record = Record("images", 0, 3, b"k", b"not json", ())
    dead = await make_pipeline(ScriptedGuard(SAFE), InlinePool()).judge(record)
    assert isinstance(dead, DeadLetter)
    assert destinations(SETTINGS, dead) == ("images.dlq", ())


async def test_a_review_verdict_is_published_to_both_topics_alike_each_under_its_own_span() -> None:
    """Same key, value and headers; each traceparent names its own PRODUCER span, both
    children of the record's process span."""
    broker, metrics = Broker(), Metrics()
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    delivery = AtLeastOnce(
        SETTINGS, FakeConsumer(broker, [TP0]), Producers(broker), metrics, tracer
    )
    await delivery.start()
    with tracer.start_as_current_span("images process") as process:
        assert await delivery.hand_over(await outgoing(TP0, 7, "review")) is True

    verdict, review = broker.published
    assert (verdict.topic, review.topic) == ("verdicts", "verdicts.review")
    assert (review.key, review.value) == (verdict.key, verdict.value)
    assert orjson.loads(review.value)["action"] == "review"
    spans = {span.name: span for span in exported.get_finished_spans()}
    for record in (verdict, review):
        headers = dict(record.headers)
        assert (headers["event-id"], headers["content-type"]) == (b"ev-7", b"application/json")
        span = spans[f"{record.topic} publish"]
        assert span.kind is SpanKind.PRODUCER
        assert span.parent is not None
        assert span.parent.span_id == process.get_span_context().span_id
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == record.topic
        trace_id, span_id = headers["traceparent"].decode().split("-")[1:3]
        assert (int(trace_id, 16), int(span_id, 16)) == (
            span.context.trace_id,
            span.context.span_id,
        )
    samples = metrics.registry.get_sample_value
    assert samples("guardstream_reviews_total") == 1
    assert samples("guardstream_verdicts_total", {"rating": "Safe", "category": "NA"}) == 1
    assert (
        samples("guardstream_decisions_total", {"action": "review", "would_action": "review"}) == 1
    )


async def test_a_review_verdict_is_finished_only_when_both_topics_acknowledged_it() -> None:
    """The review topic's send fails twice and is retried, as any publish, while the verdict
    topic acknowledged at once: the record is finished at 0.3, when the last copy is."""
    broker, metrics = Broker(), Metrics()
    broker.fail("send verdicts.review", KafkaConnectionError(), KafkaTimeoutError())
    delivery = at_least_once(broker, metrics)
    await delivery.start()

    assert await delivery.hand_over(await outgoing(TP0, 7, "review")) is True
    assert now() == 0.3
    assert [(p.time, p.topic) for p in broker.published] == [
        (0.0, "verdicts"),
        (0.3, "verdicts.review"),
    ]
    assert metrics.registry.get_sample_value("guardstream_publish_retries_total") == 2


async def test_a_review_publish_that_fails_stops_the_service_and_abandons_the_other() -> None:
    """One topic refuses the record for good: publishing fails at once, naming that topic, and
    the verdict topic's publish (hanging here) is given up, not left running."""
    broker = Broker()
    broker.fail("send verdicts", 100.0)
    broker.fail("send verdicts.review", RecordTooLargeError())
    delivery = at_least_once(broker)
    await delivery.start()

    with pytest.raises(PublishFailed, match=r"images\[0\]@7 to verdicts.review"):
        await delivery.hand_over(await outgoing(TP0, 7, "review"))
    assert now() == 0.0
    await asyncio.sleep(200)
    assert broker.published == []


async def test_exactly_once_publishes_the_review_copy_in_the_verdicts_transaction() -> None:
    broker = Broker()
    delivery = exactly_once(broker)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0, "review"))
    await delivery.hand_over(await outgoing(TP0, 1, "allow"))

    assert await delivery.commit({TP0: 2}) == {TP0: 2}
    assert [call for _, call in broker.calls] == [
        "producer-0.start",
        "producer-0.begin_transaction",
        "producer-0.send_offsets_to_transaction",
        "producer-0.send",
        "producer-0.send",
        "producer-0.send",
        "producer-0.commit_transaction",
    ]
    assert [(p.topic, p.source) for p in broker.published] == [
        ("verdicts", (0, 0)),
        ("verdicts.review", (0, 0)),
        ("verdicts", (0, 1)),
    ]
    assert broker.to("verdicts.review")[0].value == broker.to("verdicts")[0].value


async def test_exactly_once_a_failed_review_send_aborts_the_verdict_and_the_offsets_too() -> None:
    broker = Broker()
    broker.fail("send verdicts.review", KafkaConnectionError())
    delivery = exactly_once(broker)
    await delivery.start()
    await delivery.hand_over(await outgoing(TP0, 0, "review"))

    assert await delivery.commit({TP0: 1}) == {}
    assert (broker.published, broker.commits) == ([], [])
    assert broker.called("producer-0.abort_transaction") == [0.0]
    assert await delivery.commit({TP0: 1}) == {TP0: 1}
    assert [p.topic for p in broker.published] == ["verdicts", "verdicts.review"]
