"""Hostile input end to end: hundreds of bad events, one outcome each, the consumer unharmed.

One run (module scope) starts the canary and the hostile servers on loopback, publishes every
case of `tests.support.hostile` to fresh topics, serves them with the service in this process
(fetching allowed from 127.0.0.2 only), and reads both output topics. The tests then check each
case's outcome, the canary, the service task and this process's memory. The run's summary is printed
and written to `.guardstream/hostile-summary.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image
from yarl import URL

from service.app import serve
from service.client import encode_event, image_event
from service.dev import stack
from tests.support.hostile import (
    ALLOWED_HOST,
    LIMITS,
    VERDICT,
    Canary,
    Hostile,
    ImageServer,
    RawServer,
    Servers,
    good_png,
    hostile_events,
)
from tests.support.outputs import collect
from tests.support.stack import Topics

SUMMARY_PATH = Path(__file__).resolve().parent.parent / ".guardstream" / "hostile-summary.md"
COLLECT_TIMEOUT_S = 180.0
RSS_GROWTH_LIMIT_MIB = 300.0
SENTINEL_KEY = b"sentinel"
INTERNAL_ERROR = "internal_error"

Outcome = tuple[str, Any, dict[str, bytes]]
"""(topic, parsed value, headers) of one record on the verdict or dead-letter topic."""


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


class RssSampler:
    """This process's resident memory, sampled while the service runs in it."""

    def __init__(self) -> None:
        self.baseline_kib = rss_kib()
        self.peak_kib = self.baseline_kib
        self.after_kib = self.baseline_kib

    async def sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib())
            await asyncio.sleep(0.05)
        self.after_kib = rss_kib()
        self.peak_kib = max(self.peak_kib, self.after_kib)

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.baseline_kib) / 1024


@dataclass
class Run:
    cases: dict[bytes, Hostile]
    """By record key."""
    outcomes: dict[bytes, list[Outcome]]
    topics: Topics
    canary_connections: int
    alive_before_stop: bool
    stop_error: BaseException | None
    rss: RssSampler
    seconds: float

    def labels(self, key: bytes) -> list[str]:
        return [self.label(topic, value) for topic, value, _ in self.outcomes.get(key, [])]

    def label(self, topic: str, value: Any) -> str:
        return value["error"]["code"] if topic == self.topics.dead_letters else VERDICT


@pytest.fixture(scope="module")
async def run(embedded_stack: stack.StackState) -> Run:
    tag = uuid.uuid4().hex[:8]
    topics = await Topics.create(embedded_stack.bootstrap_servers, tag)
    settings = topics.settings(embedded_stack, **LIMITS, event_deadline_s=30.0, max_in_flight=64)
    pillow_limit = Image.MAX_IMAGE_PIXELS  # serve() sets it process-wide; put it back after
    async with hostile_servers() as (servers, canary):
        cases = {
            f"hostile-{i:03d}".encode(): case
            for i, case in enumerate(hostile_events(f"hostile-{tag}-", servers))
        }
        await publish(embedded_stack.bootstrap_servers, topics.input, cases)
        rss = RssSampler()
        started = time.monotonic()
        stop = asyncio.Event()
        sampling = asyncio.create_task(rss.sample(stop))
        service = asyncio.create_task(serve(settings, stop))
        try:
            outcomes = await until_collected_or_crashed(
                service, embedded_stack.bootstrap_servers, topics, len(cases)
            )
            await publish(
                embedded_stack.bootstrap_servers, topics.input, {SENTINEL_KEY: sentinel()}
            )
            outcomes = await until_collected_or_crashed(
                service, embedded_stack.bootstrap_servers, topics, len(cases) + 1, timeout_s=60
            )
            alive = not service.done()
        finally:
            stop.set()
            stop_error = await stopped(service)
            await sampling
            Image.MAX_IMAGE_PIXELS = pillow_limit
        seconds = time.monotonic() - started
        result = Run(cases, outcomes, topics, canary.connections, alive, stop_error, rss, seconds)
    summary = summarize(result)
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(summary + "\n")
    print("\n" + summary)
    return result


@contextlib.asynccontextmanager
async def hostile_servers() -> AsyncIterator[tuple[Servers, Canary]]:
    """The canary, the allowed image server, the raw server and a closed allowed port."""
    canary, images, raw = Canary(), ImageServer(), RawServer()
    # Bound and never listening: connections to it are refused, and nobody else takes it.
    closed = socket.socket()
    try:
        await canary.start()
        await images.start()
        await raw.start()
        closed.bind((ALLOWED_HOST, 0))
        closed_url = URL.build(scheme="http", host=ALLOWED_HOST, port=closed.getsockname()[1])
        yield Servers(canary.port, images.url, raw.url, closed_url), canary
    finally:
        closed.close()
        await raw.close()
        await images.close()
        await canary.close()


