"""ICM-Assistant's metrics as its evaluation scripts define them.

The reference behaviour is zhaoyuzhi/ICM-Assistant's `eval_scripts/eval_icm_val/eval.py`
(`conclude_one_item`: positive when the score is above 0.5) and `eval_scripts/eval_mqa/eval.py`
(`eval_line`: the first character, upper-cased, in A B C D Y N and equal to the expected one's).
"""

from __future__ import annotations

import pytest

from service.core.evaluation import (
    Accuracy,
    accuracy,
    icm_correct,
    mqa_choice,
    mqa_correct,
    unsafe_score,
)


@pytest.mark.parametrize(
    ("rating", "confidence", "score"),
    [
        ("Unsafe", 0.9549844683997677, 0.9549844683997677),  # ICM's first val image, Yes
        ("Safe", 0.8, 0.19999999999999996),
        ("Unsafe", None, 1.0),
        ("Safe", None, 0.0),
    ],
)
def test_the_score_is_the_probability_of_a_violating_answer(
    rating: str, confidence: float | None, score: float
) -> None:
    assert unsafe_score(rating, confidence) == pytest.approx(score)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("score", "violating", "correct"),
    [
        (0.51, True, True),
        (0.5, True, False),  # strictly above the threshold, as conclude_one_item
        (0.5, False, True),
        (0.2, False, True),
        (0.9, False, False),
        (None, True, False),
        (None, False, False),
    ],
)
def test_icm_accuracy_counts_a_prediction_above_one_half_as_violating(
    score: float | None, violating: bool, correct: bool
) -> None:
    assert icm_correct(score, violating) is correct


@pytest.mark.parametrize(
    ("answer", "expected", "correct"),
    [
        ("D.", "D.", True),
        ("d) the person is biting a finger", "D.", True),
        ("Yes, it matches R26.", "Yes.", True),
        ("yes", "Yes.", True),
        ("No.", "Yes.", False),
        ("B.", "D.", False),
        ("The answer is D.", "D.", False),  # 'T' is no choice: ICM's eval_line says False
        (" D.", "D.", False),  # nor is a space
        ("", "D.", False),
        ("E.", "E.", False),
    ],
)
def test_mqa_scores_the_answers_first_character(answer: str, expected: str, correct: bool) -> None:
    assert mqa_correct(answer, expected) is correct


def test_only_the_choices_icm_scores_are_choices() -> None:
    assert [mqa_choice(answer) for answer in ("a", "N", "yes", "x", "")] == [
        "A",
        "N",
        "Y",
        None,
        None,
    ]


def test_accuracy_says_what_it_counted() -> None:
    assert str(accuracy([True, False, True])) == "0.6667 (2/3)"
    assert str(Accuracy(0, 0)) == "n/a (0/0)"
