"""The guard model as the pipeline sees it: ask about one image, get its answer and who gave it.

`service.adapters.triton.GuardClient` is the implementation that talks to Triton; tests use
fakes of `Guard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ServedModel:
    """What the server says of the model behind the name (Triton: its metadata and config)."""

    outputs: tuple[str, ...]
    name: str | None = None
    """The guard model's own name (`guard_model_name` parameter), when the config names it."""
    version: str | None = None
    inputs: tuple[str, ...] = ()
    """The inputs the model declares: `messages` when it can hold a conversation."""
    triton_version: str | None = None
    """The version of the Triton model that answers: the one asked for, else the newest."""


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation with the guard about one image."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class GuardReply:
    text: str
    model_name: str
    model_version: str
    rating_log_prob: float | None = None
    """Natural log of the probability of the answer given, at the token that decided it, when the
    model says: over the vocabulary for LlavaGuard's rating, over Yes and No for a Yes/No
    answer (ICM-Assistant's P(Yes) / (P(Yes) + P(No)), or its complement for No)."""
    served: ServedModel | None = None


class Guard(Protocol):
    async def ask(
        self,
        prompt: str,
        pixels: npt.NDArray[np.uint8],
        headers: Mapping[str, str] | None = None,
    ) -> GuardReply:
        """One answer about one (H, W, 3) RGB image; `headers` carry the trace context."""
        ...
