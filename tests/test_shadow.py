"""Shadow mode: the candidate judges beside the live guard, bounded, never waited on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.app import guard_from
from service.config import Settings
from service.core.breaker import Breaker
from service.core.pipeline import Pipeline
from service.core.verdicts import Verdict, agreement
from service.ops.metrics import Metrics
from service.shadow import CandidateParts, Shadow, ShadowSettings
from tests.support.kafka import Broker, FakeProducer
from tests.support.pipeline import SAFE, ScriptedGuard, always_ready, event_record, make_pipeline

UNSAFE = json.dumps(
    {"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "a fight"}
)
O3 = json.dumps({"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "x"})


@pytest.fixture
async def pool() -> AsyncIterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield executor


async def live_verdict(pool: ThreadPoolExecutor, answer: str = SAFE) -> Verdict:
    outcome = await make_pipeline(ScriptedGuard(answer), pool).judge(event_record())
    assert isinstance(outcome, Verdict)
    return outcome


def shadow(
    candidate: Pipeline, broker: Broker, metrics: Metrics, pool: ThreadPoolExecutor, **config: float
) -> Shadow:
    parts = CandidateParts(
        guard_from(Settings(triton_url="127.0.0.1:1", guard_model="candidate")),
        Breaker(100, always_ready, 0.01),
        pool,
    )
    settings = ShadowSettings(model="candidate", **config)  # type: ignore[arg-type]
    return Shadow(settings, candidate, FakeProducer(broker, "shadow"), metrics, parts)


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_stricter_candidate_is_published_beside_the_live_verdict_and_counted(
    pool: ThreadPoolExecutor,
) -> None:
    broker, metrics = Broker(), Metrics()
    live = await live_verdict(pool)
    runner = shadow(make_pipeline(ScriptedGuard(UNSAFE), pool), broker, metrics, pool)
    runner.offer(event_record(), live)
    await runner.stop(5)
    (published,) = broker.published
    value = json.loads(published.value)
    assert published.topic == "verdicts.shadow"
    assert (value["rating"], value["category_code"], value["event_id"]) == ("Unsafe", "O2", "ev-1")
    assert value["shadow"] == {
        "live_rating": "Safe",
        "live_category_code": "NA",
        "live_action": live.action,
        "live_policy_version": live.policy_version,
        "agreement": "stricter",
    }
    assert ("event-id", b"ev-1") in published.headers
    labels = {"agreement": "stricter", "live_category": "NA", "category": "O2"}
    assert counted(metrics, "guardstream_shadow_verdicts_total", **labels) == 1


async def test_offering_returns_at_once_and_work_beyond_the_bound_is_dropped_and_counted(
    pool: ThreadPoolExecutor,
) -> None:
    broker, metrics = Broker(), Metrics()
    live = await live_verdict(pool)
    slow = make_pipeline(ScriptedGuard(0.3), pool)  # answers Safe after 0.3 s
    runner = shadow(slow, broker, metrics, pool, max_in_flight=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        runner.offer(event_record(), live)
    assert loop.time() - started < 0.05  # the live path never waits
    assert counted(metrics, "guardstream_shadow_skipped_total", reason="busy") == 3
    await runner.stop(5)
    assert len(broker.published) == 2
    assert counted(metrics, "guardstream_shadow_in_flight") == 0


async def test_a_candidate_slower_than_the_budget_is_dropped_not_waited_for(
    pool: ThreadPoolExecutor,
) -> None:
    broker, metrics = Broker(), Metrics()
    live = await live_verdict(pool)
    runner = shadow(make_pipeline(ScriptedGuard(5.0), pool), broker, metrics, pool, timeout_s=0.1)
    runner.offer(event_record(), live)
    await asyncio.sleep(0.3)
    assert counted(metrics, "guardstream_shadow_skipped_total", reason="timeout") == 1
    assert counted(metrics, "guardstream_shadow_in_flight") == 0
    await runner.stop(1)
    assert broker.published == []


async def test_stopping_drops_what_is_left_after_the_budget(pool: ThreadPoolExecutor) -> None:
    broker, metrics = Broker(), Metrics()
    live = await live_verdict(pool)
    runner = shadow(make_pipeline(ScriptedGuard(5.0), pool), broker, metrics, pool)
    runner.offer(event_record(), live)
    await runner.stop(0.05)
    assert counted(metrics, "guardstream_shadow_skipped_total", reason="shutdown") == 1
    assert broker.published == []


async def test_only_the_sampled_fraction_and_only_verdicts_are_shadowed(
    pool: ThreadPoolExecutor,
) -> None:
    broker, metrics = Broker(), Metrics()
    live = await live_verdict(pool)
    runner = shadow(make_pipeline(ScriptedGuard(SAFE), pool), broker, metrics, pool, sample=0.0)
    runner.offer(event_record(), live)
    await runner.stop(1)
    assert broker.published == []


@pytest.mark.parametrize(
    ("live", "candidate", "expected"),
    [
        (SAFE, SAFE, "agree"),
        (SAFE, UNSAFE, "stricter"),
        (UNSAFE, SAFE, "more_lenient"),
        (UNSAFE, O3, "other_category"),
    ],
)
async def test_agreement_compares_what_the_upload_service_would_do(
    pool: ThreadPoolExecutor, live: str, candidate: str, expected: str
) -> None:
    assert agreement(await live_verdict(pool, live), await live_verdict(pool, candidate)) == (
        expected
    )


async def test_without_actions_the_rating_decides_and_actions_win_over_ratings(
    pool: ThreadPoolExecutor,
) -> None:
    safe, unsafe = await live_verdict(pool, SAFE), await live_verdict(pool, UNSAFE)
    no_action = unsafe.model_copy(update={"action": None})
    assert agreement(safe.model_copy(update={"action": None}), no_action) == "stricter"
    reviewed = unsafe.model_copy(update={"action": "review"})
    assert agreement(unsafe, reviewed) == "more_lenient"  # block → review
