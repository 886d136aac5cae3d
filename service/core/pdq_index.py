"""PDQ near-duplicate search over a bank's hashes, read from many threads while it changes.

`match()` runs in the image decode thread pool while entries are added and removed on the event
loop, so neither side may wait for the other to rebuild a million-entry index:

    snapshot   an immutable FAISS `IndexBinaryFlat` with the ids of its rows, replaced whole
    pending    entries added since the snapshot was built: an append-only array searched with
               numpy (bounded, see `pending_limit`, then folded into a new snapshot)
    live       id -> item of every entry that counts; an id missing here is a removed entry,
               skipped by `search` at once, and left out of the next snapshot

Readers take the three references under a lock held for nanoseconds and search outside it;
writers never change a row a reader may see (rows are only appended, and an array that has to
grow is copied). `rebuild()` folds pending rows in and drops removed ones off the lock; a
background thread runs it when pending rows or removed rows pass their bounds (one at a time),
and a caller that bulk-loads calls it directly.

Why `IndexBinaryFlat`: measured on 10^6 random hashes (2 shared cores, faiss-cpu 1.15), a
radius-31 `range_search` took 2.8 ms per query, the index 32 MB (32 bytes a hash), built in
0.03 s. `IndexBinaryMultiHash` (16 tables of 16 bits, one flip: exact up to distance 31 by the
pigeonhole principle) took 2.6 ms per query but 351 MB and 6.6 s to build; with 8 tables of 32
bits and 3 flips, 5 ms and 413 MB. A flat scan is exact at any threshold, cheap to rebuild and
small. Through `Banks.match` at 10^6 entries: p50 2.5 ms, p99 4.8 ms, recall 1.0
(tests/benchmarks/banks_index.py). At 10^7 a query would scan for ~25 ms: sharding the snapshot
or a multi-index would be the next step there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import faiss
import numpy as np
import numpy.typing as npt

from service.core.hashing import pdq_bytes

log = logging.getLogger(__name__)

PDQ_BITS = 256
_HASH_BYTES = PDQ_BITS // 8
Key = TypeVar("Key", bound=Hashable)
Item = TypeVar("Item")
# One query per call, from many decode threads at once: the parallelism is the thread pool's.
# FAISS's OpenMP team per query only adds spin-waits (measured, 2 cores, 10^6 hashes: p50 19 ms
# with the default team against 3.4 ms with one thread). A process-wide setting, made here
# because this module is FAISS's only user.
faiss.omp_set_num_threads(1)
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint16)


@dataclass(frozen=True)
class _Snapshot:
    index: faiss.IndexBinaryFlat
    ids: npt.NDArray[np.int64]
    """Entry id of each row of `index`."""


def _empty_snapshot() -> _Snapshot:
    return _Snapshot(faiss.IndexBinaryFlat(PDQ_BITS), np.zeros(0, dtype=np.int64))


class PdqIndex(Generic[Key, Item]):
    """Items with a PDQ hash each, by key; `search` finds the items within a distance of a hash."""

    pending_limit = 1024
    """Pending rows past which a rebuild starts (a numpy scan of 1024 rows: ~0.1 ms)..."""
    pending_share = 32
    """...or past 1/32 of the snapshot's rows, whichever is more: a rebuild copies every row,
    so a bulk load of n entries copies each row ~32 times, not n/1024 times, and the pending
    scan stays about as long as the snapshot's."""
    removed_limit = 4096
    """Removed rows still in the arrays past which a rebuild starts (they cost scan time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rebuilding = threading.Lock()
        self._rebuild_scheduled = False
        self._snapshot = _empty_snapshot()
        self._pending = np.zeros((self.pending_limit, _HASH_BYTES), dtype=np.uint8)
        self._pending_ids: list[int] = []
        self._live: dict[int, Item] = {}
        self._ids: dict[Key, int] = {}
        self._removed: set[int] = set()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._live)

    def add(self, key: Key, pdq_hex: str, item: Item) -> bool:
        """Index `item` by `key` under a 64-digit hash; False: the key's item was replaced."""
        row = np.frombuffer(pdq_bytes(pdq_hex), dtype=np.uint8)
        with self._lock:
            known = self._ids.get(key)
            if known is not None:  # same key, same hash: the row stands, the item is new
                self._live[known] = item
                return False
            count = len(self._pending_ids)
            if count == len(self._pending):
                # Readers may hold the old array: it is replaced, never changed.
                grown = np.zeros((2 * count, _HASH_BYTES), dtype=np.uint8)
                grown[:count] = self._pending
                self._pending = grown
            self._pending[count] = row
            entry_id = self._next_id
            self._next_id += 1
            self._ids[key] = entry_id
            self._live[entry_id] = item
            self._pending_ids.append(entry_id)
            full = count + 1 >= max(
                self.pending_limit, self._snapshot.index.ntotal // self.pending_share
            )
        if full:
            self._schedule_rebuild()
        return True

    def remove(self, key: Key) -> Item | None:
        """Stop finding `key`'s item, from the next search on; None if there was none."""
        with self._lock:
            entry_id = self._ids.pop(key, None)
            if entry_id is None:
                return None
            item = self._live.pop(entry_id)
            self._removed.add(entry_id)
            full = len(self._removed) >= self.removed_limit
        if full:
            self._schedule_rebuild()
        return item

    def search(self, pdq_hex: str, max_distance: int) -> list[tuple[Item, int]]:
        """Every item whose hash is within `max_distance` bits of `pdq_hex`, with its distance."""
        query = np.frombuffer(pdq_bytes(pdq_hex), dtype=np.uint8).reshape(1, _HASH_BYTES)
        with self._lock:
            snapshot = self._snapshot
            pending = self._pending
            count = len(self._pending_ids)
            pending_ids = self._pending_ids[:count]
        found: list[tuple[int, int]] = []
        if snapshot.index.ntotal:
            # FAISS's binary range search keeps distances strictly under the radius.
            limits, distances, rows = snapshot.index.range_search(query, max_distance + 1)
            found += zip(
                snapshot.ids[rows[limits[0] : limits[1]]].tolist(),
                distances[limits[0] : limits[1]].tolist(),
                strict=True,
            )
        if count:
            near = _POPCOUNT[np.bitwise_xor(pending[:count], query)].sum(axis=1)
            for position in np.flatnonzero(near <= max_distance).tolist():
                found.append((pending_ids[position], int(near[position])))
        live = self._live
        return [
            (item, distance)
            for entry_id, distance in found
            if (item := live.get(entry_id)) is not None
        ]

    def rebuild(self) -> None:
        """Fold pending rows into a new snapshot and drop removed ones; searches go on meanwhile."""
        with self._rebuilding:
            with self._lock:
                self._rebuild_scheduled = False
                snapshot = self._snapshot
                pending = self._pending
                count = len(self._pending_ids)
                pending_ids = np.array(self._pending_ids, dtype=np.int64)
                removed = np.fromiter(self._removed, dtype=np.int64, count=len(self._removed))
            rows = np.concatenate([_rows_of(snapshot.index), pending[:count]])
            ids = np.concatenate([snapshot.ids, pending_ids])
            kept = ~np.isin(ids, removed)
            index = faiss.IndexBinaryFlat(PDQ_BITS)
            index.add(np.ascontiguousarray(rows[kept]))
            with self._lock:
                # Rows added and ids removed while this ran stay for the next rebuild.
                tail = len(self._pending_ids) - count
                fresh = np.zeros((max(self.pending_limit, 2 * tail), _HASH_BYTES), np.uint8)
                fresh[:tail] = self._pending[count : count + tail]
                self._pending = fresh
                self._pending_ids = self._pending_ids[count:]
                self._snapshot = _Snapshot(index, ids[kept])
                self._removed.difference_update(removed.tolist())

    def _schedule_rebuild(self) -> None:
        with self._lock:
            if self._rebuild_scheduled:
                return
            self._rebuild_scheduled = True
        threading.Thread(target=self._rebuild_logged, name="pdq-index-rebuild", daemon=True).start()

    def _rebuild_logged(self) -> None:
        try:
            self.rebuild()
        except Exception:  # a thread's exception would vanish; the old snapshot stays in force
            log.exception("PDQ index rebuild failed; searching the previous one and the pending")
            with self._lock:
                self._rebuild_scheduled = False


def _rows_of(index: faiss.IndexBinaryFlat) -> npt.NDArray[np.uint8]:
    rows: npt.NDArray[np.uint8] = index.reconstruct_n(0, index.ntotal)
    return rows
