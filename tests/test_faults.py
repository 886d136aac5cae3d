"""Fault injection: what the service delivers when its broker, its Triton or itself fails.

The accounting is tested by hand first; then each scenario runs real processes (see
`tests/support/faults.py`) and records one row of the table printed at the end of the session. The
stack is shared by the module's scenarios (starting it costs seconds, each scenario heals what
the one before broke); topics and consumer groups are each scenario's own. Some events'
verdicts are for review (faults.REVIEW_EVERY): each scenario checks the review topic too.

No scenario is about the model, so all run on the fixed-answer guard of triton_models/bench (the
CPU guard's tensor contract, no inference; see "Pace" below for what that changes).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.client import encode_event, image_event
from service.dev import stack
from tests.support import faults
from tests.support.faults import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    NO_EVENT_ID,
    FaultStack,
    OutcomeReader,
    Outcomes,
    Scenario,
    ScenarioResult,
    ServiceProcess,
    account,
    find_in_input,
    produce,
    read_outcomes,
    wait_for_outcomes,
)
from tests.support.redis import RedisServer


def verdict(event_id: str, action: str | None = None, decided_at: str = "t0") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "rating": "Safe",
        "category_code": "NA",
        "action": action,
        "decided_at": decided_at,
    }


def dead_letter(event_id: str | None, code: str) -> dict[str, Any]:
    return {"event_id": event_id, "error": {"code": code, "message": "..."}}


# --- accounting, by hand --------------------------------------------------------------------


def test_an_id_without_a_committed_outcome_is_lost_even_if_uncommitted_ones_exist() -> None:
    committed: Outcomes = {"a": [verdict("a")], "c": [dead_letter("c", "invalid_event")]}
    uncommitted: Outcomes = {**committed, "b": [verdict("b")]}
    result = account("t", AT_LEAST_ONCE, ["a", "b", "c"], committed, uncommitted, 1.0)
    assert (result.lost, result.lost_ids) == (1, ("b",))
    assert (result.verdicts, result.dead_letters) == (1, {"invalid_event": 1})
    assert (result.duplicates_committed, result.duplicates_uncommitted) == (0, 0)


def test_every_outcome_beyond_the_first_per_id_is_a_duplicate_whatever_its_topic() -> None:
    committed: Outcomes = {
        "a": [verdict("a"), verdict("a"), verdict("a")],
        "b": [dead_letter("b", "guard_unavailable"), verdict("b")],
        "c": [verdict("c")],
    }
    # An aborted transaction's outcomes are visible only to read_uncommitted readers.
    uncommitted: Outcomes = {
        "a": committed["a"],
        "b": [*committed["b"], verdict("b")],
        "c": [verdict("c"), verdict("c")],
    }
    result = account("t", AT_LEAST_ONCE, ["a", "b", "c"], committed, uncommitted, 1.0)
    assert result.lost == 0
    assert result.duplicates_committed == 3
    assert result.duplicates_uncommitted == 5
    assert result.verdicts == 5
    assert result.dead_letters == {"guard_unavailable": 1}
    assert result.verdicts + result.dead_letter_total == (
        result.produced - result.lost + result.duplicates_committed
    )


def test_outcomes_of_ids_never_produced_are_unexpected_not_counted() -> None:
    committed: Outcomes = {
        "a": [verdict("a")],
        "stranger": [verdict("stranger"), verdict("stranger")],
        NO_EVENT_ID: [dead_letter(None, "invalid_json")],
    }
    result = account("t", AT_LEAST_ONCE, ["a"], committed, committed, 1.0)
    assert (result.produced, result.verdicts, result.dead_letters) == (1, 1, {})
    assert (result.lost, result.duplicates_committed, result.unexpected) == (0, 0, 3)


def test_nothing_delivered_means_everything_lost() -> None:
    result = account("t", AT_LEAST_ONCE, ["a", "b"], {}, {}, 0.5)
    assert (result.produced, result.verdicts, result.lost) == (2, 0, 2)
    assert result.lost_ids == ("a", "b")


def test_ids_are_the_unit_of_account_so_they_must_be_unique() -> None:
    with pytest.raises(ValueError, match="same id twice"):
        account("t", AT_LEAST_ONCE, ["a", "a"], {}, {}, 0.0)


def test_rows_make_a_markdown_table_written_for_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed: Outcomes = {
        "a": [verdict("a"), verdict("a")],
        "b": [dead_letter("b", "guard_unavailable")],
        "c": [dead_letter("c", "guard_error")],
    }
    result = account("kill", AT_LEAST_ONCE, ["a", "b", "c", "d"], committed, committed, 12.34)
    assert result.row() == (
        "| kill | at-least-once | 4 | 2 | 2 (guard_error 1, guard_unavailable 1) | 1 | 1 | 1 "
        "| 0 | 0 | 0 | 12.3 |"
    )
    monkeypatch.setattr(faults, "RESULTS", [])
    assert faults.write_table(tmp_path / "table.md") is None
    faults.record(result)
    faults.record(result)  # the same scenario again replaces its row
    text = faults.write_table(tmp_path / "table.md")
    assert text == f"{ScenarioResult.HEADER}\n{result.row()}"
    assert (tmp_path / "table.md").read_text() == text + "\n"


def test_each_verdict_for_review_wants_a_review_record_equal_to_it() -> None:
    """a and b are for review: a has its record once, b none (lost). c is allowed, yet has one
    (unexpected), as has an id never produced; d's record is twice there, once unlike d's
    verdict (an earlier judgment's copy whose verdict was never written: at least once only)."""
    committed: Outcomes = {
        "a": [verdict("a", "review")],
        "b": [verdict("b", "review")],
        "c": [verdict("c", "allow")],
        "d": [verdict("d", "review", decided_at="t2")],
    }
    reviews: Outcomes = {
        "a": [verdict("a", "review")],
        "c": [verdict("c", "allow")],
        "d": [verdict("d", "review", decided_at="t1"), verdict("d", "review", decided_at="t2")],
        "stranger": [verdict("stranger", "review")],
    }
    ids = ["a", "b", "c", "d"]
    result = account("t", AT_LEAST_ONCE, ids, committed, committed, 1.0, reviews)
    assert (result.for_review, result.reviews_lost, result.reviews_duplicates) == (3, 1, 1)
    assert (result.reviews_unexpected, result.reviews_unlike) == (2, 1)
    assert result.row().endswith("| 3 | 1 | 1 | 1.0 |")


def test_a_verdict_flagged_for_review_wants_a_review_record_whatever_its_action() -> None:
    """Verdicts that carry the `review` flag (quality sampling picks allowed or blocked ones)."""
    sampled = {**verdict("a", "allow"), "review": True}
    result = account("t", EXACTLY_ONCE, ["a"], {"a": [sampled]}, {"a": [sampled]}, 1.0, {})
    assert (result.for_review, result.reviews_lost) == (1, 1)


def test_dead_letters_and_verdicts_not_for_review_want_no_review_record() -> None:
    committed: Outcomes = {
        "a": [verdict("a", "allow")],
        "b": [verdict("b", "block")],
        "c": [verdict("c")],
        "d": [dead_letter("d", "invalid_event")],
    }
    result = account("t", EXACTLY_ONCE, ["a", "b", "c", "d"], committed, committed, 1.0, {})
    assert (result.for_review, result.reviews_lost, result.reviews_unexpected) == (0, 0, 0)


# --- scenarios on the real stack ------------------------------------------------------------
#
# Pace. On the CPU guard each scenario spent ~20 s having 500 events judged by its detector.
# Through the bench guard the service judges ~300 events/s here at least once on noida-db, ~100/s
# exactly once (a transaction per commit), ~150/s on Tansu: ten times the CPU guard's pace. So
# the counts below are sized for that pace, each by what its scenario needs (said at each), and
# the fault scenarios check that their fault still landed mid-stream (`assert_mid_stream`): with
# more than a window of events still without an outcome, i.e. records taken and unfinished
# (unpublished, uncommitted) and a backlog behind them. A faster service or machine then fails
# a scenario loudly instead of letting it pass without meeting its fault.
# The consumers commit every 100 ms (GUARDSTREAM_COMMIT_INTERVAL_MS, faults.service_env) instead
# of the default 500: at this pace a fault at 100 outcomes then follows several commits, as one
# at 150 outcomes did on the CPU guard with the default.

BENCH = stack.BENCH_MODEL_REPOSITORY
CPU_GUARD = stack.DEFAULT_MODEL_REPOSITORY

WINDOW = 64
"""GUARDSTREAM_MAX_IN_FLIGHT's default: records taken and not yet finished."""


@pytest.fixture(scope="module")
async def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FaultStack]:
    made = await FaultStack.start(tmp_path_factory.mktemp("faults"), model_repository=BENCH)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def scenario(
    fault_stack: FaultStack, request: pytest.FixtureRequest
) -> AsyncIterator[Scenario]:
    made = await Scenario.open(fault_stack, request.node.name.removeprefix("test_"))
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(scope="module")
async def tansu_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FaultStack]:
    """noida-db answers a member's commit during a rebalance with ILLEGAL_GENERATION (Kafka
    answers REBALANCE_IN_PROGRESS); aiokafka then drops its member id and noida never finishes
    the rebalance. Group changes with consumer-side commits are therefore tested on Tansu."""
    made = await FaultStack.start(
        tmp_path_factory.mktemp("faults-tansu"), broker="tansu", model_repository=BENCH
    )
    try:
        yield made
    finally:
        made.close()


