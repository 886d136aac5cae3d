"""The consumer's rules, in-process: fake Kafka (`tests/support/kafka.py`), the real pipeline with
a scripted guard, and a virtual clock, so that each test takes milliseconds and asserts when
things happen, not only that they do. The real broker proves the whole in test_end_to_end.

The clock: with `pytest.mark.looptime`, the test's event loop keeps virtual time and jumps to
the next timer whenever nothing is ready to run, so sleeps, timeouts and the service's own
clock (`loop.time()`) cost no wall time. This project's default loop lives for the whole
session, and looptime would carry its clock on from one test to the next;
`loop_scope="function"` gives each test a fresh loop whose clock starts at 0.0, so times are
asserted as written. `end=600` fails a test whose timers keep firing past 600 virtual seconds
(a retry loop that never gives up) instead of letting it spin; a stop that hangs is bounded
by `Service.running`.
"""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from service.adapters.kafka.delivery import PublishFailed
from service.core.breaker import Breaker
from service.core.errors import GuardUnavailable
from service.core.verdicts import Action, Verdict
from tests.support.kafka import TP0, TP1, Broker, Service, event, now
from tests.support.pipeline import SAFE, ScriptedGuard

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.looptime(end=600)]


def published_at(broker: Broker) -> dict[tuple[int, int], list[float]]:
    """When the outcome of each input record (partition, offset) was published."""
    times: dict[tuple[int, int], list[float]] = {}
    for outcome in broker.published:
        times.setdefault(outcome.source, []).append(outcome.time)
    return times


def assert_commits_never_pass_unfinished_records(broker: Broker) -> None:
    """Every offset below a committed position had its outcome published by then."""
    published = published_at(broker)
    for commit in broker.commits:
        for tp, position in commit.offsets.items():
            for offset in range(position):
                times = published.get((tp.partition, offset), [])
                assert min(times, default=math.inf) <= commit.time, (commit, offset)


async def test_a_commit_never_passes_an_unfinished_record() -> None:
    """Record 2 is judged slowly and the verdict of record 1 takes 2 s to be acknowledged:
    each partition is committed up to its first record not finished (published) yet. (Judged
    at distinct times, so that record 1's is the second send whatever order the loop runs
    tasks due at the same instant in.)"""
    service = Service.make(ScriptedGuard(0.1, 0.2, 5.0, 0.3))
    service.broker.add(TP0, *map(event, range(4)))
    service.broker.fail("send", None, 2.0)
    async with service.running():
        await asyncio.sleep(8)

    assert published_at(service.broker) == {
        (0, 0): [0.1],
        (0, 1): [2.2],
        (0, 2): [5.0],
        (0, 3): [0.3],
    }
    commits = service.broker.commits
    assert [c.offsets for c in commits] == [{TP0: 1}, {TP0: 2}, {TP0: 4}]
    assert_commits_never_pass_unfinished_records(service.broker)


async def test_a_full_window_is_waited_out_without_pausing_or_polling() -> None:
    """Two records in flight at most: the next ones are taken as those finish. Pausing would
    make aiokafka drop what it prefetched, so a full window neither pauses nor polls."""
    service = Service.make(ScriptedGuard(1.0), max_in_flight=2)
    service.broker.add(TP0, *map(event, range(5)))
    async with service.running():
        await asyncio.sleep(4)

    finished = published_at(service.broker)
    assert [finished[(0, offset)] for offset in range(5)] == [[1.0], [1.0], [2.0], [2.0], [3.0]]
    assert service.kafka.pausing == []
    polls = service.kafka.polls
    assert all(p.max_records <= 2 for p in polls)
    assert [p.time for p in polls if 0 < p.time < 1.0] == []  # full: no poll at all


async def test_a_window_full_for_long_pauses_and_polls_within_max_poll_interval() -> None:
    """A member that does not poll for max_poll_interval_ms is dropped from the group."""
    service = Service.make(ScriptedGuard(9.3, 0.1), max_in_flight=1, max_poll_interval_ms=4000)
    service.broker.add(TP0, event(0), event(1))
    async with service.running():
        await asyncio.sleep(10)

    # Paused once half the interval (2 s) has passed without a poll, checked every 0.5 s (the
    # commit interval); polled without taking anything until the window has room again.
    assert service.kafka.pausing == [(2.5, "pause", {TP0}), (9.3, "resume", {TP0})]
    paused_polls = [(p.time, p.timeout_ms, p.max_records, p.returned) for p in service.kafka.polls]
    assert paused_polls[:5] == [
        (0.0, 100, 1, 1),
        (2.5, 0, 1, 0),
        (5.0, 0, 1, 0),
        (7.5, 0, 1, 0),
        (9.3, 100, 1, 1),
    ]
    assert published_at(service.broker) == {(0, 0): [9.3], (0, 1): [9.4]}


