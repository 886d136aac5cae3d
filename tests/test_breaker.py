"""The guard breaker opens on an outage, holds callers, and closes when the probe says ready."""

from __future__ import annotations

import asyncio

from service.core.breaker import Breaker


class Probe:
    def __init__(self) -> None:
        self.ready = False
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.ready


async def test_it_opens_after_the_threshold_of_consecutive_failures() -> None:
    changes: list[bool] = []
    breaker = Breaker(3, Probe(), 0.01, on_change=changes.append)
    assert [breaker.record_failure() for _ in range(2)] == [False, False]
    breaker.record_success()
    assert [breaker.record_failure() for _ in range(3)] == [False, False, True]
    assert breaker.is_open
    assert breaker.record_failure() is True  # failures while open belong to the outage
    assert changes == [True]
    await breaker.close()


async def test_callers_wait_while_open_and_the_probe_closes_it_half_way() -> None:
    probe = Probe()
    changes: list[bool] = []
    breaker = Breaker(2, probe, 0.01, on_change=changes.append)
    breaker.record_failure()
    breaker.record_failure()
    waiter = asyncio.create_task(breaker.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert probe.calls >= 2
    probe.ready = True
    waited = await asyncio.wait_for(waiter, 1)
    assert waited > 0.04
    assert not breaker.is_open
    assert changes == [True, False]
    assert breaker.record_failure() is True  # half-open: one failure re-opens
    probe.ready = True
    await asyncio.wait_for(breaker.wait_closed(), 1)
    breaker.record_success()
    assert breaker.record_failure() is False  # closed fully again
    await breaker.close()


async def test_a_probe_that_raises_counts_as_not_ready() -> None:
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("triton gone")
        return True

    breaker = Breaker(1, flaky, 0.01)
    breaker.record_failure()
    await asyncio.wait_for(breaker.wait_closed(), 1)
    assert calls == 3
    await breaker.close()


async def test_waiting_on_a_closed_breaker_returns_at_once() -> None:
    breaker = Breaker(1, Probe(), 0.01)
    assert await breaker.wait_closed() == 0.0
