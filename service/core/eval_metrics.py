"""LlavaGuard's evaluation metrics over judged items, and the service's own figures beside them.

Source: ml-research/LlavaGuard at 840699c, `llavaguard/evaluation/metrics_calculator.py` (read,
no code copied):

- Positive is Unsafe. `EvaluationMetricsCalculator.add_sample` files each item as TP, FP, TN or
  FN; an item it cannot read a rating from is an `invalid_assessment`, in none of the four. Here
  that is an item without a verdict (a dead letter). Theirs first tries to rescue an unreadable
  answer by looking for the words Safe / Unsafe in it (`invalid_assessments_evaluated`); the
  service reads answers one way in production, so an unreadable one stays invalid here.
- `get_metrics`: TPR (recall), TNR (specificity), FPR, FNR, precision, accuracy over the
  classified items, balanced accuracy = (TPR + TNR) / 2, F1 = 2PR / (P + R) and
  F2 = 5PR / (4P + R), each 0 when its denominator is 0.
- Category correct: theirs when the predicted category, lower-cased, is a substring of the
  expected one; here the codes must be equal. Over classified items with an expected category.
- Policy-exception recall (`compute_stats`): items with exceptions that make the image Safe
  (`_v2` ids) are correct as TN, those whose exceptions do not apply (`_v4`) as TP; here every
  classified item with exceptions, correct when its rating is the expected one. None when no
  item has exceptions (theirs prints 0).
- Per category (`compute_category_wise_stats`): items grouped by their expected category,
  balanced accuracy and recall each, the safe category (NA) by its accuracy. Theirs computes a
  missing class's rate as 0, which halves a one-class category's balanced accuracy; here a rate
  a category has no items for is None.

Beside them: ICM-Assistant's accuracy (`service.core.evaluation`), the unparseable-answer rate,
dead letters by code, latency percentiles, calibration of the reported confidence (reliability
in ten bins, expected calibration error) and the decision layer's actions per expected rating.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from service.core.evaluation import Judged, icm_correct, unsafe_score

Array = npt.NDArray[np.float64]
Outcome = Literal["tp", "fp", "tn", "fn", "invalid"]

NO_VERDICT = "no verdict"
NO_CATEGORY = "no category"
CALIBRATION_BINS = 10
_EDGES = [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS + 1)]


@dataclass(frozen=True)
class Rate:
    """count of total, and their ratio (None when total is 0)."""

    count: int
    total: int
    value: float | None


def rate(count: int, total: int) -> Rate:
    return Rate(count, total, count / total if total else None)


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int
    invalid: int
    """Items with no verdict: in none of the four (LlavaGuard's invalid_assessments)."""


@dataclass(frozen=True)
class Rates:
    tpr: float
    tnr: float
    fpr: float
    fnr: float
    precision: float
    accuracy: float
    balanced_accuracy: float
    f1: float
    f2: float


def outcome(item: Judged) -> Outcome:
    if item.rating is None:
        return "invalid"
    hit = item.rating == item.expected_rating
    if item.expected_rating == "Unsafe":
        return "tp" if hit else "fn"
    return "tn" if hit else "fp"


def confusion(items: Iterable[Judged]) -> Confusion:
    counts = Counter(outcome(item) for item in items)
    return Confusion(counts["tp"], counts["fp"], counts["tn"], counts["fn"], counts["invalid"])


def _ratio(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator, 0 where the denominator is 0 (as their get_metrics)."""
    zeros = np.zeros(np.broadcast(numerator, denominator).shape)
    return np.divide(numerator, denominator, out=zeros, where=denominator != 0)


def rate_table(tp: Array, fp: Array, tn: Array, fn: Array) -> dict[str, Array]:
    """LlavaGuard's get_metrics, element by element, so the bootstrap of `--compare` computes
    exactly the report's figures. Theirs rounds TPR, TNR, FPR, FNR, accuracy and balanced
    accuracy to 4 places before F1 and F2 use them; rounding is presentation, so not here."""
    tpr, tnr = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    return {
        "tpr": tpr,
        "tnr": tnr,
        "fpr": _ratio(fp, fp + tn),
        "fnr": _ratio(fn, fn + tp),
        "precision": precision,
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "balanced_accuracy": (tpr + tnr) / 2,
        "f1": _ratio(2 * precision * tpr, precision + tpr),
        "f2": _ratio(5 * precision * tpr, 4 * precision + tpr),
    }


def rates(counts: Confusion) -> Rates:
    table = rate_table(
        *(np.array(n, dtype=np.float64) for n in (counts.tp, counts.fp, counts.tn, counts.fn))
    )
    return Rates(**{name: float(value) for name, value in table.items()})


def code_order(code: str) -> tuple[int, str, int]:
    """O1 < O2 < … < O10, R01 < R02, NA after the violating codes, other labels last."""
    match = re.fullmatch(r"([A-Za-z]+)(\d+)", code)
    if match:
        return (0, match[1], int(match[2]))
    return (1 if code == "NA" else 2, code, 0)


@dataclass(frozen=True)
class CategoryStats:
    """One expected category's items (LlavaGuard's compute_category_wise_stats)."""

    code: str
    items: int
    confusion: Confusion
    recall: float | None
    """None when no item of the category is expected Unsafe (NA, a Safe-only category)."""
    balanced_accuracy: float | None
    """None unless the category has both Unsafe and Safe items."""
    accuracy: float | None
    """The figure of a Safe-only category; None when no item got a verdict."""


def category_stats(code: str, items: Sequence[Judged]) -> CategoryStats:
    counts = confusion(items)
    table = rates(counts)
    positives, negatives = counts.tp + counts.fn, counts.tn + counts.fp
    return CategoryStats(
        code=code,
        items=len(items),
        confusion=counts,
        recall=table.tpr if positives else None,
        balanced_accuracy=table.balanced_accuracy if positives and negatives else None,
        accuracy=table.accuracy if positives + negatives else None,
    )


def per_category(items: Sequence[Judged]) -> tuple[CategoryStats, ...]:
    codes = sorted({i.expected_category for i in items if i.expected_category}, key=code_order)
    return tuple(
        category_stats(code, [i for i in items if i.expected_category == code]) for code in codes
    )


def category_correct(items: Sequence[Judged]) -> Rate:
    scored = [i for i in items if i.rating is not None and i.expected_category is not None]
    return rate(sum(i.category == i.expected_category for i in scored), len(scored))


def policy_exception_recall(items: Sequence[Judged]) -> Rate | None:
    """Theirs: `_v2` items count as TN, `_v4` as TP, so correct means the expected rating."""
    scored = [i for i in items if i.exceptions and i.rating is not None]
    if not scored:
        return None
    return rate(sum(i.rating == i.expected_rating for i in scored), len(scored))


@dataclass(frozen=True)
class CategoryConfusion:
    """counts[r][c]: items expected in category expected[r] the guard put in predicted[c]."""

    expected: tuple[str, ...]
    predicted: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]


def predicted_label(item: Judged) -> str:
    if item.rating is None:
        return NO_VERDICT
    return item.category or NO_CATEGORY


def category_confusion(items: Sequence[Judged]) -> CategoryConfusion:
    labelled = [i for i in items if i.expected_category is not None]
    pairs = Counter((str(i.expected_category), predicted_label(i)) for i in labelled)
    rows = sorted({e for e, _ in pairs}, key=code_order)
    found = {p for _, p in pairs}
    # The expected codes lead the columns too, so the diagonal is the correct answers.
    columns = rows + sorted(found - {*rows, NO_CATEGORY, NO_VERDICT}, key=code_order)
    columns += [label for label in (NO_CATEGORY, NO_VERDICT) if label in found]
    counts = tuple(tuple(pairs[(r, c)] for c in columns) for r in rows)
    return CategoryConfusion(tuple(rows), tuple(columns), counts)


def icm_accuracy(items: Sequence[Judged]) -> Rate:
    correct = sum(
        icm_correct(
            None if i.rating is None else unsafe_score(i.rating, i.confidence),
            i.expected_rating == "Unsafe",
        )
        for i in items
    )
    return rate(correct, len(items))


@dataclass(frozen=True)
class Latency:
    """Milliseconds; numpy's linear percentiles."""

    p50: float
    p90: float
    p99: float
    max: float


def latency(items: Sequence[Judged]) -> Latency | None:
    if not items:
        return None
    values = np.array([i.latency_ms for i in items], dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return Latency(p50, p90, p99, float(values.max()))


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Calibration:
    """Reliability of the confidence of the predicted rating, in equal-width bins."""

    bins: tuple[CalibrationBin, ...]
    ece: float
    """Expected calibration error: Σ_b (n_b / n)·|accuracy_b - mean confidence_b|."""
    scored: int
    """Items with a verdict and a confidence (n)."""
    unscored: int
    """Items with a verdict but no confidence; dead letters are in neither."""


def calibration_bin(confidence: float) -> int:
    """Bin i holds [i/10, (i+1)/10); the last one also 1.0. Compared with the edges i/10
    themselves, so 0.3 falls in bin 3 although 0.3 * 10 is not exactly 3 in floats."""
    return min(bisect.bisect_right(_EDGES, confidence) - 1, CALIBRATION_BINS - 1)


def calibration(items: Sequence[Judged]) -> Calibration | None:
    verdicts = [i for i in items if i.rating is not None]
    # (confidence, whether the rating was right) of every item that reports a confidence
    scored = [
        (i.confidence, i.rating == i.expected_rating) for i in verdicts if i.confidence is not None
    ]
    if not scored:
        return None
    binned: list[list[tuple[float, bool]]] = [[] for _ in range(CALIBRATION_BINS)]
    for confidence, correct in scored:
        binned[calibration_bin(confidence)].append((confidence, correct))
    bins = tuple(_bin(index, members) for index, members in enumerate(binned))
    ece = sum(
        b.count / len(scored) * abs(b.accuracy - b.mean_confidence)
        for b in bins
        if b.accuracy is not None and b.mean_confidence is not None
    )
    return Calibration(bins, ece, len(scored), len(verdicts) - len(scored))


def _bin(index: int, members: Sequence[tuple[float, bool]]) -> CalibrationBin:
    lower, upper = _EDGES[index], _EDGES[index + 1]
    if not members:
        return CalibrationBin(lower, upper, 0, None, None)
    confidence = sum(c for c, _ in members) / len(members)
    accuracy = sum(correct for _, correct in members) / len(members)
    return CalibrationBin(lower, upper, len(members), confidence, accuracy)


@dataclass(frozen=True)
class Actions:
    by_expected: dict[str, dict[str, int]]
    """Expected rating → action (allow, review, block) → items."""
    unsafe_allowed: Rate
    """Expected-Unsafe items allowed, of the expected-Unsafe items with an action."""


def _action_order(entry: tuple[tuple[str, str], int]) -> tuple[bool, int, str]:
    """Unsafe before Safe; allow, review, block, then any other action."""
    (expected, action), _ = entry
    known = ("allow", "review", "block")
    return (expected != "Unsafe", known.index(action) if action in known else 3, action)


def actions(items: Sequence[Judged]) -> Actions | None:
    acted = [i for i in items if i.action is not None]
    if not acted:
        return None
    pairs = Counter((i.expected_rating, str(i.action)) for i in acted)
    by_expected: dict[str, dict[str, int]] = {}
    for (expected, action), count in sorted(pairs.items(), key=_action_order):
        by_expected.setdefault(expected, {})[action] = count
    unsafe = [i for i in acted if i.expected_rating == "Unsafe"]
    return Actions(by_expected, rate(sum(i.action == "allow" for i in unsafe), len(unsafe)))


@dataclass(frozen=True)
class EvalMetrics:
    items: int
    confusion: Confusion
    rates: Rates
    category_correct: Rate
    policy_exceptions: Rate | None
    categories: tuple[CategoryStats, ...]
    category_confusion: CategoryConfusion
    icm_accuracy: Rate
    unparseable: Rate
    """Answers the policy's reader could not read, of all items."""
    dead_letters: dict[str, int]
    """Items without a verdict, by dead-letter code."""
    latency: Latency | None
    calibration: Calibration | None
    actions: Actions | None


def metrics(items: Sequence[Judged]) -> EvalMetrics:
    counts = confusion(items)
    return EvalMetrics(
        items=len(items),
        confusion=counts,
        rates=rates(counts),
        category_correct=category_correct(items),
        policy_exceptions=policy_exception_recall(items),
        categories=per_category(items),
        category_confusion=category_confusion(items),
        icm_accuracy=icm_accuracy(items),
        unparseable=rate(sum(i.unparseable for i in items), len(items)),
        dead_letters=dict(sorted(Counter(str(i.error) for i in items if i.rating is None).items())),
        latency=latency(items),
        calibration=calibration(items),
        actions=actions(items),
    )
