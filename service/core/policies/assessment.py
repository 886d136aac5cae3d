"""What a guard's answer states, as both answer readers return it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.core.policies.policy import Category


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced an answer, when the answer says so."""

    name: str
    version: str


@dataclass(frozen=True)
class Assessment:
    """The guard's verdict as the answer states it.

    `rating` and `category` are kept exactly as the model gave them, even when they disagree
    (a "Safe" rating with category O4): reconciling them would be inventing a verdict.
    """

    rating: Literal["Safe", "Unsafe"]
    category: Category
    rationale: str
    model: ModelIdentity | None


def quoted(value: object) -> str:
    """`value` as a rejection message quotes it: its repr, cut to 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."