async def outcomes_now(scenario: Scenario) -> int:
    """How many outcomes read_committed readers see now."""
    outcomes = await read_outcomes(scenario.fault_stack.bootstrap, scenario.topics)
    return sum(map(len, outcomes.values()))


def assert_mid_stream(seen: int, produced: int, window: int, what: str) -> None:
    """`what` met a full window and a backlog: when it was applied, `seen` outcomes were out and
    more than `window` events were still without one."""
    assert produced - seen > window, (
        f"{what} landed after {seen} of {produced} outcomes, with less than a window ({window}) "
        "left: not mid-stream, the service outpaced the scenario; produce more events"
    )


# No fault, so nothing has to land mid-stream: more events than the window, so that the window
# fills and is refilled as outcomes are published, on each of the three partitions.
BASELINE_EVENTS = 100


@pytest.mark.stack
async def test_no_fault_baseline_at_least_once(fault_stack: FaultStack, scenario: Scenario) -> None:
    started = time.monotonic()
    ids = await produce(fault_stack.bootstrap, scenario.topics.input, BASELINE_EVENTS, "base-")
    produced = time.monotonic()
    async with scenario.service() as consumer:
        await wait_for_outcomes(fault_stack.bootstrap, scenario.topics, ids, timeout_s=180)
        answered = time.monotonic()
        returncode = await consumer.sigterm()
    wall_s = time.monotonic() - started
    result = await scenario.result(AT_LEAST_ONCE, ids, wall_s)
    print(
        f"\nbaseline: produce {produced - started:.2f}s, start + judge {BASELINE_EVENTS} "
        f"{answered - produced:.2f}s, SIGTERM {started + wall_s - answered:.2f}s\n{result.row()}"
    )
    assert returncode == 0, scenario.logs()
    assert "stopped cleanly" in consumer.log_since_start()
    assert (result.lost, result.lost_ids[:5]) == (0, ()), scenario.logs()
    assert (result.duplicates_committed, result.duplicates_uncommitted) == (0, 0)
    assert (result.verdicts, result.dead_letters, result.unexpected) == (BASELINE_EVENTS, {}, 0)
    assert result.for_review == BASELINE_EVENTS // faults.REVIEW_EVERY
    assert_reviews_delivered(result, scenario)
    assert result.reviews_duplicates == 0


