"""Convert an original LLaVA-1.5 checkpoint into transformers' LLaVA, which the HF guard serves.

    python deploy/icm/convert_llava.py --original DIR --vision-tower DIR --out DIR

ICM-Assistant's model, ICM-LLaVA-v1.5-7B, is published as haotian-liu/LLaVA writes checkpoints:
`LlavaLlamaForCausalLM` (config.json with model_type "llava" and the mm_* keys; weights
`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`, `model.mm_projector.0/.2`)
without its vision tower, which LLaVA loads from the CLIP model `mm_vision_tower` names. The HF
guard (triton_models/hf) loads transformers' `LlavaForConditionalGeneration` instead. Both
directories are local (nothing is downloaded); the real run gives snapshots of:

    --original      zhaoyuzhi/ICM-LLaVA-v1.5-7B
    --vision-tower  openai/clip-vit-large-patch14-336

What is written, laid out as transformers' own convert_llava_weights_to_hf.py lays out
llava-hf/llava-1.5-7b-hf (read in transformers 4.47.1; this is our code, not a copy):

- weights, in the original's dtype: `model.mm_projector.0/.2` -> `multi_modal_projector.linear_1/
  _2`, `model.*` -> `language_model.model.*`, `lm_head` -> `language_model.lm_head`, and the
  tower's `vision_model.*` -> `vision_tower.vision_model.*`.
- config: the LLaMA keys of config.json as the text config, the tower's as the vision config,
  `vision_feature_layer` = mm_vision_select_layer, feature `patch` -> strategy "default" (CLS
  dropped), `image_seq_length` = the tower's patch count.
- tokenizer: `<image>` (special) and `<pad>` added after the vocabulary (32000 and 32001 for
  LLaMA); the embedding and lm_head matrices grow by those rows, each the mean of the old rows
  (transformers' script draws them near that mean instead). The embedding rows are never read
  (image features replace `<image>`, padding is masked); the lm_head rows give both tokens an
  average logit.
- processor: the tower's CLIPImageProcessor, the tokenizer, LLaVA's llava_v1 conversation as
  the chat template (CHAT_TEMPLATE), and patch_size and the strategy, so that `<image>` expands
  to the tower's 576 features.
- generation_config.json: bos, eos (`</s>`, 2) and pad from the tokenizer.

Refused, saying why: an architecture other than LlavaLlamaForCausalLM, a projector other than
mlp2x_gelu, image start/end tokens, an image_aspect_ratio other than pad (the HF guard pads
every image to a square as LLaVA-1.5 does), patch merging, vision-tower weights inside the
checkpoint (an unfrozen tower), a tower whose width is not mm_hidden_size.

Needs torch, transformers and safetensors (the hf-guard extra). Not verified on the real
checkpoint (no hub access where this was written): LLaVA saves LLaMA's slow tokenizer
(tokenizer.model); transformers turns it into the fast tokenizer.json, which needs the
sentencepiece and protobuf packages at conversion time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
        PreTrainedTokenizerBase,
    )

# torch and transformers are imported where they are used: `--help`, and the tests that only
# need CHAT_TEMPLATE, cost nothing.

# haotian-liu/LLaVA llava/conversation.py at c121f0432da27facab705978f83c4ada465e46fd (last
# changed by 806cfe03, 2024-02-02): `conv_llava_v1`, the "llava_v1" conversation, which
# ICM-Assistant's LLaVA inference uses (inference/MLLM_inference_bylist_LLaVA/inference_llava.py
# and, spelled out, eval/eval_sexy_accuracy/eval_data_generation/LLaVA/sexy_level_bylist.py at
# b0ab3025). Separator style TWO: the system, " ", then "USER: <text> " and "ASSISTANT: <text></s>"
# per turn, "ASSISTANT:" to ask for the answer; the image placeholder and a newline start the
# text of the turn that holds the image. LLaVA's fine-tuning (`--version v1`) used
# `conv_vicuna_v1`, which differs only in the system text ("user" for "human").
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATE = (
    "{% macro text(message) %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if not loop.first %} {% endif %}{{ item['text'] }}{% endfor %}{% endif %}{% endmacro %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ text(messages[0]) }}"
    '{% set turns = messages[1:] %}{% else %}{{ "' + LLAVA_V1_SYSTEM + '" }}'
    "{% set turns = messages %}{% endif %}{{ ' ' }}"
    "{% for message in turns %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is not string %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '" + IMAGE_TOKEN + "\\n' }}{% endfor %}{% endif %}{{ text(message) + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + text(message) + '</s>' }}"
    "{% else %}{{ raise_exception('llava_v1 has user and assistant turns, and a system one "
    "first, not ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

ARCHITECTURE = "LlavaLlamaForCausalLM"
PROJECTOR = "mlp2x_gelu"
# mm_vision_select_feature -> LlavaConfig.vision_feature_select_strategy.
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
# Keys of LLaVA's config.json that are not LLaMA's (the mm_* keys aside).
_LLAVA_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "_name_or_path",
        "image_aspect_ratio",
        "image_grid_pinpoints",
        "freeze_mm_mlp_adapter",
        "freeze_mm_vision_resampler",
        "tune_mm_mlp_adapter",
        "tune_mm_vision_resampler",
        "unfreeze_mm_vision_tower",
        "use_mm_proj",
        "tokenizer_model_max_length",
        "tokenizer_padding_side",
    }
)
_RENAMES = (
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_VISION_TOWER_PREFIX = "model.vision_tower."


class ConversionError(ValueError):
    """The checkpoint is not one this converts; the message says why."""


def read_original_config(original: Path) -> dict[str, Any]:
    """config.json of an original LLaVA-1.5 checkpoint, refused unless this converts it."""
    path = original / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: {exc}") from exc
    checks = [
        ("architectures", config.get("architectures"), [ARCHITECTURE]),
        ("mm_projector_type", config.get("mm_projector_type"), PROJECTOR),
        ("mm_use_im_start_end", config.get("mm_use_im_start_end", False), False),
        ("image_aspect_ratio", config.get("image_aspect_ratio"), "pad"),
        ("mm_patch_merge_type", config.get("mm_patch_merge_type", "flat"), "flat"),
    ]
    for key, found, supported in checks:
        if found != supported:
            raise ConversionError(
                f"{path}: {key} is {found!r}; this converts LLaVA-1.5 checkpoints with "
                f"{key} {supported!r} only"
            )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_STRATEGIES:
        raise ConversionError(
            f"{path}: mm_vision_select_feature is {feature!r}, not one of "
            f"{', '.join(SELECT_STRATEGIES)}"
        )
    for key in ("mm_hidden_size", "mm_vision_select_layer"):
        if not isinstance(config.get(key), int):
            raise ConversionError(f"{path}: {key} is missing or not an integer")
    return config


def text_config_values(original: Mapping[str, Any]) -> dict[str, Any]:
    """The LLaMA part of LLaVA's config.json (LLaVA's config class extends LLaMA's)."""
    return {
        key: value
        for key, value in original.items()
        if key not in _LLAVA_KEYS and not key.startswith("mm_")
    }


