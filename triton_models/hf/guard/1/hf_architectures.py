"""The architectures the HF guard serves, told apart by the checkpoint's config.json `model_type`.

    llava_onevision  LlavaOnevisionForConditionalGeneration: LlavaGuard-v1.2-{0.5B,7B}-OV-hf
                     (SigLIP, anyres crops, Qwen2)
    llava            LlavaForConditionalGeneration: LLaVA-1.5, e.g. ICM-LLaVA-v1.5-7B once
                     deploy/icm/convert_llava.py has converted it (CLIP ViT-L/14-336, LLaMA)

What differs between them is here: the model class, the processor outputs the model takes and
how they batch (`collate`), whether an image is padded to a square first, and config values to
override after loading.
The prompt, the Triton contract and the rating log-prob are the same for both (hf_guard).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from model_parameters import InvalidSettingsError
from transformers import (
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: type[PreTrainedModel]
    model_inputs: tuple[str, ...]
    """What generate() takes from the processor's output (which may hold more, such as
    token_type_ids, which the models refuse)."""
    pads_to_square: bool = False
    """LLaVA-1.5's image_aspect_ratio "pad": the image is centred on a square of the image
    processor's mean colour before the processor, which would otherwise crop its long side
    (llava/mm_utils.py's expand2square, applied by process_images)."""
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Set on the loaded model's config."""


ARCHITECTURES: Mapping[str, Architecture] = {
    architecture.model_type: architecture
    for architecture in (
        Architecture(
            "llava_onevision",
            LlavaOnevisionForConditionalGeneration,
            ("input_ids", "attention_mask", "pixel_values", "image_sizes"),
        ),
        Architecture(
            "llava",
            LlavaForConditionalGeneration,
            ("input_ids", "attention_mask", "pixel_values"),
            pads_to_square=True,
            # transformers 4.47.1 takes a forward with fewer <image> tokens than
            # image_seq_length for a prompt from an old processor that did not expand <image>.
            # Every decoding step has none, and that "legacy" path rebuilds the attention mask
            # from the KV cache, unmasking the left padding of a batch whenever the pad token's
            # embedding is not zero (as after the conversion). Our processors always expand
            # <image>; 0 turns the guess off.
            config_overrides={"image_seq_length": 0},
        ),
    )
}


def architecture_of(checkpoint: Path) -> Architecture:
    """The architecture config.json names, or InvalidSettingsError saying what is served."""
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSettingsError(f"checkpoint: cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidSettingsError(f"checkpoint: {path} is not a JSON object")
    # The original LLaVA format calls itself "llava" too; transformers would load it with
    # default towers and random weights where the names do not match.
    architectures = config.get("architectures") or []
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in architectures:
        raise InvalidSettingsError(
            f"checkpoint: {checkpoint} is in haotian-liu/LLaVA's original format "
            "(LlavaLlamaForCausalLM); convert it with deploy/icm/convert_llava.py"
        )
    model_type = config.get("model_type")
    architecture = ARCHITECTURES.get(str(model_type))
    if architecture is None:
        served = ", ".join(
            f"{a.model_type} ({a.model_class.__name__})" for a in ARCHITECTURES.values()
        )
        raise InvalidSettingsError(
            f"checkpoint: {path} has model_type {model_type!r}; the HF guard serves {served}"
        )
    return architecture


def collate(features: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch the processor outputs of single requests as the processor batches several:
    prompts padded on the left (generation continues on the right); LLaVA-OneVision's image
    crops, pixel_values [1, crops, 3, H, W], padded with zeros up to the largest crop count (the
    model reads the real count from image_sizes); LLaVA-1.5's one image, [1, 3, H, W] at the
    processor's fixed size, and any other input (image_sizes) stacked as they are."""
    length = max(item["input_ids"].shape[1] for item in features)
    crops = max(item["pixel_values"].shape[1] for item in features)

    def left_pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (length - tensor.shape[1], 0), value=value)

    def pad_crops(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 5:
            return pixels
        return torch.nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, crops - pixels.shape[1]))

    padded = {
        "input_ids": torch.cat([left_pad(item["input_ids"], pad_id) for item in features]),
        "attention_mask": torch.cat([left_pad(item["attention_mask"], 0) for item in features]),
        "pixel_values": torch.cat([pad_crops(item["pixel_values"]) for item in features]),
    }
    stacked = {
        name: torch.cat([item[name] for item in features])
        for name in features[0]
        if name not in padded
    }
    return {**padded, **stacked}