# --- faults ---------------------------------------------------------------------------------

# Faults mid-stream (Triton killed or hung, broker restarted or frozen, consumer killed or
# stopped): one consumer, the backlog produced before it starts, the fault applied as soon as
# AFTER outcomes are out. That is ~0.3 s of judging and several commits in, the service at full
# speed with its window full; EVENTS - AFTER = 150 leaves the window (64) in flight and a backlog
# behind it even if 80 more are judged between the check and the fault (a few ms here), so the
# fault meets records taken but unfinished, and the service has work left after it. What else
# a scenario needs is said at it.
EVENTS = 250
AFTER = 100


async def progress(scenario: Scenario, at_least: int, timeout_s: float = 120) -> int:
    """Wait until at least `at_least` outcomes are visible to read_committed readers."""
    reader = OutcomeReader(scenario.fault_stack.bootstrap, scenario.topics)
    await reader.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while sum(map(len, reader.outcomes.values())) < at_least:
            if loop.time() > deadline:
                raise TimeoutError(f"fewer than {at_least} outcomes after {timeout_s}s")
            await reader.poll(0.3)
        return sum(map(len, reader.outcomes.values()))
    finally:
        await reader.stop()


async def finish(
    scenario: Scenario, mode: str, ids: list[str], started: float, *services: ServiceProcess
) -> ScenarioResult:
    """Wait for every outcome, stop the consumers with SIGTERM (each must exit 0), account."""
    await wait_for_outcomes(scenario.fault_stack.bootstrap, scenario.topics, ids, timeout_s=240)
    for service in services:
        if service.running:
            assert await service.sigterm() == 0, scenario.logs()
    return await scenario.result(mode, ids, time.monotonic() - started)


