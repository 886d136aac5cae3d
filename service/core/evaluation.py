"""ICM-Assistant's two metrics, computed as its evaluation scripts compute them.

Sources (zhaoyuzhi/ICM-Assistant at c1a48fb, read through the code search; no code copied):

- ICM accuracy, `eval_scripts/eval_icm_val/eval.py` (and `eval_icm_test/eval.py`): each image's
  `sexy_score` is P(Yes) / (P(Yes) + P(No)) from the first answer token's logits
  (`inference/vLLM_inference/vllm_inference_logits.py`); an image is predicted sexy when the score
  is above 0.5 (`conclude_one_item`, `thres = 0.5`, strictly greater), and the accuracy is the
  share of images whose prediction equals the label (TP + TN over all).
- MQA (moderation question-answering) accuracy, `eval_scripts/eval_mqa/eval.py`: each answer's
  first character, upper-cased, must be one of A, B, C, D (multiple choice) or Y, N (yes/no
  questions) and equal the first character of the expected answer, upper-cased
  (`eval_line`). That script prints its total for all three columns (open QA and multiple choice
  alike, a slip of its author); here each kind has its own figure beside the total.

Here the violating answer of any policy plays "Yes": the score is the probability the guard gave
to a violating verdict (its confidence when it answered Unsafe, the complement when Safe), so
the same accuracy applies to LlavaGuard's JSON answers. A guard that reports no confidence (the
CPU guard) is scored on its rating alone, and the summary counts those items.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

THRESHOLD = 0.5
MQA_CHOICES = frozenset("ABCDYN")


def unsafe_score(rating: Literal["Safe", "Unsafe"], confidence: float | None) -> float:
    """ICM's `sexy_score` for an answer: P(violating) at the deciding token; without a
    confidence, 1 or 0 by the rating."""
    if confidence is None:
        return 1.0 if rating == "Unsafe" else 0.0
    return confidence if rating == "Unsafe" else 1.0 - confidence


def icm_correct(score: float | None, violating: bool) -> bool:
    """Whether the prediction (score above 0.5) is the label; an answer with no verdict
    (score None) is wrong, as ICM's script would count an image it has no score for."""
    return score is not None and (score > THRESHOLD) == violating


def mqa_choice(answer: str) -> str | None:
    """The choice an answer makes: its first character upper-cased, when it is one ICM scores."""
    first = answer[:1].upper()
    return first if first in MQA_CHOICES else None


def mqa_correct(answer: str, expected: str) -> bool:
    choice = mqa_choice(answer)
    return choice is not None and choice == expected[:1].upper()


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float | None:
        return self.correct / self.total if self.total else None

    def __str__(self) -> str:
        value = self.value
        shown = "n/a" if value is None else f"{value:.4f}"
        return f"{shown} ({self.correct}/{self.total})"


def accuracy(outcomes: Iterable[bool]) -> Accuracy:
    results = list(outcomes)
    return Accuracy(sum(results), len(results))


Rating = Literal["Safe", "Unsafe"]


@dataclass(frozen=True)
class Judged:
    """One manifest item after `python -m service eval` judged it through the pipeline.

    A line of results.jsonl (`dataclasses.asdict`), the unit every metric is computed from.
    """

    id: str
    line: int
    """The item's line in the manifest (its index + 1 for LlavaGuard-DS's JSON list)."""
    expected_rating: Rating
    expected_category: str | None
    """A category code (O1..O9, NA, R01..) or None when the label gives no category."""
    policy: str
    """The policy the item was judged under: its id, with exceptions the derived id."""
    exceptions: tuple[str, ...]
    """Categories declared non-violating for this item (LlavaGuard's policy exceptions)."""
    tags: dict[str, str]
    """Free tags of the manifest row (split, source, ...), for slicing the report."""
    rating: Rating | None
    """The verdict's rating; None when the item ended as a dead letter."""
    category: str | None
    """The verdict's category code."""
    confidence: float | None
    """The guard's probability of its rating, when it reports one."""
    action: str | None
    """The decision layer's action (allow, review, block)."""
    error: str | None
    """The dead-letter code when there is no verdict (unparseable_model_output, ...)."""
    message: str | None
    """The dead letter's message, or the rationale of a verdict."""
    latency_ms: float
    """From handing the record to the pipeline to its outcome."""

    @property
    def unparseable(self) -> bool:
        return self.error == "unparseable_model_output"