async def test_an_open_breaker_pauses_every_partition_and_dead_letters_nothing() -> None:
    """Triton down from 0.0 to 3.0: the breaker opens on the second failure, the consumer pauses
    and keeps polling, records wait (their 2 s deadline stopped), and all become verdicts."""
    ready_at = 3.0

    async def probe() -> bool:
        return now() >= ready_at

    breaker = Breaker(2, probe, probe_interval_s=1.0)
    down = GuardUnavailable("UNAVAILABLE")
    service = Service.make(
        ScriptedGuard(down, down, SAFE), [TP0, TP1], breaker=breaker, deadline_s=2.0
    )
    service.broker.add(TP0, event(0), event(1))
    service.broker.add(TP1, event(2))
    try:
        async with service.running():
            await asyncio.sleep(1.0)
            service.broker.add(TP0, event(3))  # arrives while paused: not fetched until 3.0
            await asyncio.sleep(3.0)
    finally:
        await breaker.close()

    assert service.kafka.pausing == [(0.1, "pause", {TP0, TP1}), (3.0, "resume", {TP0, TP1})]
    while_open = [p for p in service.kafka.polls if 0.1 <= p.time < 3.0]
    assert all((p.timeout_ms, p.max_records, p.returned) == (0, 1, 0) for p in while_open)
    polled = [0.1, *(p.time for p in while_open), 3.0]
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    assert max(gaps) == pytest.approx(0.5)  # polled, so the member stays in the group
    assert [p.code for p in service.broker.published] == [None] * 4
    assert published_at(service.broker) == {
        (0, 0): [3.0],
        (0, 1): [3.0],
        (1, 0): [3.0],
        (0, 2): [3.0],
    }


@pytest.mark.parametrize(
    "failure", [None, KafkaConnectionError(), RuntimeError("a bug")], ids=["", "broker", "bug"]
)
async def test_the_lag_keeps_growing_while_the_breaker_holds_everything(
    failure: Exception | None,
) -> None:
    """Lag set only at commits would freeze when the consumer is stuck, just when the alerts
    need it: it is refreshed from the broker's end offsets every 5 s, commit or not; a refresh
    that fails (the broker, or a bug) is tried again the next round."""

    async def never() -> bool:
        return False

    breaker = Breaker(2, never, probe_interval_s=1.0)
    down = GuardUnavailable("UNAVAILABLE")
    service = Service.make(ScriptedGuard(SAFE, down, down), breaker=breaker)
    service.kafka.end_offsets_failures += [failure] if failure else []
    service.broker.add(TP0, event(0), event(1))

    def lag() -> float | None:
        return service.metrics.registry.get_sample_value(
            "guardstream_partition_lag", {"topic": "images", "partition": "0"}
        )

    try:
        async with service.running():
            await asyncio.sleep(1.0)
            at_commit = lag()
            service.broker.add(TP0, event(2), event(3), event(4))  # while paused
            await asyncio.sleep(3.0)
            before_refresh = lag()
            await asyncio.sleep(2.0)
            after_the_first = lag()
            await asyncio.sleep(5.0)
            after_the_second = lag()
    finally:
        await breaker.close()

    assert service.broker.committed() == {TP0: 1}
    assert (at_commit, before_refresh) == (1, 1)
    assert (after_the_first, after_the_second) == ((1, 4) if failure else (4, 4))


async def test_an_event_past_its_deadline_is_dead_lettered_at_the_deadline() -> None:
    service = Service.make(ScriptedGuard(5.0, 0.1), deadline_s=2.0)
    service.broker.add(TP0, event(0), event(1))
    async with service.running():
        await asyncio.sleep(3)

    [judged, late] = service.broker.published
    assert (late.source, late.time, late.topic, late.code) == (
        (0, 0),
        2.0,
        "images.dlq",
        "deadline_exceeded",
    )
    assert (judged.source, judged.time, judged.code) == ((0, 1), 0.1, None)
    assert service.broker.committed() == {TP0: 2}


