"""From the guard's answer to what the upload service does: allow, review or block.

A policy's `[decision]` table (see the README) maps the rating and category to an action, sends
doubtful answers to review by confidence band, sends a fixed fraction of allowed or blocked
verdicts to review as well (quality sampling, decided by a hash of the event id so an event is
always sampled the same way), and may only observe: then the action is always allow and the
rules' choice is kept as `would_action`.

`decide` is pure and cheap (a few microseconds: `tests/benchmarks/decide.py` measures it); the
table is read and checked once, when the policy loads (`rules_from_table`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

Action = Literal["allow", "review", "block"]
ACTIONS: tuple[Action, ...] = get_args(Action)

_KEYS = frozenset(
    {
        "enforce",
        "safe",
        "unsafe",
        "categories",
        "safe_review_below",
        "unsafe_review_below",
        "sample_allowed",
        "sample_blocked",
    }
)


@dataclass(frozen=True)
class DecisionRules:
    """A policy's decision rules. The defaults are the conservative ones of the packaged policies.

    `categories` overrides `unsafe` per category code. The bands apply where the guard reports a
    confidence: an Unsafe answer the rules would block is reviewed when its confidence is below
    `unsafe_review_below`; a Safe answer the rules would allow is reviewed when below
    `safe_review_below`. None turns a band off.
    """

    enforce: bool = True
    safe: Action = "allow"
    unsafe: Action = "block"
    categories: Mapping[str, Action] = field(default_factory=dict)
    safe_review_below: float | None = 0.6
    unsafe_review_below: float | None = 0.7
    sample_allowed: float = 0.0
    sample_blocked: float = 0.0

    def canonical(self) -> dict[str, Any]:
        """The rules as plain data in a fixed order, for the policy's fingerprint."""
        return {
            "enforce": self.enforce,
            "safe": self.safe,
            "unsafe": self.unsafe,
            "categories": dict(sorted(self.categories.items())),
            "safe_review_below": self.safe_review_below,
            "unsafe_review_below": self.unsafe_review_below,
            "sample_allowed": self.sample_allowed,
            "sample_blocked": self.sample_blocked,
        }


@dataclass(frozen=True)
class Decision:
    """What to do (`action`), whether a reviewer sees it (`review`), and which rules said so."""

    action: Action
    would_action: Action
    review: bool
    reasons: tuple[str, ...]


def decide(
    rules: DecisionRules,
    *,
    rating: str,
    category_code: str,
    confidence: float | None,
    event_id: str,
) -> Decision:
    """The decision for one answer; the same inputs always give the same decision."""
    if rating == "Safe":
        action, reasons = rules.safe, ["safe"]
        band, doubted = rules.safe_review_below, "allow"
    else:
        action = rules.categories.get(category_code, rules.unsafe)
        reasons = [f"category:{category_code}"]
        band, doubted = rules.unsafe_review_below, "block"
    if band is not None and action == doubted:
        if confidence is None:
            reasons.append("no_confidence")
        elif confidence < band:
            action = "review"
            reasons.append(f"confidence_below:{band:g}")
    rate = _sample_rate(rules, action)
    sampled = rate > 0 and sample_point(event_id) < rate
    if sampled:
        reasons.append(f"sampled:{rate:g}")
    if not rules.enforce:
        reasons.append("observe_only")
        return Decision("allow", action, review=False, reasons=tuple(reasons))
    return Decision(action, action, review=action == "review" or sampled, reasons=tuple(reasons))


def sample_point(event_id: str) -> float:
    """Where `event_id` falls in [0, 1): the first 8 bytes of its SHA-256, as a fraction.

    A fraction f of event ids falls below f, and an event falls at the same point every time,
    under every policy and on every instance.
    """
    digest = hashlib.sha256(event_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _sample_rate(rules: DecisionRules, action: Action) -> float:
    if action == "allow":
        return rules.sample_allowed
    if action == "block":
        return rules.sample_blocked
    return 0.0  # already reviewed


# --- Reading a [decision] table ---------------------------------------------------------------


def rules_from_table(
    table: Mapping[str, Any], *, base: DecisionRules, category_codes: Iterable[str]
) -> DecisionRules:
    """`base` with the keys of a policy file's `[decision]` table applied over it.

    `categories` merges per code (a derived policy overrides its parent's mapping one category at
    a time). Raises ValueError naming the key (`decision.categories.O10`) and what is wrong.
    """
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ValueError(f"decision: unknown key(s): {', '.join(unknown)}")
    codes = tuple(category_codes)
    changes: dict[str, Any] = {}
    for key in ("safe", "unsafe"):
        if key in table:
            changes[key] = _action(table[key], f"decision.{key}")
    if "enforce" in table:
        if not isinstance(table["enforce"], bool):
            raise ValueError("decision.enforce: must be true or false")
        changes["enforce"] = table["enforce"]
    for key in ("safe_review_below", "unsafe_review_below"):
        if key in table:
            changes[key] = _fraction(table[key], f"decision.{key}", allow_off=True)
    for key in ("sample_allowed", "sample_blocked"):
        if key in table:
            changes[key] = _fraction(table[key], f"decision.{key}", allow_off=False)
    if "categories" in table:
        changes["categories"] = {
            **base.categories,
            **_category_actions(table["categories"], codes),
        }
    return replace(base, **changes)


def _category_actions(value: object, codes: tuple[str, ...]) -> dict[str, Action]:
    if not isinstance(value, dict):
        raise ValueError("decision.categories: must be a table of category code = action")
    actions: dict[str, Action] = {}
    for code, action in value.items():
        if code not in codes:
            raise ValueError(
                f"decision.categories.{code}: not an Unsafe category of this policy "
                f"({', '.join(codes)})"
            )
        actions[code] = _action(action, f"decision.categories.{code}")
    return actions


def _action(value: object, key: str) -> Action:
    if value not in ACTIONS:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(ACTIONS)}")
    return value


def _fraction(value: object, key: str, *, allow_off: bool) -> float | None:
    if allow_off and value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        off = " (or false, for no band)" if allow_off else ""
        raise ValueError(f"{key}: {value!r} is not a number in [0, 1]{off}")
    return float(value)