def assert_reviews_delivered(result: ScenarioResult, scenario: Scenario) -> None:
    """Every verdict for review (`for_review_topic`) has its record on the review topic, no other
    outcome has one; exactly once, one record per verdict, equal to it. Some verdicts were for
    review (else this proves nothing): see "review verdicts" in tests/support/faults.py."""
    assert result.for_review > 0, f"no verdict was for review\n{scenario.logs()}"
    assert (result.reviews_lost, result.reviews_unexpected) == (0, 0), scenario.logs()
    if result.mode == EXACTLY_ONCE:
        assert (result.reviews_duplicates, result.reviews_unlike) == (0, 0), scenario.logs()


async def assert_nothing_lost(result: ScenarioResult, scenario: Scenario) -> None:
    """No produced id without an outcome; when there is one, say whether the broker still has
    its input record (the service lost it) or not (the broker did). Nor any review record."""
    assert_reviews_delivered(result, scenario)
    if result.lost:
        found = await find_in_input(
            scenario.fault_stack.bootstrap, scenario.topics.input, result.lost_ids
        )
        raise AssertionError(
            f"{result.lost} lost; in the input topic at (partition, offset): {found}; "
            f"absent from it: {sorted(set(result.lost_ids) - set(found))[:10]}\n{scenario.logs()}"
        )
    assert result.unexpected == 0


async def fault_mid_stream(
    scenario: Scenario,
    mode: str,
    fault: Callable[[ServiceProcess], Awaitable[None]],
    *,
    env: Mapping[str, str] | None = None,
    events: int = EVENTS,
    after: int = AFTER,
) -> ScenarioResult:
    """Produce the backlog, start one consumer, apply `fault` once `after` outcomes exist,
    let it finish; the fault must have landed mid-stream, nothing may be lost, and exactly once
    may repeat nothing committed."""
    started = time.monotonic()
    bootstrap = scenario.fault_stack.bootstrap
    ids = await produce(bootstrap, scenario.topics.input, events, f"{scenario.topics.group}-")
    consumer = scenario.service(delivery=mode, env=env)
    await consumer.start()
    seen = await progress(scenario, after)
    await fault(consumer)
    result = await finish(scenario, mode, ids, started, consumer)
    window = int((env or {}).get("GUARDSTREAM_MAX_IN_FLIGHT", WINDOW))
    print(f"\n{scenario.name}: the fault landed at {seen} of {events} outcomes")
    assert_mid_stream(seen, events, window, "the fault")
    await assert_nothing_lost(result, scenario)
    if mode == EXACTLY_ONCE:
        assert result.duplicates_committed == 0
    return result


