"""ICM-Assistant's metrics as its evaluation scripts define them, and the eval manifest.

The reference behaviour is zhaoyuzhi/ICM-Assistant's `eval_scripts/eval_icm_val/eval.py`
(`conclude_one_item`: positive when the score is above 0.5) and `eval_scripts/eval_mqa/eval.py`
(`eval_line`: the first character, upper-cased, in A B C D Y N and equal to the expected one's).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.evaluation import (
    Accuracy,
    accuracy,
    icm_correct,
    mqa_choice,
    mqa_correct,
    unsafe_score,
)
from service.evaluate import ItemResult, Report, read_manifest


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


def test_the_manifest_is_read_and_a_bad_line_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"id": "a", "image": "a.jpg", "expected": "Yes"}\n\n'
        '{"image": "b.jpg", "question": "Which? A. x B. y", "expected": "B."}\n'
    )
    first, second = read_manifest(manifest)
    assert (first.task, second.task, second.id) == ("icm", "mqa", None)
    for line, message in [
        ('{"image": "a.jpg", "expected": "maybe"}', "expected must be Yes, No, Unsafe or Safe"),
        ('{"image": "a.jpg", "question": "Q?", "expected": "E."}', "must start with A, B, C"),
        ('{"image": "a.jpg", "expected": "Yes", "label": 1}', "Extra inputs"),
        ('{"expected": "Yes"}', "Field required"),
    ]:
        manifest.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"m.jsonl:1: .*{message}"):
            read_manifest(manifest)
    manifest.write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        read_manifest(manifest)


def test_the_report_gives_each_kind_of_question_its_own_figure() -> None:
    items = (
        ItemResult("1", "icm", "Yes", "Yes.", True, 0.9, confidence_reported=True),
        ItemResult("2", "icm", "No", "{}", False, error="unparseable"),
        ItemResult("6", "icm", "No", '{"rating": "Safe"}', True, 0.0),
        ItemResult("3", "mqa", "D.", "D.", True),
        ItemResult("4", "mqa", "A.", "B.", False),
        ItemResult("5", "mqa", "Yes.", "Yes", True),
    )
    lines = Report(items, "icm-assistant 1.0.1+abc", "tiny sha256:1").lines()
    assert lines == [
        "model                 tiny sha256:1",
        "policy (ICM items)    icm-assistant 1.0.1+abc",
        "ICM accuracy          0.6667 (2/3)  (1 scored on the rating alone: no confidence)",
        "MQA accuracy          0.6667 (2/3)",
        "  multiple choice     0.5000 (1/2)",
        "  yes/no questions    1.0000 (1/1)",
        "errors                1",
    ]
