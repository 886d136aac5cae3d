"""Known content against the real broker, the real Triton (CPU guard) and a real redis-server.

The service runs in this process twice, as two pods one after the other would: each reads the
reviewers' decisions topic whole at start-up and shares verdicts through Redis. The first run
judges the demo's known-content samples (a bank's near-duplicate, an image a reviewer decided,
one photo sent twice); the second, started afresh, gets the reviewer's decision again from the
topic, reuses the first run's verdict from Redis, and takes a bank entry published to the banks
topic while it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from service.app import serve
from service.client import ImageEventProducer
from service.config import Settings
from service.core.banks import EntryRecord, entry_key
from service.dev import stack
from service.dev.samples import KnownContentSetup, Sample, event_sample, known_samples, photo_bytes
from service.ops.metrics import Metrics
from tests.support.outputs import collect
from tests.support.redis import RedisServer
from tests.support.stack import Topics
from tests.support.waiting import eventually

pytestmark = pytest.mark.stack


@dataclass
class Runs:
    first: dict[str, dict[str, Any]]
    """The first run's verdicts by sample name."""
    second: dict[str, dict[str, Any]]
    metrics: Metrics
    """The second run's."""


async def publish(bootstrap: str, topic: str, samples: Sequence[Sample], round_: str) -> None:
    async with ImageEventProducer(bootstrap, topic, max_request_size=2_000_000) as producer:
        for sample in samples:
            await producer.send_raw(
                sample.value, key=f"{round_}:{sample.name}".encode(), event_id=sample.event_id
            )


async def send(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def verdicts(
    bootstrap: str, topics: Topics, expected: int, round_: str
) -> dict[str, dict[str, Any]]:
    outcomes = await collect(bootstrap, topics, expected)
    return {
        key.decode().split(":", 1)[1]: got[0][1]
        for key, got in outcomes.items()
        if key.decode().startswith(f"{round_}:")
    }


def settings_for(state: stack.StackState, topics: Topics, banks: Path, redis: str) -> Settings:
    return topics.settings(
        state, banks_file=banks, reuse="redis", redis_url=redis, redis_timeout_s=1.0
    )


@pytest.fixture(scope="module")
async def runs(
    embedded_stack: stack.StackState,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Runs]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    try:
        yield await _two_runs(embedded_stack, tmp_path_factory, redis)
    finally:
        redis.stop()


async def _two_runs(
    state: stack.StackState, tmp_path_factory: pytest.TempPathFactory, redis: RedisServer
) -> Runs:
    bootstrap = state.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    topics = await Topics.create(bootstrap, tag)
    samples, setup = known_samples(f"known-{tag}-")
    settings = settings_for(
        state, topics, setup.write_banks(tmp_path_factory.mktemp("b")), redis.url
    )
    await stack.create_topics(bootstrap, [settings.decisions_topic, settings.banks_topic], 1)
    await _publish_decisions(bootstrap, settings, setup)

    await publish(bootstrap, topics.input, samples, "1")
    first = await _serve_until(settings, Metrics(), verdicts(bootstrap, topics, len(samples), "1"))

    # The second run: the decided image and the moon again, then the camera photo once the
    # banks topic has told the running service that it is known-bad.
    again = [s for s in samples if s.name in ("coins.png (reviewer)", "moon.png")]
    camera = event_sample("camera", "Unsafe/O2", f"known-{tag}-camera", image=CAMERA)
    metrics = Metrics()

    async def second_round() -> dict[str, dict[str, Any]]:
        await publish(bootstrap, topics.input, again, "2")
        await send(
            bootstrap,
            settings.banks_topic,
            entry_key("demo-known-bad", "sha256", hashlib.sha256(CAMERA).hexdigest()),
            EntryRecord(entry_id="kb-cam", note="added while running").model_dump_json().encode(),
        )
        await eventually(lambda: _bank_entries(metrics) == 2, timeout_s=30)
        await publish(bootstrap, topics.input, [camera], "2")
        return await verdicts(bootstrap, topics, len(samples) + len(again) + 1, "2")

    second = await _serve_until(settings, metrics, second_round())
    return Runs(first, second, metrics)


CAMERA = photo_bytes("camera.png")


async def _publish_decisions(bootstrap: str, settings: Settings, setup: KnownContentSetup) -> None:
    for decision in setup.decisions:
        await send(
            bootstrap,
            settings.decisions_topic,
            decision.event_id.encode(),
            decision.model_dump_json().encode(),
        )


def _bank_entries(metrics: Metrics) -> float:
    return metrics.bank_entries.labels("demo-known-bad")._value.get()


async def _serve_until(
    settings: Settings, metrics: Metrics, until: Any
) -> dict[str, dict[str, Any]]:
    stop = asyncio.Event()
    service = asyncio.create_task(serve(settings, stop, metrics=metrics))
    try:
        result: dict[str, dict[str, Any]] = await until
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)
    return result


def test_a_bank_a_reviewer_and_reuse_decide_before_the_model(runs: Runs) -> None:
    decided = {name: verdict["decided_by"] for name, verdict in runs.first.items()}
    assert decided["ihc, re-encoded (bank)"] == "bank"
    assert decided["coins.png (reviewer)"] == "human"
    assert sorted([decided["moon.png"], decided["moon.png, sent again"]]) == ["model", "reuse"]
    bank = runs.first["ihc, re-encoded (bank)"]
    assert (bank["rating"], bank["category_code"], bank["action"]) == ("Unsafe", "O2", "block")
    assert bank["match"]["kind"] == "pdq"
    assert 0 < bank["match"]["distance"] <= 31


def test_every_verdict_carries_its_pdq_hash(runs: Runs) -> None:
    for verdict in runs.first.values():
        assert len(verdict["pdq"]) == 64
        assert verdict["pdq_quality"] >= 50


def test_a_restarted_service_knows_the_reviewers_decision_and_the_shared_verdicts(
    runs: Runs,
) -> None:
    assert runs.second["coins.png (reviewer)"]["decided_by"] == "human"
    moon = runs.second["moon.png"]
    assert moon["decided_by"] == "reuse"  # from Redis: the first run judged it
    first_moon = {runs.first[n]["event_id"] for n in ("moon.png", "moon.png, sent again")}
    assert moon["match"]["entry_id"] in first_moon


def test_a_bank_entry_published_while_running_reaches_the_running_service(runs: Runs) -> None:
    camera = runs.second["camera"]
    assert (camera["decided_by"], camera["action"]) == ("bank", "block")
    assert camera["match"] == {
        "bank": "demo-known-bad",
        "entry_id": "kb-cam",
        "kind": "sha256",
        "distance": 0,
    }