def load_original_weights(original: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's *.safetensors, else its pytorch_model*.bin shards."""
    import torch
    from safetensors.torch import load_file

    files = sorted(original.glob("*.safetensors")) or sorted(original.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{original}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


def hf_weights(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original weights under transformers' names (the vision tower is not among them)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        # Rotary tables, which transformers before 4.31 saved; transformers recomputes them.
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        if key.startswith(_VISION_TOWER_PREFIX):
            raise ConversionError(
                f"the checkpoint holds vision-tower weights ({key}): its tower was trained "
                "(unfreeze_mm_vision_tower), which this does not convert"
            )
        new = next((new + key[len(old) :] for old, new in _RENAMES if key.startswith(old)), None)
        if new is None:
            raise ConversionError(f"unexpected weight {key} in the original checkpoint")
        renamed[new] = tensor
    return renamed


def add_llava_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add `<image>` and `<pad>` after the vocabulary, as llava-hf's checkpoints have them; their
    ids (32000 and 32001 for LLaMA)."""
    from transformers import AddedToken

    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConversionError(f"the tokenizer already has {IMAGE_TOKEN}")
    tokenizer.add_tokens(
        [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return (
        int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
        int(tokenizer.convert_tokens_to_ids(PAD_TOKEN)),
    )


def llava_processor(
    image_processor: CLIPImageProcessor,
    tokenizer: PreTrainedTokenizerBase,
    vision: CLIPVisionConfig,
    strategy: str,
) -> LlavaProcessor:
    """LLaVA-1.5's processor: `<image>` expands to one token per feature the model splices in."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )


def llava_config(
    vision: CLIPVisionConfig,
    text: LlamaConfig,
    *,
    image_token_id: int,
    select_layer: int,
    strategy: str,
) -> LlavaConfig:
    """LLaVA-1.5's config around its two towers: the features of `select_layer`, CLS dropped
    ("default") or kept ("full"), through the 2-layer GELU projector."""
    from transformers import LlavaConfig

    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=strategy,
        # Below this many <image> tokens transformers 4.47 takes the processor for an old one
        # that did not expand <image>, and expands it itself.
        image_seq_length=patches + (1 if strategy == "full" else 0),
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU, Linear
        pad_token_id=text.pad_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        torch_dtype=text.torch_dtype,
    )


def convert(original: Path, vision_tower: Path, out: Path) -> Path:
    """Write the transformers checkpoint of `original`, with `vision_tower`'s tower, to `out`."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        GenerationConfig,
        LlamaConfig,
        LlavaForConditionalGeneration,
    )

    if out.exists():
        raise ConversionError(f"{out} exists")
    values = read_original_config(original)
    text_values = text_config_values(values)
    dtype = getattr(torch, str(text_values.get("torch_dtype") or "float32"))
    tokenizer = AutoTokenizer.from_pretrained(original, use_fast=True, local_files_only=True)
    # The new tokens take the ids after the vocabulary, which must be the weights' rows.
    if len(tokenizer) != text_values.get("vocab_size"):
        raise ConversionError(
            f"{original}: the tokenizer has {len(tokenizer)} tokens, config.json's vocab_size "
            f"is {text_values.get('vocab_size')}"
        )
    image_id, pad_id = add_llava_tokens(tokenizer)
    tower = CLIPVisionModel.from_pretrained(vision_tower, torch_dtype=dtype, local_files_only=True)
    vision = tower.config
    if vision.hidden_size != values["mm_hidden_size"]:
        raise ConversionError(
            f"{vision_tower}: the tower's hidden size is {vision.hidden_size}, the checkpoint's "
            f"mm_hidden_size {values['mm_hidden_size']}"
        )
    image_processor = CLIPImageProcessor.from_pretrained(vision_tower, local_files_only=True)
    crop = image_processor.crop_size
    if (crop["height"], crop["width"]) != (vision.image_size, vision.image_size):
        raise ConversionError(
            f"{vision_tower}: the image processor crops to {crop}, the tower takes "
            f"{vision.image_size}x{vision.image_size}"
        )
    strategy = SELECT_STRATEGIES[values.get("mm_vision_select_feature", "patch")]

    weights = hf_weights(load_original_weights(original))
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if name in weights:
            weights[name] = grown(weights[name], len(tokenizer))
    weights.update({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})

    text = LlamaConfig(
        **{
            **text_values,
            "vocab_size": len(tokenizer),
            "pad_token_id": pad_id,
            "torch_dtype": dtype,
        }
    )
    config = llava_config(
        vision,
        text,
        image_token_id=image_id,
        select_layer=values["mm_vision_select_layer"],
        strategy=strategy,
    )
    # On the meta device: the weights are assigned, not initialised first (for 7B that would
    # take minutes, and a second copy of the weights in memory).
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [name for name in missing if not (text.tie_word_embeddings and "lm_head" in name)]
    if missing or unexpected:
        raise ConversionError(
            f"the weights do not fit LLaVA-1.5: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    model.save_pretrained(out)
    llava_processor(image_processor, tokenizer, vision, strategy).save_pretrained(out)
    return out


def grown(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """`matrix` with rows appended up to `rows`, each the mean of the existing ones."""
    import torch

    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--original", type=Path, required=True, help="original LLaVA checkpoint")
    parser.add_argument("--vision-tower", type=Path, required=True, help="CLIP vision tower")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new)")
    args = parser.parse_args(argv)
    try:
        convert(args.original, args.vision_tower, args.out)
    except (ConversionError, OSError) as exc:
        print(f"convert_llava: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
