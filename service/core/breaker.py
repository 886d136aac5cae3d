"""The guard circuit breaker: a Triton outage pauses consumption instead of dead-lettering.

Closed: guard calls go through. After `threshold` consecutive retriable failures (UNAVAILABLE,
DEADLINE_EXCEEDED, ...) it opens: the consumer pauses its partitions (still polling, so it stays
in the group), events already taken wait in `wait_closed` without spending their retries, and
a probe asks Triton every `probe_interval_s` whether the model is ready. When it is, the
breaker closes half-way: one more failure opens it again at once, a success closes it fully.

Failures while the breaker is open, or the failure that opens it, belong to the outage, not to
the event: the pipeline only counts an event's retries while the breaker stays closed, so one
event that keeps failing against a healthy Triton still ends as a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Breaker:
    def __init__(
        self,
        threshold: int,
        probe: Callable[[], Awaitable[bool]],
        probe_interval_s: float,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        self._threshold = threshold
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._on_change = on_change
        self._failures = 0
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> float:
        """Wait while the breaker is open; the seconds waited."""
        if self._closed.is_set():
            return 0.0
        started = time.monotonic()
        await self._closed.wait()
        return time.monotonic() - started

    def record_success(self) -> None:
        self._failures = 0

    def record_failure(self) -> bool:
        """Count a retriable failure; True when the breaker is open after it (an outage)."""
        if self.is_open:
            return True
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()
            return True
        return False

    def _open(self) -> None:
        log.warning(
            "guard breaker open after %d consecutive failures: consumption paused", self._failures
        )
        self._closed.clear()
        self._on_change(True)
        self._prober = asyncio.create_task(self._probe_until_ready())

    async def _probe_until_ready(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                ready = await self._probe()
            except Exception:  # a probe that errs says "not ready", nothing more
                log.debug("guard probe failed", exc_info=True)
                ready = False
            if ready:
                break
        # Half-open: the next failure re-opens at once, a success resets the count.
        self._failures = self._threshold - 1
        self._closed.set()
        self._on_change(False)
        log.warning("guard breaker closed: the model is ready again, consumption resumes")

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
