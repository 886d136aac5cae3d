"""The pipeline with a scripted guard, for tests of what it makes of answers and failures."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry.sdk.trace import TracerProvider
from PIL import Image

from service.adapters.rules_source import RulesFiles
from service.app import limits_from
from service.client import encode_event, image_event
from service.config import Settings
from service.core.breaker import Breaker
from service.core.guard import GuardReply, ServedModel
from service.core.known import KnownContent
from service.core.pipeline import Fetcher, Outcome, Pipeline, Record, Retry
from service.core.rules import Rules
from service.core.verdicts import Action, DeadLetter, Verdict
from service.ops.metrics import Metrics

SAFE = json.dumps({"rating": "Safe", "category": "NA: None applying", "rationale": "a cat"})


class ScriptedGuard:
    """Answers (or fails) from a script, and remembers what it was asked."""

    def __init__(
        self,
        *script: str | Exception | float,
        rating_log_prob: float | None = None,
        served: ServedModel | None = None,
    ) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.rating_log_prob = rating_log_prob
        self.served = served

    async def ask(
        self,
        prompt: str,
        pixels: npt.NDArray[np.uint8],
        headers: Mapping[str, str] | None = None,
    ) -> GuardReply:
        self.calls.append((prompt, pixels.shape))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, float):  # a slow answer
            await asyncio.sleep(step)
            step = SAFE
        return GuardReply(
            text=step,
            model_name="guard",
            model_version="7",
            rating_log_prob=self.rating_log_prob,
            served=self.served,
        )


class Deciding:
    """A pipeline whose verdicts get the action `decide` picks for each, dead letters left as
    they are: a stand-in for the decision rules, so that tests of where verdicts go need not
    depend on how the rules decide."""

    def __init__(self, pipeline: Pipeline, decide: Callable[[Verdict], Action | None]) -> None:
        self._pipeline = pipeline
        self._decide = decide

    async def judge(self, record: Record) -> Outcome:
        outcome = await self._pipeline.judge(record)
        if isinstance(outcome, Verdict):
            action = self._decide(outcome)
            return outcome.model_copy(update={"action": action, "review": action == "review"})
        return outcome


def jpeg(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def record(value: bytes | None, headers: tuple[tuple[str, bytes], ...] = ()) -> Record:
    return Record(topic="images", partition=2, offset=41, key=b"k", value=value, headers=headers)


def event_record(**fields: object) -> Record:
    fields.setdefault("image", jpeg())
    return record(encode_event(image_event("ev-1", **fields)))  # type: ignore[arg-type]


def make_pipeline(
    guard: ScriptedGuard,
    pool: Executor,
    breaker: Breaker | None = None,
    deadline_s: float = 30.0,
    fetcher: Fetcher | None = None,
    rules: Callable[[], Rules] | None = None,
    metrics: Metrics | None = None,
    known: KnownContent | None = None,
    **settings: Any,
) -> Pipeline:
    """`rules` None: those `settings` name (policy_dir, tenant_file, ...), loaded once."""
    config = Settings(**{"image_resize_side": 32, "dead_letter_original_bytes": 100} | settings)
    if rules is None:
        loaded = RulesFiles.from_settings(config).load()
        rules = lambda: loaded  # noqa: E731
    return Pipeline(
        rules=rules,
        guard=guard,
        limits=limits_from(config),
        decode_pool=pool,
        retry=Retry(attempts=3, first_backoff_s=0.001),
        breaker=breaker or Breaker(100, always_ready, 0.01),
        deadline_s=deadline_s,
        metrics=metrics or Metrics(),
        tracer=TracerProvider().get_tracer("test"),
        fetcher=fetcher,
        known=known,
    )


async def always_ready() -> bool:
    return True


async def judge(guard: ScriptedGuard, rec: Record) -> Outcome:
    with ThreadPoolExecutor(1) as pool:
        return await make_pipeline(guard, pool).judge(rec)


def dead(outcome: Outcome) -> DeadLetter:
    assert isinstance(outcome, DeadLetter), outcome
    return outcome


def policy_text(policy_id: str, version: str = "1.2.0") -> str:
    """A policy file: the packaged LlavaGuard policy under another id (and version)."""
    packaged = (Path(__file__).parents[2] / "service/policies/llavaguard-v1.2.toml").read_text()
    renamed = re.sub(r'(?m)^id = ".*"$', f'id = "{policy_id}"', packaged, count=1)
    return re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', renamed, count=1)
