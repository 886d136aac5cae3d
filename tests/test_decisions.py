"""Decision rules: the action for an answer, confidence bands, quality sampling, observe-only."""

from __future__ import annotations

import pytest

from service.core.decisions import Decision, DecisionRules, decide, rules_from_table, sample_point

DEFAULTS = DecisionRules()


def _decide(
    rules: DecisionRules = DEFAULTS,
    rating: str = "Unsafe",
    code: str = "O4",
    confidence: float | None = 0.99,
    event_id: str = "e-1",
) -> Decision:
    return decide(
        rules, rating=rating, category_code=code, confidence=confidence, event_id=event_id
    )


@pytest.mark.parametrize(
    ("rating", "confidence", "action", "reasons"),
    [
        ("Unsafe", 0.99, "block", ("category:O4",)),
        ("Unsafe", 0.69, "review", ("category:O4", "confidence_below:0.7")),
        ("Unsafe", 0.7, "block", ("category:O4",)),
        ("Unsafe", None, "block", ("category:O4", "no_confidence")),
        ("Safe", 0.99, "allow", ("safe",)),
        ("Safe", 0.59, "review", ("safe", "confidence_below:0.6")),
        ("Safe", None, "allow", ("safe", "no_confidence")),
    ],
)
def test_the_default_rules_block_unsafe_allow_safe_and_review_doubtful_answers(
    rating: str, confidence: float | None, action: str, reasons: tuple[str, ...]
) -> None:
    decision = _decide(rating=rating, confidence=confidence)

    assert (decision.action, decision.would_action) == (action, action)
    assert (decision.review, decision.reasons) == (action == "review", reasons)


def test_a_category_mapping_overrides_the_unsafe_action_and_bands_only_doubt_a_block() -> None:
    rules = DecisionRules(categories={"O4": "review", "O9": "allow"})

    assert _decide(rules, code="O4").action == "review"
    assert _decide(rules, code="O9", confidence=0.1) == Decision(
        "allow", "allow", review=False, reasons=("category:O9",)
    )
    assert _decide(rules, code="O1").action == "block"


def test_bands_turned_off_never_review() -> None:
    rules = DecisionRules(safe_review_below=None, unsafe_review_below=None)

    assert _decide(rules, confidence=0.01).reasons == ("category:O4",)
    assert _decide(rules, rating="Safe", confidence=0.01).action == "allow"


def test_observe_only_allows_and_keeps_what_the_rules_would_do() -> None:
    rules = DecisionRules(enforce=False)

    assert _decide(rules) == Decision(
        "allow", "block", review=False, reasons=("category:O4", "observe_only")
    )
    assert _decide(rules, confidence=0.5).would_action == "review"


def test_quality_sampling_reviews_the_same_events_every_time_and_about_the_fraction() -> None:
    rules = DecisionRules(sample_allowed=0.1)
    ids = [f"event-{n}" for n in range(20_000)]

    first = [_decide(rules, rating="Safe", event_id=i).review for i in ids]
    again = [_decide(rules, rating="Safe", event_id=i).review for i in ids]

    assert first == again
    assert 0.09 < sum(first) / len(ids) < 0.11
    sampled = next(i for i, reviewed in zip(ids, first, strict=True) if reviewed)
    assert _decide(rules, rating="Safe", event_id=sampled) == Decision(
        "allow", "allow", review=True, reasons=("safe", "sampled:0.1")
    )
    assert not any(_decide(rules, event_id=i).review for i in ids[:2000])  # blocks: not sampled


def test_sample_points_spread_over_zero_to_one() -> None:
    points = [sample_point(f"id-{n}") for n in range(10_000)]

    assert min(points) >= 0
    assert max(points) < 1
    for quarter in (0.25, 0.5, 0.75):
        assert sum(p < quarter for p in points) / len(points) == pytest.approx(quarter, abs=0.02)


def test_a_decision_table_applies_over_its_base_and_is_checked_key_by_key() -> None:
    base = DecisionRules(categories={"O1": "review"})

    rules = rules_from_table(
        {"enforce": False, "safe_review_below": False, "categories": {"O2": "allow"}},
        base=base,
        category_codes=("O1", "O2"),
    )

    assert rules == DecisionRules(
        enforce=False, safe_review_below=None, categories={"O1": "review", "O2": "allow"}
    )
    with pytest.raises(ValueError, match=r"decision: unknown key\(s\): enforced"):
        rules_from_table({"enforced": True}, base=base, category_codes=("O1",))
    with pytest.raises(ValueError, match=r"decision.sample_allowed: True is not a number"):
        rules_from_table({"sample_allowed": True}, base=base, category_codes=("O1",))
    with pytest.raises(ValueError, match=r"decision.enforce: must be true or false"):
        rules_from_table({"enforce": "yes"}, base=base, category_codes=("O1",))
