"""What a human reviewer decided about a verdict: the contract of the decisions topic.

A review tool reads the review topic (verdicts whose `review` is true), shows the image to a
person and publishes one `ReviewDecision` per decided verdict, keyed like the verdict, to the
decisions topic (`verdicts.decisions` by convention). guardstream defines the record here so
that the tools that consume it (known-content banks, evaluation against the model) and the
review tools that write it agree; `review_decision` builds one from a verdict.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.decisions import Action

SCHEMA_VERSION: Literal[1] = 1


class ReviewDecision(BaseModel):
    """A reviewer's final word on one verdict."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=256)
    image_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="The verdict's image_sha256: what was judged."
    )
    policy_id: str = Field(min_length=1, max_length=64)
    policy_version: str = Field(
        min_length=1, max_length=128, description="The verdict's policy_version."
    )
    tenant: str | None = Field(None, max_length=64)
    model_action: Action = Field(description="The verdict's action (what the service decided).")
    sampled: bool = Field(
        description="True when the verdict came to review by quality sampling, not by doubt: "
        "these measure how often the model and the reviewers agree."
    )
    action: Literal["allow", "block"] = Field(description="The reviewer's decision.")
    rating: Literal["Safe", "Unsafe"]
    category_code: str = Field(
        min_length=1,
        max_length=32,
        description='The policy category the reviewer chose ("NA" when none applies).',
    )
    reviewer: str = Field(
        min_length=1,
        max_length=128,
        description="An opaque reviewer id (no names or e-mail addresses: records are kept).",
    )
    note: str | None = Field(None, max_length=2000, description="Why, for the next reviewer.")
    decided_at: datetime


def review_decision(
    verdict: dict[str, Any],
    *,
    action: Literal["allow", "block"],
    category_code: str,
    reviewer: str,
    note: str | None = None,
) -> ReviewDecision:
    """The decision record for `verdict` (as read from the review topic, parsed JSON)."""
    return ReviewDecision(
        event_id=verdict["event_id"],
        image_sha256=verdict["image_sha256"],
        policy_id=verdict["policy_id"],
        policy_version=verdict["policy_version"],
        tenant=verdict.get("tenant"),
        model_action=verdict["action"],
        sampled=verdict["action"] != "review",
        action=action,
        rating="Unsafe" if action == "block" else "Safe",
        category_code=category_code,
        reviewer=reviewer,
        note=note,
        decided_at=datetime.now(UTC),
    )
