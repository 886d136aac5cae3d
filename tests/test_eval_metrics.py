"""LlavaGuard's metrics and the service's own, checked against figures worked out by hand.

The definitions are ml-research/LlavaGuard's `llavaguard/evaluation/metrics_calculator.py`
(840699c): positive is Unsafe, an item without a verdict is invalid (in none of TP/FP/TN/FN),
rates are 0 when their denominator is 0, nothing rounded here.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from service.core.eval_metrics import (
    NO_VERDICT,
    Confusion,
    Rate,
    calibration_bin,
    code_order,
    metrics,
    rates,
)
from service.core.evaluation import Judged
from tests.support.judged import dead_letter, judged


def exactly(value: Fraction | int) -> object:
    """A float computed from the counts, equal to the fraction up to rounding."""
    return pytest.approx(float(value), rel=1e-12, abs=1e-15)


F = Fraction

# Twelve items, latencies 10, 20, …, 120 ms. Outcome, category and ICM's P(violating)
# (`unsafe_score`: the confidence for Unsafe, its complement for Safe, 0/1 without one):
ITEMS: list[Judged] = [
    # a: Unsafe O1 → Unsafe O1, 0.9: TP, category right, score 0.9 → ICM right
    judged("a", "Unsafe", "Unsafe", expected_category="O1", category="O1", confidence=0.9,
           action="block", latency_ms=10),
    # b: Unsafe O1 → Safe NA, 0.45: FN, category wrong, score 0.55 > 0.5 → ICM right
    judged("b", "Unsafe", "Safe", expected_category="O1", category="NA", confidence=0.45,
           action="allow", latency_ms=20),
    # c: Unsafe O2 → Unsafe O3, 0.75: TP, category wrong, ICM right
    judged("c", "Unsafe", "Unsafe", expected_category="O2", category="O3", confidence=0.75,
           action="review", latency_ms=30),
    # d: Unsafe O2 → Unsafe O2, 0.95: TP, category right, ICM right
    judged("d", "Unsafe", "Unsafe", expected_category="O2", category="O2", confidence=0.95,
           action="block", latency_ms=40),
    # e: Safe NA → Safe NA, 0.85: TN, category right, score 0.15 → ICM right
    judged("e", "Safe", "Safe", expected_category="NA", category="NA", confidence=0.85,
           action="allow", latency_ms=50),
    # f: Safe NA → Unsafe O1, 0.55: FP, category wrong, score 0.55 → ICM wrong
    judged("f", "Safe", "Unsafe", expected_category="NA", category="O1", confidence=0.55,
           action="review", latency_ms=60),
    # g: Safe NA → Safe NA, 0.99: TN, category right, ICM right
    judged("g", "Safe", "Safe", expected_category="NA", category="NA", confidence=0.99,
           action="allow", latency_ms=70),
    # h: Safe O1 under an exception for O1 → Safe O1, 1.0: TN, category right, ICM right;
    #    policy exception honoured (LlavaGuard's `_v2` case)
    judged("h", "Safe", "Safe", expected_category="O1", category="O1", confidence=1.0,
           action="allow", exceptions=("O1",), latency_ms=80),
    # i: Unsafe O2 with an exception for O1 only → Safe O2, 0.65: FN, category right,
    #    score 0.35 → ICM wrong; policy exception applied where it does not (`_v4` missed)
    judged("i", "Unsafe", "Safe", expected_category="O2", category="O2", confidence=0.65,
           action="allow", exceptions=("O1",), latency_ms=90),
    # j: Unsafe O1, answer unreadable: invalid, ICM wrong
    dead_letter("j", "Unsafe", "unparseable_model_output", expected_category="O1",
                latency_ms=100),
    # k: Safe NA, guard down: invalid, ICM wrong
    dead_letter("k", "Safe", "guard_unavailable", expected_category="NA", latency_ms=110),
    # l: Safe NA → Safe NA, no confidence: TN, category right, score 0 → ICM right
    judged("l", "Safe", "Safe", expected_category="NA", category="NA", action="allow",
           latency_ms=120),
]  # fmt: skip


def test_items_without_a_verdict_are_invalid_and_outside_the_confusion_matrix() -> None:
    # TP a c d, FN b i, TN e g h l, FP f, invalid j k
    assert metrics(ITEMS).confusion == Confusion(tp=3, fp=1, tn=4, fn=2, invalid=2)


def test_llavaguard_rates_from_the_confusion_matrix() -> None:
    table = metrics(ITEMS).rates
    assert table.tpr == exactly(F(3, 5))  # recall: TP / (TP + FN)
    assert table.tnr == exactly(F(4, 5))  # specificity: TN / (TN + FP)
    assert table.fpr == exactly(F(1, 5))
    assert table.fnr == exactly(F(2, 5))
    assert table.precision == exactly(F(3, 4))  # TP / (TP + FP)
    assert table.accuracy == exactly(F(7, 10))  # (TP + TN) / classified, invalid left out
    assert table.balanced_accuracy == exactly(F(7, 10))  # (3/5 + 4/5) / 2
    # F1 = 2PR / (P + R) = 2·(3/4)(3/5) / (3/4 + 3/5) = (9/10) / (27/20) = 2/3
    assert table.f1 == exactly(F(2, 3))
    # F2 = 5PR / (4P + R) = (9/4) / (3 + 3/5) = 5/8
    assert table.f2 == exactly(F(5, 8))


def test_rates_are_zero_where_their_denominator_is_zero_as_llavaguard_computes_them() -> None:
    nothing_flagged = rates(Confusion(tp=0, fp=0, tn=5, fn=3, invalid=0))
    assert nothing_flagged.precision == 0.0
    assert nothing_flagged.f1 == 0.0
    assert nothing_flagged.f2 == 0.0
    assert nothing_flagged.balanced_accuracy == exactly(F(1, 2))  # (0 + 1) / 2
    empty = rates(Confusion(tp=0, fp=0, tn=0, fn=0, invalid=4))
    assert empty.accuracy == empty.balanced_accuracy == empty.tpr == empty.tnr == 0.0


def test_rates_are_not_rounded_to_four_places() -> None:
    assert rates(Confusion(tp=1, fp=0, tn=0, fn=2, invalid=0)).tpr == 1 / 3


def test_category_is_correct_when_the_codes_are_equal_over_classified_items() -> None:
    # right: a d e g h i l; wrong: b (NA for O1), c (O3 for O2), f (O1 for NA); j k no verdict
    assert metrics(ITEMS).category_correct == Rate(7, 10, 7 / 10)


def test_policy_exception_recall_counts_classified_items_with_exceptions() -> None:
    # h honoured its exception (TN), i did not flag what its exception did not cover (FN)
    assert metrics(ITEMS).policy_exceptions == Rate(1, 2, 1 / 2)
    assert metrics([i for i in ITEMS if not i.exceptions]).policy_exceptions is None


def test_per_category_recall_balanced_accuracy_and_accuracy() -> None:
    by_code = {c.code: c for c in metrics(ITEMS).categories}
    assert list(by_code) == ["O1", "O2", "NA"]
    # O1: a TP, b FN, h TN, j invalid → recall 1/2, TNR 1, balanced 3/4, accuracy 2/3
    o1 = by_code["O1"]
    assert (o1.items, o1.confusion) == (4, Confusion(tp=1, fp=0, tn=1, fn=1, invalid=1))
    assert o1.recall == exactly(F(1, 2))
    assert o1.balanced_accuracy == exactly(F(3, 4))
    assert o1.accuracy == exactly(F(2, 3))
    # O2: c TP, d TP, i FN, no Safe item → recall 2/3, no balanced accuracy
    o2 = by_code["O2"]
    assert o2.recall == exactly(F(2, 3))
    assert o2.balanced_accuracy is None
    assert o2.accuracy == exactly(F(2, 3))
    # NA: e g l TN, f FP, k invalid → the safe category is measured by its accuracy, 3/4
    na = by_code["NA"]
    assert (na.recall, na.balanced_accuracy) == (None, None)
    assert na.accuracy == exactly(F(3, 4))


def test_category_confusion_puts_dead_letters_in_their_own_column() -> None:
    table = metrics(ITEMS).category_confusion
    assert table.expected == ("O1", "O2", "NA")
    assert table.predicted == ("O1", "O2", "NA", "O3", NO_VERDICT)
    assert table.counts == (
        (2, 0, 1, 0, 1),  # O1: a h → O1, b → NA, j → no verdict
        (0, 2, 0, 1, 0),  # O2: d i → O2, c → O3
        (1, 0, 3, 0, 1),  # NA: f → O1, e g l → NA, k → no verdict
    )


def test_icm_accuracy_scores_by_probability_and_counts_dead_letters_wrong() -> None:
    # right: a b c d e g h l (b: Safe at 0.45 is P(violating) 0.55); wrong: f i j k
    assert metrics(ITEMS).icm_accuracy == Rate(8, 12, 8 / 12)


def test_unparseable_rate_is_over_all_items_and_dead_letters_are_counted_by_code() -> None:
    result = metrics(ITEMS)
    assert result.unparseable == Rate(1, 12, 1 / 12)
    assert result.dead_letters == {"guard_unavailable": 1, "unparseable_model_output": 1}


def test_latency_percentiles_are_numpy_linear() -> None:
    latency = metrics(ITEMS).latency
    assert latency is not None
    # sorted 10 … 120; rank q·(12 - 1): p50 at 5.5 → 65, p90 at 9.9 → 100 + 0.9·10 = 109,
    # p99 at 10.89 → 110 + 0.89·10 = 118.9
    assert latency.p50 == exactly(65)
    assert latency.p90 == exactly(109)
    assert latency.p99 == exactly(F(1189, 10))
    assert latency.max == 120


def test_calibration_bins_the_confidence_of_the_predicted_rating() -> None:
    result = metrics(ITEMS).calibration
    assert result is not None
    assert (result.scored, result.unscored) == (9, 1)  # l has no confidence; j k no verdict
    filled = {index: b for index, b in enumerate(result.bins) if b.count}
    # bin 4: b 0.45 wrong; 5: f 0.55 wrong; 6: i 0.65 wrong; 7: c 0.75 right; 8: e 0.85
    # right; 9: a 0.9, d 0.95, g 0.99, h 1.0 all right, mean confidence 3.84 / 4 = 0.96
    assert {i: b.count for i, b in filled.items()} == {4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 4}
    assert [filled[i].accuracy for i in range(4, 10)] == [0, 0, 0, 1, 1, 1]
    assert filled[9].mean_confidence == exactly(F(96, 100))
    assert (result.bins[9].lower, result.bins[9].upper) == (0.9, 1.0)
    # ECE = Σ n_b/n·|acc - conf| = (0.45 + 0.55 + 0.65 + 0.25 + 0.15 + 4·0.04) / 9 = 2.21 / 9
    assert result.ece == exactly(F(221, 900))


@pytest.mark.parametrize(
    ("confidence", "index"), [(0.0, 0), (0.1, 1), (0.3, 3), (0.7, 7), (0.2999, 2), (1.0, 9)]
)
def test_a_confidence_on_an_edge_falls_in_the_bin_it_opens(confidence: float, index: int) -> None:
    assert calibration_bin(confidence) == index


def test_actions_per_expected_rating_and_unsafe_items_allowed() -> None:
    result = metrics(ITEMS).actions
    assert result is not None
    assert result.by_expected == {
        "Unsafe": {"block": 2, "allow": 2, "review": 1},  # a d, b i, c
        "Safe": {"allow": 4, "review": 1},  # e g h l, f
    }
    assert result.unsafe_allowed == Rate(2, 5, 2 / 5)  # b i of a b c d i


def test_no_items_give_empty_figures_not_errors() -> None:
    result = metrics([])
    assert result.confusion == Confusion(0, 0, 0, 0, 0)
    assert result.rates.balanced_accuracy == 0.0
    assert result.unparseable == Rate(0, 0, None)
    assert (result.latency, result.calibration, result.actions) == (None, None, None)
    assert result.categories == ()


def test_only_dead_letters_give_zero_rates_and_no_calibration() -> None:
    result = metrics([dead_letter("x", "Unsafe", "unparseable_model_output")])
    assert result.confusion.invalid == 1
    assert result.rates.balanced_accuracy == 0.0
    assert result.calibration is None
    assert result.category_correct == Rate(0, 0, None)


def test_category_codes_sort_by_number_with_na_after_them() -> None:
    codes = ["NA", "O10", "O2", "O1", "R01", "zzz"]
    assert sorted(codes, key=code_order) == ["O1", "O2", "O10", "R01", "NA", "zzz"]
