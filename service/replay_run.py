"""A replay run's files under OUT: what it replays and how far it got, and what it judged.

- `state.json`: the range, the run's policy, model and topic, and per partition the next
  offset to judge, advanced only past records whose outcome the broker acknowledged, and only
  over the partition's finished prefix (`PartitionOffsets`, as the consumer's commits). It is
  rewritten whole after every acknowledgement, atomically (a crash leaves the old or the new).
- `outcomes.jsonl`: one `Replayed` row per acknowledged outcome, with its original verdict:
  what the diff needs, kept on disk so that a resumed run's diff covers the whole range.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ValidationError

from service.adapters.kafka.offsets import PartitionOffsets
from service.core.replay_diff import Replayed
from service.core.replay_range import Span

STATE, OUTCOMES = "state.json", "outcomes.jsonl"


class ReplayRefused(ValueError):
    """The run cannot start or resume as asked (its OUT, its arguments); one line says why."""


class ReplayState(BaseModel):
    """OUT/state.json: what the run replays and how far it got."""

    run_id: str
    input_topic: str
    topic: str
    policy: str | None
    model: str | None
    spans: list[Span]
    next: dict[int, int]
    """Per partition, the next offset to judge: everything before it is acknowledged."""
    since_ms: int | None = None
    """When the range starts (as asked, or its first records' time): where the original
    verdicts are looked for from (less a margin); None: the verdict topic is read whole."""
    finished: bool = False

    def remaining(self) -> list[Span]:
        return [Span(s.partition, self.next[s.partition], s.end) for s in self.spans]

    @property
    def total(self) -> int:
        return sum(span.records for span in self.spans)

    @property
    def done(self) -> int:
        return self.total - sum(span.records for span in self.remaining())


class Run:
    """A run's files: state.json (rewritten whole, atomically) and outcomes.jsonl (appended)."""

    def __init__(self, out: Path, state: ReplayState, *, resumed: bool = False) -> None:
        self.out = out
        self.state = state
        self.resumed = resumed
        self._trackers = {span.partition: PartitionOffsets() for span in state.spans}

    @classmethod
    def load(cls, out: Path) -> Run | None:
        path = out / STATE
        if not path.exists():
            return None
        try:
            state = ReplayState.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise ReplayRefused(f"{path}: not a replay state: {problem['msg']}") from None
        return cls(out, state, resumed=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        partial = self.out / f"{STATE}.partial"
        partial.write_text(self.state.model_dump_json(indent=2) + "\n")
        partial.replace(self.out / STATE)  # a crash leaves the old state or the new

    def take(self, partition: int, offset: int) -> None:
        self._trackers[partition].take(offset)

    def finish(self, row: Replayed, outcomes: TextIO) -> None:
        """Record an acknowledged outcome, and the partition's progress past its finished prefix."""
        outcomes.write(row.model_dump_json() + "\n")
        outcomes.flush()
        self._trackers[row.partition].finish(row.offset)
        done = self._trackers[row.partition].committable()
        if done is not None:
            self.state.next[row.partition] = done
        self.save()

    def rows(self) -> Iterator[Replayed]:
        path = self.out / OUTCOMES
        if path.exists():
            with path.open() as lines:
                yield from (Replayed.model_validate_json(line) for line in lines if line.strip())


def default_out(run_id: str) -> Path:
    return Path(".guardstream") / "replay" / run_id


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
