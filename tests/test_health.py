"""The probe and scrape endpoints, served for real on a free port and asked over HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from service.core.errors import DEAD_LETTER_FAULTS
from service.ops.health import Check, HealthServer
from service.ops.metrics import Metrics, exemplar

ALL_OK = {
    "partitions": Check(ok=True, detail="waiting for an assignment"),
    "broker": Check(ok=True, detail="127.0.0.1:9092 reachable"),
    "guard": Check(ok=True, detail="model 'guard' ready"),
    "breaker": Check(ok=True, detail="closed"),
}


class FakeSource:
    """Answers with `checks`, or raises `error`, or never answers when `hang` is set."""

    def __init__(self) -> None:
        self.checks: Mapping[str, Check] = ALL_OK
        self.error: Exception | None = None
        self.hang = False
        self.cancelled = False

    async def readiness(self) -> Mapping[str, Check]:
        if self.error is not None:
            raise self.error
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return self.checks


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def server(source: FakeSource, metrics: Metrics) -> AsyncIterator[HealthServer]:
    health = HealthServer("127.0.0.1", 0, source, metrics, check_timeout_s=0.2)
    await health.start()
    yield health
    await health.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_livez_answers_while_the_loop_runs(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(url(server, "/livez")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readyz_is_200_with_every_check_when_all_pass(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == {
            "status": "ready",
            "checks": {
                "partitions": {"ok": True, "detail": "waiting for an assignment"},
                "broker": {"ok": True, "detail": "127.0.0.1:9092 reachable"},
                "guard": {"ok": True, "detail": "model 'guard' ready"},
                "breaker": {"ok": True, "detail": "closed"},
            },
        }


async def test_one_failing_check_makes_readyz_503_and_names_it(
    server: HealthServer, source: FakeSource, http: aiohttp.ClientSession
) -> None:
    source.checks = {**ALL_OK, "guard": Check(ok=False, detail="model 'guard' not ready")}
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["guard"] == {"ok": False, "detail": "model 'guard' not ready"}
    assert body["checks"]["broker"]["ok"] is True


async def test_a_source_that_raises_is_not_ready_rather_than_a_500(
    server: HealthServer,
    source: FakeSource,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.ops.health")
    source.error = RuntimeError("consumer not started")
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        body = await response.json()
    assert body == {
        "status": "not ready",
        "checks": {"readiness": {"ok": False, "detail": "RuntimeError: consumer not started"}},
    }
    (raised,) = [r for r in caplog.records if r.exc_info]
    assert raised.exc_info is not None
    assert raised.exc_info[1] is source.error


async def test_a_hanging_source_is_not_ready_within_the_timeout_and_is_cancelled(
    server: HealthServer, source: FakeSource, http: aiohttp.ClientSession
) -> None:
    source.hang = True
    started = time.monotonic()
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        body = await response.json()
    assert time.monotonic() - started < 1.0
    assert body["checks"] == {
        "readiness": {"ok": False, "detail": "checks did not finish in 0.2s"},
    }
    assert source.cancelled, "a hung check must not outlive its probe"


async def test_a_timeout_inside_the_source_is_reported_as_its_own_error(
    server: HealthServer, source: FakeSource, http: aiohttp.ClientSession
) -> None:
    source.error = TimeoutError("metadata request timed out")
    async with http.get(url(server, "/readyz")) as response:
        body = await response.json()
    assert body["checks"]["readiness"]["detail"] == "TimeoutError: metadata request timed out"


async def test_readiness_changes_are_logged_once_each(
    server: HealthServer,
    source: FakeSource,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.ops.health")
    source.checks = {**ALL_OK, "breaker": Check(ok=False, detail="open for 12s")}
    for _ in range(3):
        async with http.get(url(server, "/readyz")):
            pass
    source.checks = ALL_OK
    for _ in range(2):
        async with http.get(url(server, "/readyz")):
            pass
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "not ready: breaker: open for 12s"),
        ("INFO", "ready"),
    ]


async def test_metrics_exposes_this_instance_registry(
    server: HealthServer, metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    metrics.dead_letters.labels(code="invalid_json", fault="input").inc()
    async with http.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    assert 'guardstream_dead_letters_total{code="invalid_json",fault="input"} 1.0' in (
        text.splitlines()
    )


async def test_every_dead_letter_code_is_exposed_from_the_start_with_its_fault(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    """A ratio alert over a series that does not exist yet stays silent: all start at 0."""
    async with http.get(url(server, "/metrics")) as response:
        lines = set((await response.text()).splitlines())
    for code, fault in DEAD_LETTER_FAULTS.items():
        assert f'guardstream_dead_letters_total{{code="{code}",fault="{fault}"}} 0.0' in lines
    assert DEAD_LETTER_FAULTS["invalid_json"] == "input"
    assert DEAD_LETTER_FAULTS["guard_unavailable"] == "service"


async def test_openmetrics_is_served_when_asked_with_the_trace_id_exemplar(
    server: HealthServer, metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metrics.guard_latency.labels("ok").observe(0.3, exemplar(trace_id))
    metrics.end_to_end_latency.observe(1.2, exemplar(None))  # no trace: no exemplar
    openmetrics = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with http.get(url(server, "/metrics"), headers={"Accept": openmetrics}) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await response.text()
    bucket = 'guardstream_guard_latency_seconds_bucket{le="0.5",outcome="ok"} 1.0'
    # The exemplar: its labels, the observed value, then when it was observed.
    with_exemplar = [line for line in text.splitlines() if " # {" in line]
    assert [line.rsplit(" ", 1)[0] for line in with_exemplar] == [
        f'{bucket} # {{trace_id="{trace_id}"}} 0.3'
    ]
    assert text.rstrip().endswith("# EOF")
    async with http.get(url(server, "/metrics")) as response:  # Prometheus text: no exemplars
        assert "# {" not in await response.text()


async def test_a_scrape_keeps_the_readiness_gauges_current(
    server: HealthServer, source: FakeSource, metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    source.checks = {**ALL_OK, "breaker": Check(ok=False, detail="open for 12s")}
    async with http.get(url(server, "/metrics")) as response:
        text = await response.text()
    assert "guardstream_ready 0.0" in text.splitlines()
    assert 'guardstream_ready_check{check="breaker"} 0.0' in text.splitlines()
    source.checks = ALL_OK
    async with http.get(url(server, "/metrics")) as response:
        text = await response.text()
    assert "guardstream_ready 1.0" in text.splitlines()
    assert 'guardstream_ready_check{check="breaker"} 1.0' in text.splitlines()


async def test_two_servers_do_not_mix_their_metrics(
    server: HealthServer, metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    other_metrics = Metrics()
    other = HealthServer("127.0.0.1", 0, FakeSource(), other_metrics)
    await other.start()
    try:
        metrics.dead_letters.labels(code="invalid_json", fault="input").inc()
        other_metrics.dead_letters.labels(code="guard_error", fault="service").inc(2)
        async with http.get(url(server, "/metrics")) as response:
            mine = await response.text()
        async with http.get(url(other, "/metrics")) as response:
            theirs = await response.text()
    finally:
        await other.stop()
    assert 'guardstream_dead_letters_total{code="invalid_json",fault="input"} 1.0' in mine
    assert 'guardstream_dead_letters_total{code="guard_error",fault="service"} 0.0' in mine
    assert 'guardstream_dead_letters_total{code="guard_error",fault="service"} 2.0' in theirs
    assert 'guardstream_dead_letters_total{code="invalid_json",fault="input"} 0.0' in theirs


async def test_an_unknown_path_is_404(server: HealthServer, http: aiohttp.ClientSession) -> None:
    async with http.get(url(server, "/healthz")) as response:
        assert response.status == 404


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
async def test_only_get_and_head_are_allowed(
    server: HealthServer, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.head(url(server, path)) as response:
        assert response.status == 200
    async with http.post(url(server, path)) as response:
        assert response.status == 405


async def test_probes_are_not_access_logged(
    server: HealthServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    async with http.get(url(server, "/livez")) as response:
        assert response.status == 200
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]


async def test_start_on_a_busy_port_raises(server: HealthServer, source: FakeSource) -> None:
    clash = HealthServer("127.0.0.1", server.port, source, Metrics())
    with pytest.raises(OSError, match="address already in use"):
        await clash.start()
    await clash.stop()


async def test_stop_frees_the_port(source: FakeSource, metrics: Metrics) -> None:
    first = HealthServer("127.0.0.1", 0, source, metrics)
    await first.start()
    port = first.port
    assert port != 0
    await first.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/livez")
    second = HealthServer("127.0.0.1", port, source, metrics)
    await second.start()
    await second.stop()