@pytest.mark.stack
async def test_triton_killed_then_restarted_pauses_instead_of_dead_lettering(
    fault_stack: FaultStack, scenario: Scenario
) -> None:
    # Needs requests in flight when Triton dies (they fail; five failures open the breaker) and
    # a backlog that waits out the outage and is judged after the restart, none dead-lettered:
    # EVENTS/AFTER. The bench guard loads in about a second, so the restart is quick.
    async def kill_triton(consumer: ServiceProcess) -> None:
        mark = consumer.log_mark()
        fault_stack.kill_triton()
        await consumer.wait_for_log("guard breaker open", timeout_s=60, after=mark)
        await asyncio.sleep(3)  # an outage, not a blip: six probes fail meanwhile
        await fault_stack.start_triton()
        await consumer.wait_for_log("guard breaker closed", timeout_s=60, after=mark)

    env = {"GUARDSTREAM_BREAKER_PROBE_INTERVAL_S": "0.5"}
    result = await fault_mid_stream(scenario, AT_LEAST_ONCE, kill_triton, env=env)
    assert result.dead_letters == {}, "an outage must not dead-letter the backlog"
    assert result.verdicts == EVENTS


@pytest.mark.stack
async def test_hung_triton_times_out_opens_the_breaker_and_recovers(
    fault_stack: FaultStack, scenario: Scenario
) -> None:
    # Needs a window of 16 requests hanging when Triton stops, then, after it resumes, 50 more
    # outcomes to tell a server that came back from one that did not (below): EVENTS - AFTER -
    # 16 = 134 of backlog leaves room for them.
    async def hang_triton(consumer: ServiceProcess) -> None:
        mark = consumer.log_mark()
        fault_stack.pause_triton()  # SIGSTOP: connections stay open, nothing answers
        try:
            await consumer.wait_for_log("guard breaker open", timeout_s=60, after=mark)
            await asyncio.sleep(3)
            outcomes = await read_outcomes(fault_stack.bootstrap, scenario.topics)
            done = sum(map(len, outcomes.values()))
        finally:
            fault_stack.resume_triton()
        try:
            await progress(scenario, done + 50, timeout_s=20)
        except TimeoutError:
            # Now and then this Triton does not come back from SIGSTOP: it exits without a word,
            # or stays up answering nothing. The breaker rightly stays open meanwhile (nothing
            # is dead-lettered); what Kubernetes would do, restart it.
            if fault_stack.triton_running:
                print("\nTriton wedged after SIGCONT: restarted, as a liveness probe would")
                await fault_stack.restart_triton()
            else:
                print("\nTriton exited after SIGCONT: started again, as Kubernetes would")
                await fault_stack.start_triton()
        await consumer.wait_for_log("guard breaker closed", timeout_s=60, after=mark)

    env = {
        # Short enough to notice the hang quickly, long enough for a queue of 16 requests (a
        # timeout shorter than the queue opens the breaker on load alone): the bench guard
        # answers one in milliseconds, where the CPU guard's detector needed this at 3 s.
        "GUARDSTREAM_GUARD_TIMEOUT_S": "1.5",
        "GUARDSTREAM_MAX_IN_FLIGHT": "16",
        "GUARDSTREAM_BREAKER_PROBE_INTERVAL_S": "0.5",
    }
    try:
        result = await fault_mid_stream(scenario, AT_LEAST_ONCE, hang_triton, env=env)
    finally:
        # A Triton that was stopped may hold unanswered requests: the next scenarios get a
        # fresh server.
        await fault_stack.restart_triton()
    assert result.dead_letters == {}
    assert result.duplicates_committed == 0


@pytest.mark.stack
async def test_redis_killed_then_restarted_mid_stream_loses_nothing(
    fault_stack: FaultStack, scenario: Scenario, redis_server: RedisServer
) -> None:
    # The shared reuse store dies under a full window: its requests fail (bounded by the
    # timeout), the events go to the guard, nothing is lost or dead-lettered; once it is back,
    # the store is used again. The events cycle through a few images, so reuse answers most
    # of them while Redis is up: the model calls drop, and the backlog lasts past the outage.
    async def kill_redis(consumer: ServiceProcess) -> None:
        mark = consumer.log_mark()
        redis_server.kill()
        await consumer.wait_for_log("reuse store", timeout_s=60, after=mark)
        await asyncio.sleep(1)
        redis_server.restart()
        await consumer.wait_for_log("reuse store answers again", timeout_s=60, after=mark)

    env = {
        "GUARDSTREAM_REUSE": "redis",
        "GUARDSTREAM_REDIS_URL": redis_server.url,
        "GUARDSTREAM_REDIS_TIMEOUT_S": "0.2",
    }
    events = 1500  # reused verdicts come fast: a backlog that outlasts the outage
    result = await fault_mid_stream(scenario, AT_LEAST_ONCE, kill_redis, env=env, events=events)
    assert result.dead_letters == {}, "a store outage must not dead-letter anything"
    assert result.verdicts == events


