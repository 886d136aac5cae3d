"""Verdicts carry the decision, and a reviewer's decision record follows the published schema."""

from __future__ import annotations

import json
import math

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from service import contract
from service.core.reviews import review_decision
from service.core.verdicts import Verdict, serialize
from tests.support.pipeline import SAFE, ScriptedGuard, event_record, judge

UNSAFE = json.dumps({"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "nude"})


def _schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((contract.SCHEMA_DIR / name).read_text()))


@pytest.mark.parametrize(
    ("answer", "confidence", "action", "review", "reasons"),
    [
        (UNSAFE, 0.95, "block", False, ["category:O4"]),
        (UNSAFE, 0.55, "review", True, ["category:O4", "confidence_below:0.7"]),
        (UNSAFE, None, "block", False, ["category:O4", "no_confidence"]),
        (SAFE, 0.9, "allow", False, ["safe"]),
        (SAFE, 0.3, "review", True, ["safe", "confidence_below:0.6"]),
    ],
)
async def test_a_verdict_carries_the_packaged_policys_decision(
    answer: str, confidence: float | None, action: str, review: bool, reasons: list[str]
) -> None:
    guard = ScriptedGuard(
        answer, rating_log_prob=None if confidence is None else math.log(confidence)
    )

    verdict = await judge(guard, event_record())

    assert isinstance(verdict, Verdict)
    assert (verdict.action, verdict.would_action, verdict.review) == (action, action, review)
    assert verdict.reasons == reasons
    assert _schema("verdict.v1.json").is_valid(json.loads(serialize(verdict)))


async def test_a_reviewers_decision_on_a_review_verdict_follows_the_decisions_schema() -> None:
    verdict = await judge(ScriptedGuard(UNSAFE, rating_log_prob=math.log(0.5)), event_record())
    assert isinstance(verdict, Verdict)
    read_back = json.loads(serialize(verdict))

    decision = review_decision(read_back, action="allow", category_code="NA", reviewer="r-17")
    document = json.loads(decision.model_dump_json())

    assert _schema("decisions.v1.json").is_valid(document)
    assert (decision.event_id, decision.image_sha256) == (verdict.event_id, verdict.image_sha256)
    assert (decision.model_action, decision.sampled, decision.rating) == ("review", False, "Safe")
    assert not _schema("decisions.v1.json").is_valid({**document, "action": "review"})
    with pytest.raises(ValidationError):
        review_decision(read_back, action="block", category_code="O4", reviewer="")
