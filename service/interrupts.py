"""Ctrl-C for the batch tools (`replay`, `dlq redrive`): the first asks them to stop, the second
interrupts.

A batch tool that publishes must not be cut between a record the broker acknowledged and what
it writes down about it (a replay's state file, a redrive's ledger entry). So the first SIGINT
or SIGTERM only sets the `stop` event the tool watches: it takes no new record, lets the ones in
flight finish, records them and returns (130, by convention). The handler is then removed, so a
second Ctrl-C interrupts at once, as Python's default does.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any

Main = Callable[[asyncio.Event], Coroutine[Any, Any, int]]
"""A tool's whole run, given the event that asks it to stop; its exit code."""


def run_until_signalled(main: Main) -> int:
    """Run `main(stop)` in a new event loop, `stop` set by the first SIGINT or SIGTERM."""

    async def until_signalled() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        # Signal handlers can be installed only from the main thread (tests call from others).
        handled = threading.current_thread() is threading.main_thread()

        def first_signal(signum: int) -> None:
            stop.set()  # finish what is in flight, record it
            loop.remove_signal_handler(signum)  # a second Ctrl-C interrupts at once

        if handled:
            for signum in signals:
                loop.add_signal_handler(signum, first_signal, signum)
        try:
            return await main(stop)
        finally:
            if handled:
                for signum in signals:
                    loop.remove_signal_handler(signum)

    return asyncio.run(until_signalled())
