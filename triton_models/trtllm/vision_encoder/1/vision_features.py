"""From an image's patches to its rows of the prompt-embedding table, without Triton.

The vision engine (built by `tensorrt_llm.tools.multimodal_builder`, `--model_type
llava_onevision` or `llava`) maps each patch to its projected features: [patches, 729, hidden]
for SigLIP-so400m's 384x384 patches, [1, 576, hidden] for LLaVA-1.5's one 336x336 CLIP crop (the
class token already dropped by the engine). What the HF model does next is re-done here, in
torch, on the engine's output:

    llava_onevision   LLaVA-OneVision's anyres packing (LlavaOnevisionForConditionalGeneration
                      .pack_image_features): the base patch's features as they are, then the
                      grid's features laid out as one picture, the padding the processor added
                      cut off, scaled down bilinearly when larger than anyres_max_N base
                      patches, with the `image_newline` embedding after each row.
    llava             LLaVA-1.5: one patch, its features as they are.

    layouts        model type -> Layout: an image's patch count from its size, and its packing
    run_batched    patches of many requests -> engine runs of at most the engine's batch size
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ImageSize = tuple[int, int]
"""(height, width) of the image before preprocessing, as the processor's `image_sizes` says."""


@dataclass(frozen=True)
class Layout:
    """How one model type turns an image's patches into table rows."""

    patch_count: Callable[[ImageSize], int]
    pack: Callable[[torch.Tensor, ImageSize], torch.Tensor]


def run_batched(
    patches: Sequence[torch.Tensor], run: Callable[[torch.Tensor], torch.Tensor], max_batch: int
) -> list[torch.Tensor]:
    """Every request's patches through `run` in batches of at most `max_batch` patches.

    `patches[i]` is [n_i, 3, H, W]; the result's i-th element is run's output for those n_i
    patches, [n_i, ...]. Patches of several requests share a run; one request's patches may be
    split over two runs.
    """
    if max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    counts = [int(p.shape[0]) for p in patches]
    if not counts or sum(counts) == 0:
        return [p[:0] for p in patches]
    everything = torch.cat(list(patches), dim=0)
    outputs = [
        run(everything[start : start + max_batch]) for start in range(0, len(everything), max_batch)
    ]
    return list(torch.split(torch.cat(outputs, dim=0), counts, dim=0))


def pack_llava(features: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """LLaVA-1.5: one patch, [1, tokens, hidden] -> [tokens, hidden]."""
    if features.shape[0] != 1:
        raise ValueError(f"llava: expected one patch per image, got {features.shape[0]}")
    return features[0]


LLAVA = Layout(patch_count=lambda image_size: 1, pack=pack_llava)


def onevision_layout(config: Any, image_newline: torch.Tensor) -> Layout:
    """LLaVA-OneVision's layout for the checkpoint's `config` and `image_newline` [hidden]."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    side = config.vision_config.image_size // config.vision_config.patch_size
    aspect = str(config.vision_aspect_ratio)
    if not aspect.startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio {aspect!r}: only anyres_max_N is supported")
    max_base_patches = int(aspect.removeprefix("anyres_max_"))

    def patch_count(image_size: ImageSize) -> int:
        return int(
            image_size_to_num_patches(
                image_size=image_size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
        )

    def pack(features: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
        base = features[0]
        if base.shape[0] != side * side:
            raise ValueError(
                f"llava_onevision: {base.shape[0]} features per patch, expected {side}x{side}"
            )
        newline = image_newline.to(device=features.device, dtype=features.dtype)
        if features.shape[0] == 1:
            return torch.cat((base, newline[None]), dim=0)
        rows, columns = get_anyres_image_grid_shape(
            image_size,
            config.image_grid_pinpoints,
            config.vision_config.image_size,
        )
        grid = features[1:]
        if grid.shape[0] != rows * columns:
            raise ValueError(
                f"llava_onevision: {grid.shape[0]} grid patches for a {rows}x{columns} grid"
            )
        hidden = grid.shape[-1]
        # [rows, columns, side, side, hidden] -> one [hidden, rows*side, columns*side] picture.
        picture = (
            grid.reshape(rows, columns, side, side, hidden)
            .permute(4, 0, 2, 1, 3)
            .reshape(hidden, rows * side, columns * side)
        )
        picture = unpad_image(picture, image_size)
        height, width = picture.shape[1:]
        ratio = math.sqrt(height * width / (max_base_patches * side * side))
        if ratio > 1.1:
            picture = torch.nn.functional.interpolate(
                picture[None], [int(height // ratio), int(width // ratio)], mode="bilinear"
            )[0]
        picture = torch.cat(
            (picture, newline[:, None, None].expand(hidden, picture.shape[1], 1)), dim=-1
        )
        return torch.cat((base, picture.flatten(1, 2).transpose(0, 1)), dim=0)

    return Layout(patch_count=patch_count, pack=pack)


def layouts(config: Any, image_newline: torch.Tensor | None) -> Mapping[str, Layout]:
    """The layouts this checkpoint can use, by the vision engine's model type."""
    table = {"llava": LLAVA}
    if image_newline is not None:
        table["llava_onevision"] = onevision_layout(config, image_newline)
    return table
