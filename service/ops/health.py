"""The operability endpoints: liveness and readiness probes and the Prometheus scrape.

```
GET /livez    200 {"status": "ok"} whenever the event loop answers; nothing else is checked
GET /readyz   200 when every check of the ReadinessSource is ok, else 503:
              {"status": "ready" | "not ready", "checks": {name: {"ok": bool, "detail": str}}}
GET /metrics  the instance's registry: OpenMetrics (with the latency histograms' trace_id
              exemplars) when the Accept header asks for it, as Prometheus does, else the
              Prometheus text format; the readiness checks run first, so guardstream_ready
              is current at every scrape
```

HEAD works wherever GET does; any other method is 405, any other path 404.

The server shares the service's event loop on purpose: a loop blocked by a bug or by CPU work
that should have gone to a thread makes /livez time out, which is what a liveness probe is for.
/readyz never answers 500: a readiness source that raises or hangs is itself "not ready", with
the reason in a check named "readiness".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from service.ops.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One readiness check's result; `detail` is read by whoever debugs a failing probe."""

    ok: bool
    detail: str


class ReadinessSource(Protocol):
    async def readiness(self) -> Mapping[str, Check]:
        """Check name -> result, e.g. "partitions", "broker", "guard", "breaker"."""
        ...


class HealthServer:
    """/livez, /readyz and /metrics on `host:port`; port 0 binds a free port (see `port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        source: ReadinessSource,
        metrics: Metrics,
        *,
        check_timeout_s: float = 2.0,
    ) -> None:
        self._host = host
        self._port = port
        self._source = source
        self._metrics = metrics
        self._check_timeout_s = check_timeout_s
        self._runner: web.AppRunner | None = None
        self._was_ready: bool | None = None

    @property
    def port(self) -> int:
        """The bound port once started; the requested one before."""
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_text)
        # Kubelet probes every few seconds: one access line per probe would bury the real logs.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self._host, self._port).start()
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info(
            "health endpoints on http://%s:%d (/livez /readyz /metrics)", self._host, self.port
        )

    async def stop(self) -> None:
        """Close the listening socket and the connections; a no-op when not started."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def _livez(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"}, status=200)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = await self._run_checks()
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
        }
        return _json(body, status=200 if ready else 503)

    async def _run_checks(self) -> tuple[bool, Mapping[str, Check]]:
        """Whether ready, and each check; logged when that changes, and kept in the metrics."""
        checks = await self._checks_or_why_not()
        ready = all(check.ok for check in checks.values())
        self._log_change(ready, checks)
        self._metrics.ready.set(1 if ready else 0)
        self._metrics.ready_checks.clear()  # a check that is gone (readiness) must not linger
        for name, check in checks.items():
            self._metrics.ready_checks.labels(name).set(1 if check.ok else 0)
        return ready, checks

    async def _checks_or_why_not(self) -> Mapping[str, Check]:
        deadline = asyncio.timeout(self._check_timeout_s)
        try:
            async with deadline:
                return await self._source.readiness()
        except Exception as exc:
            # A check may time out on its own (a broker request, say): only our deadline
            # means the checks as a whole hung.
            if deadline.expired():
                detail = f"checks did not finish in {self._check_timeout_s:g}s"
            else:
                log.debug("readiness source raised", exc_info=True)
                detail = f"{type(exc).__name__}: {exc}"
            return {"readiness": Check(ok=False, detail=detail)}

    def _log_change(self, ready: bool, checks: Mapping[str, Check]) -> None:
        # Only transitions: probes repeat the same answer every few seconds.
        if ready == self._was_ready:
            return
        self._was_ready = ready
        if ready:
            log.info("ready")
        else:
            failing = "; ".join(f"{name}: {c.detail}" for name, c in checks.items() if not c.ok)
            log.warning("not ready: %s", failing)

    async def _metrics_text(self, request: web.Request) -> web.Response:
        await self._run_checks()
        registry = self._metrics.registry
        # Passed as a header, not content_type=, so the exposition `version` parameter that
        # tells Prometheus which parser to use survives (aiohttp's argument takes no parameters).
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            return web.Response(
                body=openmetrics.generate_latest(registry),  # type: ignore[no-untyped-call]
                headers={"Content-Type": openmetrics.CONTENT_TYPE_LATEST},
            )
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _json(body: object, *, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