@pytest.mark.stack
@pytest.mark.parametrize("mode", [AT_LEAST_ONCE, EXACTLY_ONCE])
async def test_broker_restart_mid_stream_loses_nothing(
    fault_stack: FaultStack, scenario: Scenario, mode: str
) -> None:
    # Needs the frozen consumer to hold a window of records taken and unfinished, and a backlog
    # to fetch from the restarted broker after it reconnects and rejoins: EVENTS/AFTER.
    async def restart_broker(consumer: ServiceProcess) -> None:
        # noida-db 0.2.3 loses writes it acknowledged while a graceful shutdown is under way
        # (a canary producer measured 2 of 4087 lost): the consumer is frozen for the restart
        # so that no write of its own races the shutdown. It keeps its connections, offsets
        # and in-flight records, and must reconnect, rejoin and finish when it thaws.
        consumer.pause()
        try:
            await asyncio.sleep(0.5)
            await fault_stack.stop_broker()
            # Down for a moment only: the consumer, frozen, sees none of the time it is down,
            # only the new process (dropped connections, a group coordinator that forgot it).
            await asyncio.sleep(0.5)
            await fault_stack.start_broker()
        finally:
            consumer.resume()

    await fault_mid_stream(scenario, mode, restart_broker)


@pytest.mark.stack
@pytest.mark.parametrize("mode", [AT_LEAST_ONCE, EXACTLY_ONCE])
async def test_broker_frozen_mid_stream_loses_nothing(
    fault_stack: FaultStack, scenario: Scenario, mode: str
) -> None:
    # Needs publishes and commits (every 100 ms) in flight when the broker stops answering, and
    # a backlog after it answers again: EVENTS/AFTER.
    async def freeze_broker(consumer: ServiceProcess) -> None:
        fault_stack.pause_broker()  # SIGSTOP: requests hang, as behind a network partition
        try:
            await asyncio.sleep(5)
        finally:
            fault_stack.resume_broker()

    await fault_mid_stream(scenario, mode, freeze_broker)


# The consumer is killed with records in flight; at least once, the restart may repeat what was
# published and not yet committed: the window (32) and what finished since the last commit.
# That bound holds where the window's records wait on the model, as on any real guard (the CPU
# detector here, an LLM on a GPU far longer), so at least once runs on the CPU guard: on the
# zero-cost bench guard they wait on their publish instead, are visible when the kill lands, and
# 13 runs (commits every 20 ms) repeated 12 to 38. Exactly once repeats nothing committed
# whatever the pace, so it runs on the bench guard with the other scenarios.
KILL_ENV = {
    # Static membership: the restarted instance takes its partitions back without waiting for
    # the dead one's session to expire (as a StatefulSet pod would, with its stable name).
    "GUARDSTREAM_GROUP_INSTANCE_ID": "pod-0",
    "GUARDSTREAM_MAX_IN_FLIGHT": "32",
}
# On the CPU guard (~25 events/s here): AFTER_CPU is above the bound, so a restart that
# re-judged committed work would fail it; EVENTS_CPU leaves the window in flight at the kill and
# a backlog (~20) for the restarted consumer.
EVENTS_CPU = 100
AFTER_CPU = 45


@pytest.mark.stack
@pytest.mark.parametrize("mode", [AT_LEAST_ONCE, EXACTLY_ONCE])
async def test_consumer_killed_mid_batch_then_restarted(
    fault_stack: FaultStack, scenario: Scenario, mode: str
) -> None:
    async def kill_and_restart(consumer: ServiceProcess) -> None:
        await consumer.sigkill()
        await consumer.start()

    if mode == AT_LEAST_ONCE:
        await fault_stack.serve(CPU_GUARD)
        try:
            result = await fault_mid_stream(
                scenario, mode, kill_and_restart, env=KILL_ENV, events=EVENTS_CPU, after=AFTER_CPU
            )
        finally:
            await fault_stack.serve(BENCH)
    else:
        result = await fault_mid_stream(scenario, mode, kill_and_restart, env=KILL_ENV)
    if mode == AT_LEAST_ONCE:
        assert result.duplicates_committed <= 32 + 3  # the window, and what finished meanwhile