async def test_revoked_partitions_finish_within_the_drain_timeout_and_are_committed() -> None:
    """Revoked at 1.0 with record 1 due at 2.0: the revocation waits for it (not the whole
    drain timeout), commits the partition, and the partition is no longer consumed."""
    service = Service.make(ScriptedGuard(0.1, 2.0, 0.1, 0.1), [TP0, TP1])
    service.broker.add(TP0, event(0), event(1), event(2))
    service.broker.add(TP1, event(3))
    async with service.running():
        await asyncio.sleep(1.0)
        await service.kafka.rebalance(revoked={TP0})
        revoked_at = now()
        await asyncio.sleep(1.0)

    assert revoked_at == 2.0  # when the last record in flight finished, not the drain timeout
    at_revocation = [c.offsets for c in service.broker.commits if c.time == 2.0]
    assert at_revocation == [{TP0: 3}]
    assert service.kafka.assignment() == {TP1}
    # Its new owner reports TP0's lag now: a copy left here would count twice in a group sum.
    lag = {
        labels["partition"]
        for metric in service.metrics.lag.collect()
        for labels in (sample.labels for sample in metric.samples)
    }
    assert lag == {"1"}
    assert_commits_never_pass_unfinished_records(service.broker)


async def test_a_revocation_gives_up_at_the_drain_timeout_and_the_rest_is_judged_again() -> None:
    """drain_timeout_s is 3: revoked at 1.0, the slow record is given up at 4.0, uncommitted;
    assigned again, the partition is read from the commit and what was not committed judged."""
    service = Service.make(ScriptedGuard(0.1, 100.0, 0.1, SAFE))
    service.broker.add(TP0, event(0), event(1), event(2))
    async with service.running():
        await asyncio.sleep(1.0)
        await service.kafka.rebalance(revoked={TP0})
        revoked_at = now()
        await service.kafka.rebalance(assigned={TP0})
        await asyncio.sleep(1.0)

    assert revoked_at == 4.0
    assert service.broker.committed() == {TP0: 3}
    assert published_at(service.broker) == {(0, 0): [0.1], (0, 1): [4.0], (0, 2): [0.1, 4.0]}
    assert_commits_never_pass_unfinished_records(service.broker)


async def test_records_at_offsets_already_taken_are_not_taken_twice() -> None:
    """An offset reset moves the client back on a partition it kept (a broker restart): records
    in flight or finished are not judged again, and the next new one is."""
    service = Service.make(ScriptedGuard(1.0))
    service.broker.add(TP0, *map(event, range(4)))
    async with service.running():
        await asyncio.sleep(0.5)
        service.kafka.seek(TP0, 1)  # offsets 1 to 3 are in flight
        await asyncio.sleep(1.0)
        service.kafka.seek(TP0, 0)  # all finished, and committed
        service.broker.add(TP0, event(4))
        await asyncio.sleep(2.0)

    assert len(service.guard.calls) == 5
    assert published_at(service.broker) == {(0, n): [1.0 if n < 4 else 2.5] for n in range(5)}
    assert service.broker.committed() == {TP0: 5}


async def test_stop_drains_in_flight_records_for_the_drain_timeout_commits_and_closes() -> None:
    """Stopped at 0.25 with records 0 and 1 in flight (2 done): fetching stops, record 0
    finishes at 1.0, record 1 is given up at 0.25 + drain_timeout_s, and the last commit is
    made before the consumer and then the producer close."""
    service = Service.make(ScriptedGuard(1.0, 100.0, 0.5))
    service.broker.add(TP0, event(0), event(1), event(2))
    async with service.running():
        await asyncio.sleep(0.25)
        service.stop.set()
        await asyncio.sleep(0.1)
        service.broker.add(TP0, event(3))
    assert now() == 3.25
    assert [p.time for p in service.kafka.polls if p.time >= 0.25] == []
    assert published_at(service.broker) == {(0, 0): [1.0], (0, 2): [0.5]}
    assert [(c.time, c.offsets) for c in service.broker.commits] == [(3.25, {TP0: 1})]
    assert service.broker.calls[-3:] == [
        (3.25, "consumer.commit"),
        (3.25, "consumer.stop"),
        (3.25, "producer-0.stop"),
    ]


async def test_stop_is_not_held_up_by_a_rebalance_that_never_completes() -> None:
    """During a rebalance aiokafka's getmany waits for the assignment whatever its timeout."""
    service = Service.make(ScriptedGuard(SAFE))
    async with service.running():
        await asyncio.sleep(1.0)
        service.kafka.begin_rebalance()
        await asyncio.sleep(1.0)
    assert now() == 2.0


async def test_closing_the_consumer_is_given_up_after_the_drain_timeout() -> None:
    service = Service.make(ScriptedGuard(SAFE))
    service.broker.fail("consumer.stop", 100.0)
    async with service.running():
        await asyncio.sleep(1.0)
    assert now() == 4.0
    assert service.broker.called("producer-0.stop") == [4.0]


