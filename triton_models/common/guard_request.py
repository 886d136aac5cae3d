"""What every guard checks of a `guard` request before any model work.

Shared by the CPU, HF and TensorRT-LLM guards and the benchmark's stand-in (fill.py copies it
next to each model.py): the image contract is one, so its checks and messages are one. numpy only.
"""

from __future__ import annotations

from typing import Any

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
