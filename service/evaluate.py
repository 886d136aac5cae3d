"""`python -m service eval MANIFEST`: ICM-Assistant's metrics for the guard the settings name.

The manifest is JSON Lines, one labelled image per line; `image` is a file (relative to the
manifest) or an http(s) URL, fetched and decoded as the service does:

    {"id": "a1", "image": "val/a1.jpg", "expected": "Yes"}
        an ICM item: the policy's prompt is asked (`Conversation.judge`), the answer read as the
        service reads it, and scored by ICM accuracy; `expected` is Yes/Unsafe (violating) or
        No/Safe
    {"id": "q7", "image": "val/a1.jpg", "question": "Which ... ? A. ... D. ...", "expected": "D."}
        an MQA item: the question asked on its own (`Conversation.ask`), scored on the answer's
        first character

The definitions are ICM's (`service.core.evaluation`). Every item is asked through the same
Triton contract as `ask`, one conversation per item, `--concurrency` at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.adapters.rules_source import InvalidRules, RulesFiles
from service.adapters.triton import GuardClient
from service.ask import AskLimits, Conversation, open_guard, subject_for
from service.config import Settings
from service.core.errors import GuardstreamError
from service.core.evaluation import (
    Accuracy,
    accuracy,
    icm_correct,
    mqa_choice,
    mqa_correct,
    unsafe_score,
)
from service.core.policies import Policy, parse_answer

_VIOLATING = {"yes": True, "unsafe": True, "no": False, "safe": False}


class ManifestItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, max_length=256)
    image: str = Field(min_length=1, max_length=4096)
    question: str | None = Field(None, min_length=1)
    expected: str = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _icm_labels_are_yes_or_no(self) -> ManifestItem:
        if self.question is None and self.expected.strip(" .").lower() not in _VIOLATING:
            raise ValueError("an ICM item's expected must be Yes, No, Unsafe or Safe")
        if self.question is not None and mqa_choice(self.expected) is None:
            raise ValueError("an MQA item's expected must start with A, B, C, D, Yes or No")
        return self

    @property
    def task(self) -> Literal["icm", "mqa"]:
        return "icm" if self.question is None else "mqa"


@dataclasses.dataclass(frozen=True)
class ItemResult:
    id: str
    task: Literal["icm", "mqa"]
    expected: str
    answer: str | None
    correct: bool
    score: float | None = None
    """ICM items: P(violating), ICM's sexy_score; None when the answer states no verdict."""
    confidence_reported: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Report:
    items: tuple[ItemResult, ...]
    policy: str
    model: str

    def of(self, task: str, kinds: str | None = None) -> Accuracy:
        """Accuracy over the items of `task`; `kinds`: only MQA items whose expected answer
        starts with one of these letters (ABCD: multiple choice, YN: yes/no questions)."""
        return accuracy(
            item.correct
            for item in self.items
            if item.task == task and (kinds is None or item.expected[:1].upper() in kinds)
        )

    def lines(self) -> list[str]:
        icm = [item for item in self.items if item.task == "icm"]
        unscored = sum(1 for i in icm if i.score is not None and not i.confidence_reported)
        return [
            f"model                 {self.model}",
            f"policy (ICM items)    {self.policy}",
            f"ICM accuracy          {self.of('icm')}"
            + (f"  ({unscored} scored on the rating alone: no confidence)" if unscored else ""),
            f"MQA accuracy          {self.of('mqa')}",
            f"  multiple choice     {self.of('mqa', 'ABCD')}",
            f"  yes/no questions    {self.of('mqa', 'YN')}",
            f"errors                {sum(1 for item in self.items if item.error)}",
        ]


def read_manifest(path: Path) -> list[ManifestItem]:
    """Every item of the manifest, or ValueError naming the first bad line."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(ManifestItem.model_validate_json(line))
        except ValidationError as exc:
            raise ValueError(f"{path}:{number}: {exc.errors()[0]['msg']}") from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


async def evaluate(
    settings: Settings, manifest: Path, *, policy_id: str | None = None, concurrency: int = 1
) -> Report:
    items = read_manifest(manifest)
    policy = RulesFiles.from_settings(settings).load().policy_for(None, policy_id)
    gate = asyncio.Semaphore(concurrency)
    async with open_guard(settings) as guard:
        run = _Run(settings, guard, manifest.parent, policy)

        async def one(index: int, item: ManifestItem) -> ItemResult:
            async with gate:
                return await run.item(item, item.id or f"line-{index}")

        results = await asyncio.gather(*(one(i, item) for i, item in enumerate(items, start=1)))
    return Report(tuple(results), f"{policy.id} {policy.full_version}", ", ".join(run.models))


@dataclasses.dataclass
class _Run:
    settings: Settings
    guard: GuardClient
    root: Path
    policy: Policy
    models: list[str] = dataclasses.field(default_factory=list)
    """Every model that answered, in order of first answer: one, unless Triton changed."""

    async def item(self, item: ManifestItem, name: str) -> ItemResult:
        source = item.image if "://" in item.image else str(self.root / item.image)
        try:
            subject = await subject_for(source, self.settings, events=False)
            limits = AskLimits.from_settings(self.settings)
            chat = Conversation(self.guard, subject.image.pixels, limits)
            if item.question is not None:
                answer = await chat.ask(item.question)
            else:
                answer = await chat.judge(self.policy)
        except (GuardstreamError, OSError, ValueError) as exc:
            return ItemResult(name, item.task, item.expected, None, False, error=str(exc))
        model = f"{answer.model_name} {answer.model_version}"
        if model not in self.models:
            self.models.append(model)
        if item.question is not None:
            correct = mqa_correct(answer.text, item.expected)
            return ItemResult(name, "mqa", item.expected, answer.text, correct)
        try:
            rating = parse_answer(answer.text, self.policy).rating
        except GuardstreamError as exc:
            return ItemResult(name, "icm", item.expected, answer.text, False, error=str(exc))
        score = unsafe_score(rating, answer.confidence)
        violating = _VIOLATING[item.expected.strip(" .").lower()]
        return ItemResult(
            name,
            "icm",
            item.expected,
            answer.text,
            icm_correct(score, violating),
            score=score,
            confidence_reported=answer.confidence is not None,
        )


def write_results(path: Path, results: Sequence[ItemResult]) -> None:
    path.write_bytes(b"".join(orjson.dumps(dataclasses.asdict(r)) + b"\n" for r in results))


def command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(
            evaluate(
                settings,
                args.manifest,
                policy_id=args.policy,
                concurrency=max(1, args.concurrency),
            )
        )
    except (ValueError, OSError, InvalidRules, GuardstreamError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    if args.results is not None:
        write_results(args.results, report.items)
        print(f"results               {args.results}")
    return 0