async def test_exactly_once_publishes_outcomes_and_offsets_in_one_transaction() -> None:
    """Outcomes become visible only with the commit of their offsets, every commit interval;
    the consumer commits nothing itself."""
    service = Service.make(ScriptedGuard(0.1, 0.7), delivery="exactly-once")
    service.broker.add(TP0, event(0), event(1))
    async with service.running():
        await asyncio.sleep(2)

    assert [(c.time, c.offsets) for c in service.broker.commits] == [
        (0.5, {TP0: 1}),
        (1.0, {TP0: 2}),
    ]
    assert published_at(service.broker) == {(0, 0): [0.5], (0, 1): [1.0]}
    assert service.broker.called("consumer.commit") == []


async def test_a_fenced_producer_stops_the_consumer_uncommitted() -> None:
    service = Service.make(ScriptedGuard(0.1), delivery="exactly-once")
    service.broker.add(TP0, event(0))
    service.broker.fail("commit_transaction", ProducerFenced())
    with pytest.raises(PublishFailed, match="taken over by another instance"):
        await service.consumer.run(service.stop)

    assert now() == 0.5
    assert (service.broker.published, service.broker.commits) == ([], [])
    assert service.broker.calls[-2:] == [(0.5, "consumer.stop"), (0.5, "producer-0.stop")]


# --- the review topic -----------------------------------------------------------------------

ACTIONS: dict[str, Action | None] = {
    "ev-0": "allow",
    "ev-1": "review",
    "ev-2": "block",
    "ev-4": None,
    "ev-5": "review",
}
"""A stand-in for the decision rules: the action of each event's verdict, by event id."""


def decide(verdict: Verdict) -> Action | None:
    return ACTIONS[verdict.event_id]


def events_with_actions() -> list[bytes]:
    """ev-0 to ev-5 with the actions above, and at offset 3 a record that is no event."""
    return [event(0), event(1), event(2), b"not json", event(4), event(5)]


async def test_at_least_once_commits_a_review_verdict_only_once_both_topics_have_it() -> None:
    """Verdicts are acknowledged as they are judged (at 0.1; ev-5 at 1.2), but the review copy
    of ev-1 only at 0.8, after three retries: the commit at 0.5 stops before offset 1, the one
    at 1.0 before ev-5. Only the verdicts whose action is review go to the review topic, with
    the verdict's key and value; the dead letter does not."""
    service = Service.make(ScriptedGuard(0.1, 0.1, 0.1, 0.1, 1.2), actions=decide)
    service.broker.add(TP0, *events_with_actions())
    failed = KafkaConnectionError()
    service.broker.fail("send verdicts.review", failed, failed, failed)
    async with service.running():
        await asyncio.sleep(2)

    broker = service.broker
    assert [(p.time, p.source) for p in broker.to("verdicts.review")] == [
        (0.8, (0, 1)),
        (1.2, (0, 5)),
    ]
    assert sorted((p.time, p.source) for p in broker.to("verdicts")) == [
        *((0.1, (0, offset)) for offset in (0, 1, 2, 4)),
        (1.2, (0, 5)),
    ]
    assert [p.source for p in broker.to("images.dlq")] == [(0, 3)]
    verdicts = {p.source: p for p in broker.to("verdicts")}
    for review in broker.to("verdicts.review"):
        verdict = verdicts[review.source]
        assert (review.key, review.value) == (verdict.key, verdict.value)
    assert [(c.time, c.offsets) for c in broker.commits] == [
        (0.5, {TP0: 1}),
        (1.0, {TP0: 5}),
        (1.5, {TP0: 6}),
    ]


async def test_exactly_once_commits_a_review_verdict_with_its_copy_or_neither() -> None:
    """The review copy of ev-1 fails in the transaction at 0.5: it is aborted, so neither
    copy nor any verdict nor the offsets are visible; the next one, at 1.0, has them all."""
    service = Service.make(ScriptedGuard(0.1), actions=decide, delivery="exactly-once")
    service.broker.add(TP0, *events_with_actions())
    service.broker.fail("send verdicts.review", KafkaConnectionError())
    async with service.running():
        await asyncio.sleep(2)

    broker = service.broker
    assert broker.called("producer-0.abort_transaction") == [0.5]
    assert [(c.time, c.offsets) for c in broker.commits] == [(1.0, {TP0: 6})]
    assert {p.time for p in broker.published} == {1.0}
    assert [p.source for p in broker.to("verdicts.review")] == [(0, 1), (0, 5)]
    assert sorted(p.source for p in broker.to("verdicts")) == [(0, n) for n in (0, 1, 2, 4, 5)]