async def publish(bootstrap: str, topic: str, cases: dict[bytes, Hostile]) -> None:
    """Send every case as it is (tombstones included), all in flight at once."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=2_000_000, linger_ms=5
    )
    await producer.start()
    try:
        deliveries = [
            await producer.send(
                topic,
                value=case.value,
                key=key,
                headers=[] if case.event_id is None else [("event-id", case.event_id.encode())],
            )
            for key, case in cases.items()
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


def sentinel() -> Hostile:
    """A plain good event sent after every hostile one was answered: the consumer must judge it."""
    event_id = f"sentinel-{uuid.uuid4().hex[:8]}"
    return Hostile(
        "sentinel", encode_event(image_event(event_id, image=good_png())), VERDICT, event_id
    )


async def until_collected_or_crashed(
    service: asyncio.Task[None],
    bootstrap: str,
    topics: Topics,
    expected: int,
    timeout_s: float = COLLECT_TIMEOUT_S,
) -> dict[bytes, list[Outcome]]:
    """The outcomes read; none if the service task ended first (the tests then say how)."""
    collecting = asyncio.create_task(collect(bootstrap, topics, expected, timeout_s))
    await asyncio.wait([collecting, service], return_when=asyncio.FIRST_COMPLETED)
    if not collecting.done():
        collecting.cancel()
        return {}
    return collecting.result()


async def stopped(service: asyncio.Task[None]) -> BaseException | None:
    """Wait for the service to stop; what it raised, if anything."""
    try:
        await asyncio.wait_for(service, 60)
    except Exception as exc:
        return exc
    return None


# --- the summary ----------------------------------------------------------------------------


def summarize(run: Run) -> str:
    expected = Counter(case.expect for case in run.cases.values())
    matched = Counter(
        case.expect for key, case in run.cases.items() if run.labels(key) == [case.expect]
    )
    example: dict[str, str] = {}
    for case in run.cases.values():
        example.setdefault(case.expect, case.name)
    rows = [
        f"| {code} | {count} | {matched[code]} | {example[code][:60]} |"
        for code, count in sorted(expected.items(), key=lambda item: (-item[1], item[0]))
    ]
    crashes = internal_errors(run) + (0 if run.alive_before_stop and run.stop_error is None else 1)
    return "\n".join(
        [
            "## Hostile input",
            "",
            "| expected outcome | inputs | ended so | e.g. |",
            "|---|---|---|---|",
            *rows,
            f"| **total** | {sum(expected.values())} | {sum(matched.values())} | |",
            "",
            f"- crashes (internal_error dead letters, service task failures): {crashes}",
            f"- connections to the forbidden canary (127.0.0.1, ::1): {run.canary_connections}",
            f"- peak RSS of the consumer's process: {run.rss.peak_kib / 1024:.0f} MiB "
            f"(baseline {run.rss.baseline_kib / 1024:.0f} MiB, growth "
            f"{run.rss.growth_mib:.0f} MiB, after {run.rss.after_kib / 1024:.0f} MiB)",
            f"- serving time: {run.seconds:.1f} s for {len(run.cases)} events and a sentinel",
        ]
    )


def internal_errors(run: Run) -> int:
    return sum(label == INTERNAL_ERROR for key in run.outcomes for label in run.labels(key))


# --- the tests ------------------------------------------------------------------------------


def test_the_generator_makes_over_200_distinct_cases_reaching_every_code() -> None:
    servers = Servers(
        1, URL("http://127.0.0.2:2"), URL("http://127.0.0.2:3"), URL("http://127.0.0.2:4")
    )
    cases = hostile_events("g-", servers)
    assert len(cases) >= 200
    assert len({case.name for case in cases}) == len(cases)
    assert {case.expect for case in cases} >= {
        VERDICT,
        "invalid_json",
        "invalid_event",
        "event_too_large",
        "unknown_policy",
        "url_forbidden",
        "fetch_failed",
        "fetch_timeout",
        "image_too_large",
        "unsupported_image_format",
        "image_decode_failed",
    }


@pytest.mark.stack
def test_every_hostile_event_ends_as_exactly_one_outcome_with_its_expected_code(run: Run) -> None:
    wrong: dict[str, str] = {}
    for key, case in run.cases.items():
        labels = run.labels(key)
        if labels != [case.expect]:
            wrong[case.name] = f"expected {case.expect}, got {labels}"
    assert wrong == {}, f"{len(wrong)} of {len(run.cases)} cases:\n" + "\n".join(
        f"  {name}: {what}" for name, what in wrong.items()
    )
    assert set(run.outcomes) == {*run.cases, SENTINEL_KEY}


@pytest.mark.stack
def test_no_event_is_an_internal_error(run: Run) -> None:
    assert internal_errors(run) == 0


@pytest.mark.stack
def test_outcomes_carry_the_event_id_the_producer_sent(run: Run) -> None:
    wrong = {
        case.name: value["event_id"]
        for key, case in run.cases.items()
        for _, value, _ in run.outcomes.get(key, [])
        if value["event_id"] != case.event_id
    }
    assert wrong == {}


@pytest.mark.stack
def test_no_connection_reaches_the_forbidden_canary(run: Run) -> None:
    assert run.canary_connections == 0


@pytest.mark.stack
def test_the_consumer_survives_judges_a_good_event_after_and_stops_cleanly(run: Run) -> None:
    assert run.alive_before_stop
    assert run.stop_error is None
    assert run.labels(SENTINEL_KEY) == [VERDICT]


@pytest.mark.stack
def test_memory_of_the_consumer_process_stays_bounded(run: Run) -> None:
    print(
        f"\nRSS: baseline {run.rss.baseline_kib / 1024:.0f} MiB, peak {run.rss.peak_kib / 1024:.0f}"
        f" MiB, after {run.rss.after_kib / 1024:.0f} MiB; VmHWM {rss_kib('VmHWM') / 1024:.0f} MiB"
    )
    assert run.rss.growth_mib < RSS_GROWTH_LIMIT_MIB
