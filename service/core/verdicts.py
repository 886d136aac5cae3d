"""The outbound contract: a verdict per judged event, or a dead letter saying why there is none.

Both are JSON (schemas in `service/schemas/`), keyed like the input record, with headers
`traceparent` (the event's trace) and `event-id`; dead letters add `error-code`.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue
from pydantic_core import to_json

from service.core.decisions import Action
from service.core.errors import DEAD_LETTER_CODES

SCHEMA_VERSION: Literal[1] = 1


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Out):
    """Where the judged record was read from."""

    topic: str
    partition: int
    offset: int


class ModelInfo(_Out):
    """Who decided: the model's own name and version, and the Triton model that served it."""

    name: str
    version: str
    triton_model: str
    triton_version: str


Rating = Literal["Safe", "Unsafe"]
DecidedBy = Literal["model", "reuse", "bank", "human"]


class Match(_Out):
    """The known content that decided a verdict instead of the model."""

    bank: str = Field(
        description='The bank whose entry matched; "human" for a reviewer\'s decision, "reuse" '
        "for a reused verdict."
    )
    entry_id: str = Field(
        description="The bank entry's id; for human, the decided event's id; for reuse, the id "
        "of the event whose verdict is reused."
    )
    kind: Literal["pdq", "sha256", "md5"] = Field(description="The hash that matched.")
    distance: int = Field(
        0, ge=0, le=256, description="PDQ Hamming distance (bits); 0 for exact hashes."
    )


class Supersedes(_Out):
    """The verdict a replay verdict replaces, as found on the verdict topic."""

    event_id: str
    policy_id: str | None = Field(
        None, description="The original verdict's policy id; null when none was found."
    )
    policy_version: str | None = Field(
        None, description="The original verdict's policy_version; null when none was found."
    )
    source: Source | None = Field(
        None, description="Where the original verdict was read (verdict topic, offset)."
    )


class Replay(_Out):
    """Marks a verdict of `python -m service replay`: the event judged again, later."""

    run_id: str = Field(description="The replay run that judged it again.")
    supersedes: Supersedes


Agreement = Literal["agree", "stricter", "more_lenient", "other_category"]


class ShadowOf(_Out):
    """Marks a shadow verdict: the candidate's answer beside the live verdict of the event."""

    live_rating: Rating
    live_category_code: str
    live_action: Action | None
    live_policy_version: str
    agreement: Agreement = Field(
        description="agree (same rating, category and action), stricter or more_lenient (the "
        "candidate's action, or rating without actions, is stricter or more lenient), "
        "other_category (same rating and action, another category)."
    )


class Timings(_Out):
    fetch_ms: float | None = Field(
        None, description="Time to fetch `image.url` (null for inline images)."
    )
    decode_ms: float = Field(description="Time to decode and downscale the image.")
    guard_ms: float = Field(description="Time the guard model took, retries included.")
    total_ms: float = Field(description="From taking the record to having the verdict.")


