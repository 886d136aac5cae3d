"""Reviewers' decisions as known content: an image a person decided is not asked again.

The review tools publish one `ReviewDecision` per decided verdict to the decisions topic
(`service.core.reviews`), keyed like the verdict, a compacted topic. Read whole at start-up and
followed (`service.adapters.kafka.table`), it becomes this table: by image (sha256) and policy
id, the newest decision. A later event with the same image under the same policy gets that
decision as its verdict (`decided_by: human`), sticky over the model's verdicts, until the
decision is withdrawn: a tombstone for its key removes it, and an older decision about the same
image, if there is one, counts again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import ValidationError

from service.core.events import describe_validation_error
from service.core.reviews import ReviewDecision

log = logging.getLogger(__name__)

ContentKey = tuple[str, str]
"""(image sha256, policy id)."""


@dataclass
class HumanDecisions:
    """The newest decision for each (image, policy), from a stream of keyed records."""

    _by_key: dict[bytes, ReviewDecision] = field(default_factory=dict)
    _by_content: dict[ContentKey, dict[bytes, ReviewDecision]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._by_key)

    def apply(self, key: bytes, value: bytes | None, where: str) -> bool:
        """Take one record of the decisions topic; False (logged) when it is not a decision."""
        self._withdraw(key)
        if value is None:
            return True
        try:
            decision = ReviewDecision.model_validate_json(value)
        except ValidationError as exc:
            what = "review decision"
            log.warning("%s: %s; skipped", where, describe_validation_error(exc, what=what))
            return False
        self._by_key[key] = decision
        content = (decision.image_sha256, decision.policy_id)
        self._by_content.setdefault(content, {})[key] = decision
        return True

    def decision_for(self, sha256: str, policy_id: str) -> ReviewDecision | None:
        """The newest standing decision about this image under this policy."""
        decisions = self._by_content.get((sha256, policy_id))
        if not decisions:
            return None
        return max(decisions.values(), key=lambda decision: decision.decided_at)

    def _withdraw(self, key: bytes) -> None:
        old = self._by_key.pop(key, None)
        if old is None:
            return
        content = (old.image_sha256, old.policy_id)
        remaining = self._by_content.get(content, {})
        remaining.pop(key, None)
        if not remaining:
            self._by_content.pop(content, None)
