"""What every guard checks of a `guard` request before any model work.

Shared by the CPU, HF and TensorRT-LLM guards and the benchmark's stand-in (fill.py copies it
next to each model.py): the image and conversation contracts are one, so their checks and
messages are one. numpy only.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

IMAGE_INPUT = "image_bytes_input"


class InvalidRequestError(ValueError):
    """One request cannot be judged as sent: only it fails (INVALID_ARG), never retried."""


def image_from_tensor(tensor: NDArray[Any], max_side: int) -> NDArray[np.uint8]:
    """The one RGB image of a request whose `image_bytes_input` is [1, 1, H, W, 3] UINT8.

    `max_side` bounds the work one request can cause: the engines resize and pad per side.
    """
    shape = list(tensor.shape)
    if tensor.ndim != 5 or shape[:2] != [1, 1] or shape[4] != 3:
        raise InvalidRequestError(f"{IMAGE_INPUT}: expected [1, 1, H, W, 3], got {shape}")
    if tensor.dtype != np.uint8:
        raise InvalidRequestError(f"{IMAGE_INPUT}: expected UINT8, got {tensor.dtype}")
    height, width = shape[2], shape[3]
    if height == 0 or width == 0:
        raise InvalidRequestError(f"{IMAGE_INPUT}: empty image of {width}x{height} pixels")
    if max(height, width) > max_side:
        raise InvalidRequestError(
            f"{IMAGE_INPUT}: {width}x{height} pixels; the longer side exceeds "
            f"max_image_side {max_side}"
        )
    return np.ascontiguousarray(tensor[0, 0])


MESSAGES_INPUT = "messages"
MAX_HISTORY_TURNS = 16
"""Earlier turns one request may carry: eight questions and answers. Each turn costs prompt
tokens on every later request, and `max_input_tokens` (HF) or the engine's input length
(TensorRT-LLM) bounds the rendered whole; this bounds the parsing before any of that."""
MAX_HISTORY_BYTES = 64 * 1024


class Turn(NamedTuple):
    """One earlier turn of a conversation about the request's image: (role, text), the pair
    `guard_answer.conversation` takes."""

    role: str
    """"user" or "assistant"."""
    text: str


def history_from_tensor(tensor: NDArray[Any] | None) -> tuple[Turn, ...]:
    """The conversation before the request's `text_input`, from the optional `messages` input.

    `messages` is one UTF-8 JSON array of {"role": "user"|"assistant", "content": "<text>"},
    starting with the user's first question (the one the image belongs to) and alternating up to
    the guard's latest answer; `text_input` is the question asked now. Absent or `[]`: a
    conversation of one turn, as every request was before conversations existed.
    """
    if tensor is None:
        return ()
    if tensor.size != 1:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}: expected one value, got shape {list(tensor.shape)}"
        )
    raw = tensor.reshape(-1)[0]
    raw = raw if isinstance(raw, bytes) else str(raw).encode()
    if len(raw) > MAX_HISTORY_BYTES:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}: {len(raw)} bytes, over the limit of {MAX_HISTORY_BYTES}"
        )
    try:
        turns = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"{MESSAGES_INPUT}: not UTF-8 JSON: {exc}") from exc
    if not isinstance(turns, list):
        raise InvalidRequestError(f"{MESSAGES_INPUT}: expected a JSON array of turns")
    if len(turns) > MAX_HISTORY_TURNS:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}: {len(turns)} earlier turns, over the limit of "
            f"{MAX_HISTORY_TURNS}; start a new conversation"
        )
    if len(turns) % 2:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}: {len(turns)} turns; the history must end with the guard's answer"
        )
    return tuple(_turn(index, turn) for index, turn in enumerate(turns))


def _turn(index: int, turn: Any) -> Turn:
    role = "user" if index % 2 == 0 else "assistant"
    if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}[{index}]: expected an object with exactly role and content"
        )
    if turn["role"] != role:
        raise InvalidRequestError(
            f"{MESSAGES_INPUT}[{index}]: role must be {role!r} (turns alternate, user first)"
        )
    content = turn["content"]
    if not isinstance(content, str) or not content.strip():
        raise InvalidRequestError(f"{MESSAGES_INPUT}[{index}]: content must be non-empty text")
    return Turn(role, content)