# A second consumer joins the group mid-stream and leaves (SIGTERM) before the end; each change
# of the group must move partitions with records in flight and a backlog left for their new
# owner. Alone, the first consumer would judge the whole backlog while the second starts
# (~1.5 s) and until its next heartbeat tells it of the join (every 3.3 s): ~1000 events at
# ~300/s. So it is frozen (SIGSTOP, as in a long pause) from the moment the second is started
# until the second has subscribed and the first's heartbeat is overdue: when it thaws, its
# heartbeat at once finds the group rebalancing, and it drains the window it holds, commits
# and gives partitions up with the backlog still on them. The second leaves as soon as it has
# its share, so its partitions go back to the first with a backlog too. REBALANCE_EVENTS
# covers the window drained at the join, what both judge until the leave (~0.2 s) and more than
# a window left after it, with room for a faster machine; both moves are checked.
REBALANCE_EVENTS = 450
REBALANCE_AFTER = 20  # the first consumer is judging, and has committed, when it is frozen
HEARTBEAT_S = 10 / 3  # aiokafka's heartbeat interval for the default 10 s session timeout


class Watch:
    """Counts outcomes as they arrive, from one reader polled in the background: a count costs
    nothing when it is taken (a fresh reader's start-up takes long enough on Tansu for both
    consumers to judge hundreds of events)."""

    def __init__(self, scenario: Scenario) -> None:
        self._reader = OutcomeReader(scenario.fault_stack.bootstrap, scenario.topics)
        self._task: asyncio.Task[None] | None = None
        self._polled = asyncio.Event()

    @property
    def count(self) -> int:
        return sum(map(len, self._reader.outcomes.values()))

    async def until(self, at_least: int, timeout_s: float = 120) -> int:
        async with asyncio.timeout(timeout_s):
            while self.count < at_least:
                self._polled.clear()
                await self._polled.wait()
        return self.count

    async def _poll(self) -> None:
        while True:
            await self._reader.poll(0.1)
            self._polled.set()

    async def __aenter__(self) -> Watch:
        await self._reader.start()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._reader.stop()


async def join_then_leave(scenario: Scenario, mode: str) -> ScenarioResult:
    """A second consumer joins the group mid-stream and leaves (SIGTERM) before the end."""
    started = time.monotonic()
    bootstrap = scenario.fault_stack.bootstrap
    idempotent = scenario.fault_stack.config.broker != "tansu"
    ids = await produce(
        bootstrap, scenario.topics.input, REBALANCE_EVENTS, f"rebal-{mode}-", idempotent=idempotent
    )
    first = scenario.service("first", delivery=mode)
    second = scenario.service("second", delivery=mode)
    async with Watch(scenario) as watch:
        await first.start()
        await watch.until(REBALANCE_AFTER)
        first.pause()
        thaw_at = time.monotonic() + HEARTBEAT_S + 0.2
        mark = first.log_mark()
        try:
            await second.start()
            await second.wait_for_log("consuming", timeout_s=60)
            await asyncio.sleep(max(0.3, thaw_at - time.monotonic()))
        finally:
            first.resume()
        await first.wait_for_log("partitions revoked", timeout_s=90, after=mark)
        at_join = watch.count
        # The second leaves as soon as it has its partitions, with the records it took from
        # them in flight (drained, committed) and the rest of their backlog left.
        await second.wait_for_log("partitions assigned", timeout_s=90)
        at_leave = watch.count
        assert await second.sigterm() == 0, scenario.logs()
    result = await finish(scenario, mode, ids, started, first)
    print(f"\n{scenario.name}: joined at {at_join}, left at {at_leave} of {REBALANCE_EVENTS}")
    assert_mid_stream(at_join, REBALANCE_EVENTS, WINDOW, "the join")
    assert_mid_stream(at_leave, REBALANCE_EVENTS, WINDOW, "the leave")
    return result


