"""Pacing a batch job so that it never takes more than its share: at most `rate` starts a second.

A replay or a backfill reads a backlog that would otherwise be judged as fast as the guard
answers, taking the guard from the live consumers. `Pacer.wait()` hands out start times
`1/rate` apart (an interval scheduler: a token bucket holding one token, so no burst after an
idle spell), and works for many tasks waiting at once, each getting its own slot.
`wait_unless(stop)` returns early when the job is asked to stop: a slow rate never delays a stop.
"""

from __future__ import annotations

import asyncio
import math


class Pacer:
    def __init__(self, rate: float | None) -> None:
        """`rate`: starts per second; None or infinity: no limit."""
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self._interval = 0.0 if rate is None or math.isinf(rate) else 1.0 / rate
        self._next: float | None = None

    async def wait(self) -> None:
        """Return at this caller's slot: no earlier than `1/rate` after the previous one."""
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        # The slot is taken before sleeping, so callers waiting together are spread out.
        slot = now if self._next is None else max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)

    async def wait_unless(self, stop: asyncio.Event) -> None:
        """`wait()`, or less when `stop` is set meanwhile (the slot is then spent)."""
        if stop.is_set():
            return
        waiting = asyncio.ensure_future(self.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((waiting, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, stopped):
                task.cancel()
            await asyncio.gather(waiting, stopped, return_exceptions=True)
