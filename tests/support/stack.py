"""Ports and per-test topics on the embedded stack (the session fixtures in conftest.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from service.config import Settings
from service.dev import stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Topics:
    input: str
    verdicts: str
    dead_letters: str
    group: str
    review: str

    @classmethod
    def named(cls, tag: str) -> Topics:
        """A test's own topics and group, each name ending in `tag`."""
        return cls(
            f"images-{tag}", f"verdicts-{tag}", f"images-{tag}.dlq", f"group-{tag}",
            f"verdicts-{tag}.review",
        )  # fmt: skip

    @classmethod
    async def create(cls, bootstrap: str, tag: str, partitions: int = 3) -> Topics:
        """`named(tag)`, with every topic created on the broker."""
        made = cls.named(tag)
        await stack.create_topics(bootstrap, made.topics, partitions)
        return made

    @property
    def topics(self) -> list[str]:
        """The input topic and every topic the service publishes to."""
        return [self.input, self.verdicts, self.dead_letters, self.review]

    def settings(self, state: stack.StackState, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "bootstrap_servers": state.bootstrap_servers,
            "triton_url": state.triton_grpc,
            "input_topic": self.input,
            "verdict_topic": self.verdicts,
            "dead_letter_topic": self.dead_letters,
            "review_topic": self.review,
            # Topics of the test's own that exist only when the test makes them: the shared
            # defaults would carry one test's decisions and bank entries into another.
            "decisions_topic": f"{self.input}.decisions",
            "banks_topic": f"{self.input}.banks",
            "group_id": self.group,
            "commit_interval_ms": 100,
            "guard_startup_timeout_s": 60,
            "health_port": 0,
            **overrides,
        }
        return Settings(**values)  # type: ignore[arg-type]