@pytest.mark.stack
async def test_a_second_consumer_joins_then_leaves_at_least_once(tansu_stack: FaultStack) -> None:
    scenario = await Scenario.open(
        tansu_stack, "a_second_consumer_joins_then_leaves_at_least_once_on_tansu"
    )
    try:
        result = await join_then_leave(scenario, AT_LEAST_ONCE)
    finally:
        await scenario.close()
    await assert_nothing_lost(result, scenario)


@pytest.mark.stack
async def test_a_second_consumer_joins_then_leaves_exactly_once(scenario: Scenario) -> None:
    # Transactional offset commits carry no generation, so noida's bug is not hit here.
    result = await join_then_leave(scenario, EXACTLY_ONCE)
    await assert_nothing_lost(result, scenario)
    assert result.duplicates_committed == 0


@pytest.mark.stack
@pytest.mark.parametrize("mode", [AT_LEAST_ONCE, EXACTLY_ONCE])
async def test_sigterm_mid_stream_drains_commits_and_a_restart_continues(
    scenario: Scenario, mode: str
) -> None:
    # Needs records in flight at SIGTERM (drained and committed, so none is judged twice) and,
    # beyond the window drained, a backlog for the restarted consumer: EVENTS/AFTER.
    async def stop_and_restart(consumer: ServiceProcess) -> None:
        assert await consumer.sigterm() == 0, scenario.logs()
        assert "stopped cleanly" in consumer.log_since_start()
        await consumer.start()

    result = await fault_mid_stream(scenario, mode, stop_and_restart)
    assert result.duplicates_committed == 0  # a drained stop re-judges nothing


def poison_pill() -> bytes:
    pill = io.BytesIO()
    Image.new("L", (18_000, 18_000), 128).save(pill, "PNG")
    return pill.getvalue()


# Pills are the subject here, not the backlog: each must have ordinary events behind it on its
# partition, judged while it is stuck. 25 events between pills (about eight a partition) do.
PILL_EVENTS = 100


@pytest.mark.stack
async def test_poison_pills_are_dead_lettered_at_their_deadline_and_the_rest_flows(
    fault_stack: FaultStack, scenario: Scenario
) -> None:
    started = time.monotonic()
    # 324-Mpx greyscale PNGs of 0.3 MB: within the raised limits, about 3 s each to decode on an
    # idle machine, twice the deadline, while an ordinary event takes under 0.1 s. A decode
    # thread cannot be stopped, so each pill holds a decode worker until it is done: four
    # workers leave room for the ordinary events even when all three pills decode at once. On
    # the CPU guard the pills, spread through 500 events, rarely decoded at the same time; at
    # the bench guard's pace 25 events take ~0.1 s, so their decodes overlap (up to three
    # threads on two cores), while ordinary events (decode ~1 ms, no detector) take the fourth
    # worker, and each pill still takes more than its deadline.
    consumer = scenario.service(
        env={
            "GUARDSTREAM_EVENT_DEADLINE_S": "1.5",
            "GUARDSTREAM_MAX_IMAGE_PIXELS": "330000000",
            "GUARDSTREAM_MAX_IMAGE_SIDE": "18000",
            "GUARDSTREAM_DECODE_WORKERS": "4",
            "GUARDSTREAM_MAX_IN_FLIGHT": "4",
        }
    )
    # Making the pill takes ~3 s (zlib on 324 MB): the consumer starts meanwhile.
    await consumer.start()
    pill = await asyncio.to_thread(poison_pill)
    pills = {f"pill-{i}": encode_event(image_event(f"pill-{i}", image=pill)) for i in range(3)}
    ids = await produce(
        fault_stack.bootstrap, scenario.topics.input, PILL_EVENTS, "pills-", extra=pills
    )
    result = await finish(scenario, AT_LEAST_ONCE, ids, started, consumer)
    await assert_nothing_lost(result, scenario)
    assert result.dead_letters == {"deadline_exceeded": 3}
    assert result.verdicts == PILL_EVENTS
