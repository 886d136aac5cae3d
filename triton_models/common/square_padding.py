"""LLaVA-1.5's padding of an image to a square, before its processor: shared by the HF guard
and the TensorRT-LLM guard, which must prepare ICM-LLaVA's images alike. numpy only.

LLaVA-1.5 was trained and evaluated on images padded so (haotian-liu/LLaVA `llava/mm_utils.py`,
`expand2square` under `image_aspect_ratio == "pad"`, read at commit 0f2e215): the image centred
on a square of the image processor's mean colour, then resized and centre-cropped, which keeps
the whole image. Without the padding, transformers' CLIPImageProcessor would crop the longer
side away.

Standard library and numpy only, so that the tests import it as `triton_models.common`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def pad_to_square(image: NDArray[np.uint8], fill_rgb: tuple[int, int, int]) -> NDArray[np.uint8]:
    """The [H, W, 3] image centred on a square of `fill_rgb`, its side the longer one; the odd
    pixel of an uneven margin goes after the image, as PIL's paste at (side - length) // 2 puts
    it. A square image is returned as it is."""
    height, width = int(image.shape[0]), int(image.shape[1])
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[...] = np.asarray(fill_rgb, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    return square


def mean_fill_rgb(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The padding colour: the image processor's mean, times 255, truncated
    (`tuple(int(x * 255) for x in image_processor.image_mean)`); CLIP's mean gives
    (122, 116, 104)."""
    if len(image_mean) != 3:
        raise ValueError(f"image processor: image_mean {list(image_mean)} is not RGB")
    red, green, blue = (int(channel * 255) for channel in image_mean)
    return red, green, blue
