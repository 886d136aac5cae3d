"""The shared verdict-reuse store: Redis (or Valkey), one entry per reusable verdict.

Every pod reads and writes the same keys, `guardstream:verdict:<ReuseKey.text()>`, each SET with
the reuse time to live, so an image judged by one pod is reused by all of them and Redis forgets
it by itself; Redis holds nothing that cannot be judged again, so it needs no persistence.

Reuse is an optimisation, never a failure. Each request is bounded by `redis_timeout_s` twice:
the client's socket timeouts and an `asyncio.timeout` around the whole call (connecting
included, and whatever the client does between reads). A request that fails or runs out of time
is counted in `guardstream_reuse_store_errors_total{operation}` and answered as "nothing
stored"; the event goes to the model. After a failure the store is skipped for a back-off (1 s,
doubling per failure up to 30 s, reset by a success), so an unreachable Redis costs no event a
timeout and receives no stream of doomed connections. What failed is logged at WARNING at most
every 30 s, with the count since the last warning; the return of the store at INFO. Readiness
does not look at Redis: pods that cannot reach it work on, only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.config import Settings
from service.core.backoff import exponential
from service.core.reuse import ReuseKey
from service.ops.metrics import Metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "guardstream:verdict:"
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
WARNING_INTERVAL_S = 30.0

Operation = Literal["get", "put"]


class _Outage:
    """Whether the store is being skipped after failures, and the warnings about it.

    Requests in flight together when Redis goes away fail together; only a failure of a request
    started after the last back-off was set doubles the next one, so one outage seen by 64
    concurrent events is one step of the back-off, not 64.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        first_backoff_s: float,
        max_backoff_s: float,
        warning_interval_s: float,
    ) -> None:
        self._clock = clock
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._warning_interval_s = warning_interval_s
        self._failures = 0
        self._backoff_set_at = float("-inf")
        self._skip_until = float("-inf")
        self._warned_at = float("-inf")
        self._unreported = 0

    def skipping(self) -> bool:
        return self._clock() < self._skip_until

    def failed(self, operation: Operation, started_at: float, reason: str) -> None:
        now = self._clock()
        if started_at > self._backoff_set_at:
            backoff_s = exponential(self._failures, self._first_backoff_s, self._max_backoff_s)
            self._failures += 1
            self._backoff_set_at = now
            self._skip_until = now + backoff_s
        self._unreported += 1
        if now - self._warned_at >= self._warning_interval_s:
            log.warning(
                "reuse store %s failed (%s): events go to the model, the store is skipped for "
                "%.1f s (%d failed requests since the last warning)",
                operation,
                reason,
                max(0.0, self._skip_until - now),
                self._unreported,
            )
            self._warned_at = now
            self._unreported = 0

    def succeeded(self) -> None:
        if self._failures:
            log.info("reuse store answers again after %d failed attempts", self._failures)
            self._failures = 0
            self._skip_until = float("-inf")


def client_from(settings: Settings) -> Redis:
    """A client of `redis_url` (rediss:// for TLS; a password in the URL wins over
    `redis_password`). It connects on first use; a URL it cannot read raises here, at start-up.
    """
    return Redis.from_url(
        settings.redis_url,
        password=settings.redis_password.get_secret_value() or None,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        # The client's own retries would multiply the time an event waits; the back-off of
        # RedisStore is the retry, and the model is the fallback.
        retry=Retry(NoBackoff(), 0),
    )


class RedisStore:
    """`VerdictStore` on Redis: `get` and `put` bounded by `timeout_s`, never raising."""

    def __init__(
        self,
        client: Redis,
        *,
        ttl_s: float,
        timeout_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        warning_interval_s: float = WARNING_INTERVAL_S,
    ) -> None:
        self._client = client
        # Milliseconds: the setting is a float, and EX would round a fraction of a second away.
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._clock = clock
        self._outage = _Outage(clock, first_backoff_s, max_backoff_s, warning_interval_s)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> RedisStore:
        return cls(
            client_from(settings),
            ttl_s=settings.reuse_ttl_s,
            timeout_s=settings.redis_timeout_s,
            metrics=metrics,
        )

    def name(self, key: ReuseKey) -> str:
        """The Redis key of `key`."""
        return KEY_PREFIX + key.text()

    async def get(self, key: ReuseKey) -> bytes | None:
        reply = await self._request("get", lambda: self._client.get(self.name(key)))
        return reply if isinstance(reply, bytes) else None

    async def put(self, key: ReuseKey, verdict: bytes) -> None:
        await self._request(
            "put", lambda: self._client.set(self.name(key), verdict, px=self._ttl_ms)
        )

    async def close(self) -> None:
        # Closing only drops sockets; a hung TLS goodbye must not hold up the shutdown.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s):
                await self._client.aclose()

    async def _request(self, operation: Operation, send: Callable[[], Awaitable[object]]) -> object:
        """The reply, or None when the store is skipped, failed or ran out of time."""
        if self._outage.skipping():
            return None
        started_at = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await send()
        # Anything at all: whatever the client raises, the event goes on without reuse.
        except Exception as exc:
            self._metrics.reuse_store_errors.labels(operation).inc()
            self._outage.failed(operation, started_at, self._reason(exc))
            return None
        self._outage.succeeded()
        return reply

    def _reason(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"no answer within {self._timeout_s} s"
        return f"{type(exc).__name__}: {exc}"
