"""Which offset of a partition is safe to commit while records finish out of order.

Records of one partition are judged concurrently and finish in any order. Kafka keeps one
committed offset per partition, meaning "everything before this is done", so the offset we
may commit is the first record still unfinished — or, when none is, one past the last record
taken. Offsets need not be contiguous integers (compaction and transaction markers leave
gaps), so the tracker remembers the offsets it was given rather than counting.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets taken from one partition, in the order they were taken (increasing)."""

    def __init__(self) -> None:
        self._unfinished: deque[int] = deque()
        self._finished_early: set[int] = set()
        self._next: int | None = None

    def is_new(self, offset: int) -> bool:
        """Whether `offset` comes after every offset taken so far."""
        last = self._unfinished[-1] if self._unfinished else None
        if last is None and self._next is not None:
            last = self._next - 1
        return last is None or offset > last

    def take(self, offset: int) -> None:
        if not self.is_new(offset):
            raise ValueError(f"offset {offset} is not after the offsets already taken")
        self._unfinished.append(offset)

    def finish(self, offset: int) -> None:
        """Mark `offset` done: its outcome has been acknowledged by the broker."""
        self._finished_early.add(offset)
        while self._unfinished and self._unfinished[0] in self._finished_early:
            done = self._unfinished.popleft()
            self._finished_early.discard(done)
            self._next = done + 1

    def committable(self) -> int | None:
        """The offset to commit (the next record to read after a restart), None if none yet."""
        return self._next

    @property
    def in_flight(self) -> int:
        return len(self._unfinished)