class Verdict(_Out):
    """The guard model's assessment of one image event against one policy."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    rating: Rating
    category: str = Field(description='The policy\'s label, e.g. "O4: Nudity Content".')
    category_code: str = Field(description='The label\'s code, e.g. "O4", or "NA".')
    rationale: str
    confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Probability the model gave the answer, at the token that decided it "
        "(LlavaGuard: the rating's first token, over the vocabulary; ICM-Assistant: the leading "
        "Yes/No, over Yes and No, as ICM's evaluation scores it); null when the model does not "
        "say.",
    )
    action: Action | None = Field(
        None,
        description="What to do with the image under the policy's decision rules: allow, "
        "review (also published to the review topic) or block. Always allow when the policy "
        "observes only (see would_action). Null only from services older than decisions.",
    )
    would_action: Action | None = Field(
        None,
        description="The action the rules chose before observe-only mode turned it into allow; "
        "equal to action when the policy enforces.",
    )
    review: bool = Field(
        False,
        description="Whether this verdict was also published to the review topic: its action is "
        "review, or quality sampling picked it (reasons then hold sampled:<fraction>).",
    )
    reasons: list[str] = Field(
        default_factory=list,
        description='Which rules decided, in order, e.g. ["category:O4", "confidence_below:0.7"]'
        "; see the README's decision section.",
    )
    tenant: str | None = Field(None, description="The tenant the event was judged for, if any.")
    policy_id: str
    policy_version: str = Field(
        description="The policy's version and a hash of its prompt and decision rules, e.g. "
        '"1.2.0+3f2a9c1d0b7e": two policies that ask or decide differently never share one.'
    )
    model: ModelInfo
    image_sha256: str
    pdq: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="PDQ perceptual hash of the image (64 hex digits); null when not computed.",
    )
    pdq_quality: int | None = Field(
        None,
        ge=0,
        le=100,
        description="PDQ's quality score (0-100); hashes under 50 are not used to match.",
    )
    decided_by: DecidedBy = Field(
        "model",
        description="model (the guard judged the image), reuse (an earlier verdict on the same "
        "image, policy version and model), bank (a hash-bank match) or human (a reviewer's "
        "standing decision on this image and policy).",
    )
    match: Match | None = Field(None, description="What decided, when it was not the model.")
    frames_judged: int = Field(
        1, description="Frames of the image the guard judged (several only for animations)."
    )
    frame: int = Field(
        0, description="The frame this verdict is about: the first rated Unsafe, else the first."
    )
    replay: Replay | None = Field(
        None, description="Set on a replay verdict (verdicts.replay), never on a live one."
    )
    shadow: ShadowOf | None = Field(
        None, description="Set on a shadow verdict (verdicts.shadow), never on a live one."
    )
    metadata: dict[str, JsonValue]
    source: Source
    trace_id: str | None = Field(description="W3C trace id (32 hex digits) of the event.")
    timings: Timings
    decided_at: datetime


def _dead_letter_code(code: str) -> str:
    if code not in DEAD_LETTER_CODES:
        raise ValueError(f"{code!r} is not a dead-letter code")
    return code


class DeadLetterError(_Out):
    # Not a Literal: that would list the codes a second time, apart from the error classes.
    code: Annotated[str, AfterValidator(_dead_letter_code)] = Field(
        description="Stable, machine-readable reason; see the README.",
        json_schema_extra={"enum": list(DEAD_LETTER_CODES)},
    )
    message: str = Field(description="What went wrong, for a human.")
    model_output: str | None = Field(
        None, description="The guard's raw answer, when the answer was what failed."
    )


class Header(_Out):
    key: str
    value: str | None = Field(None, description="The header value, when it is UTF-8 text.")
    value_base64: str | None = Field(None, description="The header value otherwise.")


class DeadLetter(_Out):
    """An input record that produced no verdict, and why."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str | None
    error: DeadLetterError
    source: Source
    original: str | None = Field(
        description="The original record value, base64, cut to the configured size."
    )
    original_size: int = Field(description="Size of the original record value in bytes.")
    original_truncated: bool
    original_headers: list[Header]
    trace_id: str | None
    failed_at: datetime


def keep_original(value: bytes | None, limit: int) -> tuple[str | None, int, bool]:
    """The original value for a dead letter: base64 of at most `limit` bytes."""
    if value is None:
        return None, 0, False
    return base64.b64encode(value[:limit]).decode("ascii"), len(value), len(value) > limit


def describe_headers(headers: list[tuple[str, bytes]]) -> list[Header]:
    described = []
    for key, raw in headers:
        try:
            described.append(Header(key=key, value=raw.decode("utf-8")))
        except UnicodeDecodeError:
            described.append(Header(key=key, value_base64=base64.b64encode(raw).decode("ascii")))
    return described


def serialize(record: Verdict | DeadLetter) -> bytes:
    return to_json(record)


_SEVERITY = {"allow": 0, "review": 1, "block": 2, "Safe": 0, "Unsafe": 1}


def agreement(live: Verdict, candidate: Verdict) -> Agreement:
    """How a candidate's verdict stands to the live one: by action when both have one and they
    differ (what the upload service would have done), else by rating, else by category."""
    if live.action is not None and candidate.action is not None and live.action != candidate.action:
        stricter = _SEVERITY[candidate.action] > _SEVERITY[live.action]
    elif live.rating != candidate.rating:
        stricter = _SEVERITY[candidate.rating] > _SEVERITY[live.rating]
    elif live.category_code != candidate.category_code:
        return "other_category"
    else:
        return "agree"
    return "stricter" if stricter else "more_lenient"


def shadow_of(live: Verdict, candidate: Verdict) -> Verdict:
    """The candidate's verdict as published on the shadow topic, naming the live verdict."""
    return candidate.model_copy(
        update={
            "shadow": ShadowOf(
                live_rating=live.rating,
                live_category_code=live.category_code,
                live_action=live.action,
                live_policy_version=live.policy_version,
                agreement=agreement(live, candidate),
            )
        }
    )
