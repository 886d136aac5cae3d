"""The probe and scrape endpoints, served for real on a free port and asked over HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from service.ops.health import Check, HealthServer
from service.ops.metrics import Metrics

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
    metrics.dead_letters.labels(code="invalid_json").inc()
    async with http.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    assert 'guardstream_dead_letters_total{code="invalid_json"} 1.0' in text.splitlines()


async def test_two_servers_do_not_mix_their_metrics(
    server: HealthServer, metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    other_metrics = Metrics()
    other = HealthServer("127.0.0.1", 0, FakeSource(), other_metrics)
    await other.start()
    try:
        metrics.dead_letters.labels(code="invalid_json").inc()
        other_metrics.dead_letters.labels(code="guard_error").inc(2)
        async with http.get(url(server, "/metrics")) as response:
            mine = await response.text()
        async with http.get(url(other, "/metrics")) as response:
            theirs = await response.text()
    finally:
        await other.stop()
    assert 'code="invalid_json"' in mine
    assert 'code="guard_error"' not in mine
    assert 'guardstream_dead_letters_total{code="guard_error"} 2.0' in theirs
    assert 'code="invalid_json"' not in theirs


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
