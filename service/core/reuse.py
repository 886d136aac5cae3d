"""Verdict reuse: a verdict kept for an image already judged under the same policy and model.

A verdict may stand for another event only when everything that decided it is the same: the
image's bytes (sha256), the policy and its version (a changed policy file changes the version),
and the model and its version. `ReuseKey` holds exactly those, and `ReuseKey.text` makes them the
store's key, so a new policy or model version misses and is judged afresh instead of being
answered by a verdict it never gave.

Stores keep the verdict's JSON bytes; what a verdict means is the pipeline's concern. Reuse is
an optimisation, never a failure: a store answers `None` when it has nothing usable, whether the
entry is absent, expired or the store itself is down, and never raises. `MemoryStore` is this
process's own LRU; `service.adapters.redis_store.RedisStore` shares verdicts between pods.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

KEY_VERSION = "v1"
"""Leads every key: a change to what a key holds or how it is written takes a new version, so
entries written by older pods are never read as the new kind."""


@dataclass(frozen=True)
class ReuseKey:
    """What a verdict was decided on; two events with equal keys get the same verdict."""

    image_sha256: str
    policy_id: str
    policy_version: str
    model_name: str
    model_version: str

    def text(self) -> str:
        """The stable store key, `v1:<image sha256>:<32 hex digits of the rest>`.

        The four names are hashed as a JSON array, so no choice of names can make two different
        keys collide by shifting a separator (`("a:b", "c")` against `("a", "b:c")`), and a long
        policy or model name never makes the key long. 128 bits of sha256 make a collision
        between the few policy and model versions in use impossible in practice.
        """
        decided_by = json.dumps(
            [self.policy_id, self.policy_version, self.model_name, self.model_version],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        digest = hashlib.sha256(decided_by.encode()).hexdigest()[:32]
        return f"{KEY_VERSION}:{self.image_sha256}:{digest}"


class VerdictStore(Protocol):
    """Where reusable verdicts are kept. Neither method raises: a failing store is the
    store's to count and log, and the event goes to the model as if nothing were stored."""

    async def get(self, key: ReuseKey) -> bytes | None:
        """The stored verdict's JSON bytes; None when absent, expired, or the store failed."""
        ...

    async def put(self, key: ReuseKey, verdict: bytes) -> None:
        """Keep `verdict` under `key` for the store's time to live (best effort)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class MemoryStore:
    """An LRU of verdicts in this process: at most `max_entries`, each for `ttl_s` seconds.

    O(1) per call: an OrderedDict in order of use, least recently used first. An expired entry
    is dropped when it is asked for, or evicted like any other once it is the least recently
    used; `clock` is injectable so tests need not wait for expiry.
    """

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[ReuseKey, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: ReuseKey) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, verdict = entry
        if self._clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return verdict

    async def put(self, key: ReuseKey, verdict: bytes) -> None:
        self._entries[key] = (self._clock() + self._ttl_s, verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()
