"""What was decided about an image, and the verdict that says it for one event.

A `Judgement` is the part of a verdict that belongs to the image under a policy: rating,
category, rationale, confidence, who decided. The model makes one from its answer
(`model_judgement`); known content makes one from a bank entry, a reviewer's decision or an
earlier verdict (`service.core.known`). `verdict_for` gives it to one event: the event's id,
source, trace and timings, and the action the policy's rules (or the known content) decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from opentelemetry import trace

from service.core.banks import BankMatch
from service.core.decisions import Decision, decide
from service.core.events import ImageEvent, RawImageEvent
from service.core.guard import GuardReply
from service.core.images import DecodedImage
from service.core.policies import Assessment, Policy
from service.core.verdicts import DecidedBy, Match, ModelInfo, Rating, Source, Timings, Verdict
from service.ops.tracing import trace_id_of

ModelIdentity = tuple[str, str]
"""(name, version) of the model behind the Triton name: what reused verdicts are keyed by."""


@dataclass(frozen=True)
class Judgement:
    """What was decided about an image under a policy, before it is one event's verdict."""

    rating: Rating
    category_code: str
    category: str
    rationale: str
    confidence: float | None
    model: ModelInfo
    decided_by: DecidedBy = "model"
    match: Match | None = None
    frames_judged: int = 1
    frame: int = 0
    decision: Decision | None = None
    """Set when known content decided the action itself (a bank, a reviewer); None: the
    policy's decision rules decide, as for the model's own answers."""
    review_bank: BankMatch | None = None
    """A review bank's match: the verdict goes to review whatever the rules say."""


def model_judgement(
    reply: GuardReply, assessment: Assessment, image: DecodedImage, frame: int
) -> Judgement:
    name, version = _model_identity(reply, assessment)
    return Judgement(
        rating=assessment.rating,
        category_code=assessment.category.code,
        category=assessment.category.label,
        rationale=assessment.rationale,
        confidence=None if reply.rating_log_prob is None else math.exp(reply.rating_log_prob),
        model=ModelInfo(
            name=name,
            version=version,
            triton_model=reply.model_name,
            triton_version=reply.model_version,
        ),
        frames_judged=len(image.frame_indexes),
        frame=frame,
    )


def verdict_for(
    judgement: Judgement,
    event: ImageEvent | RawImageEvent,
    policy: Policy,
    image: DecodedImage,
    source: Source,
    timings: Timings,
) -> Verdict:
    """The verdict on one event: its own id, source and trace, what `judgement` says."""
    decision = judgement.decision or decide(
        policy.decision,
        rating=judgement.rating,
        category_code=judgement.category_code,
        confidence=judgement.confidence,
        event_id=event.event_id,
    )
    if judgement.review_bank is not None:
        decision = reviewed(policy, decision, judgement.review_bank)
    return Verdict(
        event_id=event.event_id,
        rating=judgement.rating,
        category=judgement.category,
        category_code=judgement.category_code,
        rationale=judgement.rationale,
        confidence=judgement.confidence,
        action=decision.action,
        would_action=decision.would_action,
        review=decision.review,
        reasons=list(decision.reasons),
        policy_id=policy.id,
        policy_version=policy.full_version,
        model=judgement.model,
        image_sha256=image.sha256,
        pdq=image.pdq.hex if image.pdq else None,
        pdq_quality=image.pdq.quality if image.pdq else None,
        decided_by=judgement.decided_by,
        match=judgement.match,
        frames_judged=judgement.frames_judged,
        frame=judgement.frame,
        metadata=event.metadata,
        source=source,
        trace_id=trace_id_of(trace.get_current_span()),
        timings=timings,
        decided_at=datetime.now(UTC),
    )


def reviewed(policy: Policy, decision: Decision, bank: BankMatch) -> Decision:
    """`decision` turned into a review for a review bank's match (observe-only still allows)."""
    reasons = (*decision.reasons, f"bank:{bank.spec.name}")
    if not policy.decision.enforce:
        return replace(decision, would_action="review", reasons=reasons)
    return Decision("review", "review", review=True, reasons=reasons)


def served_identity(reply: GuardReply) -> ModelIdentity:
    """The model behind the Triton name, as its config says, else the Triton name and
    version: known from the reply before its answer is read."""
    served = reply.served
    if served is not None and served.name is not None:
        return served.name, served.version or reply.model_version
    return reply.model_name, reply.model_version


def _model_identity(reply: GuardReply, assessment: Assessment) -> ModelIdentity:
    """Who decided: the answer's own "model" key, else the served model's identity."""
    if assessment.model is not None:
        return assessment.model.name, assessment.model.version
    return served_identity(reply)
