"""Delays between retries: exponential from a first delay up to a cap, jittered where needed.

Every retry loop takes its delays from here, so the schedules differ only in their numbers:

- a guard call that may pass (`service.core.pipeline.Retry`): from `guard_retry_backoff_s`,
  capped at 10 s, with full jitter, so that the events one Triton hiccup failed together do
  not all come back at the same instant;
- publishing an outcome at least once (`service.adapters.kafka.delivery`): from 0.1 s, capped
  at 5 s, without jitter; the idempotent producer, not the spread, keeps retries harmless.

A failed exactly-once transaction has no schedule of its own: its outcomes are held and go
in the next transaction, one commit interval later.
"""

from __future__ import annotations

import random

# Doubling 64 times takes any first delay past any cap; stopping there keeps a retry loop that
# runs for hours (a long publish_timeout_s) from overflowing a float.
_MAX_DOUBLINGS = 64


def exponential(attempt: int, first_s: float, max_s: float) -> float:
    """The delay before retry `attempt` (0 for the first): `first_s` doubled per attempt, at
    most `max_s`."""
    return min(max_s, first_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))


def full_jitter(delay_s: float) -> float:
    """A delay drawn uniformly from [0, `delay_s`] ("full jitter")."""
    return random.uniform(0, delay_s)
