"""The engine limits a LlavaGuard-OV or LLaVA-1.5 build needs, from the checkpoint's processor.

    python deploy/trtllm/limits.py --hf-dir HF --policy service/policies/llavaguard-v1.2.toml \\
        --max-image-side 1024 --max-batch-size 16 --max-new-tokens 500

prints shell assignments (for build.sh to `eval`) and, on stderr, how they were found:

    MAX_IMAGE_TOKENS     the most tokens an image of at most max-image-side pixels becomes
    MAX_PATCHES          the most patches such an image is cut into (LLaVA-OneVision: the base
                         384x384 patch + the anyres grid; LLaVA-1.5: 1)
    PROMPT_TOKENS        the chat template and the policy text, without the image
    MAX_INPUT_LEN        PROMPT_TOKENS + MAX_IMAGE_TOKENS + headroom (a longer policy, a template
                         change), rounded up to a multiple of 64
    MAX_SEQ_LEN          MAX_INPUT_LEN + max-new-tokens
    MAX_MULTIMODAL_LEN   max-batch-size * MAX_IMAGE_TOKENS: the prompt-table rows of a full
                         in-flight batch (trtllm-build --max_multimodal_len)
    HIDDEN_SIZE          the language model's hidden size (one table row is that many FP16s)
    PROMPT_TABLE_BYTES   a full batch's prompt tables, MAX_MULTIMODAL_LEN x HIDDEN_SIZE x 2 B:
                         they pass from the vision encoder to the engine through tritonserver's
                         CUDA memory pool, and stay there while their requests generate

An image's token count depends on its size: LLaVA-OneVision picks an anyres grid (up to 6x6
crops of 384 px), unpads it to the image's aspect ratio, scales it down past anyres_max_9 and adds
a newline embedding per row. The processor computes it (the same function that expands `<image>`
in every request); here it is evaluated on every size up to the side, in steps of 4 px, and on the
largest size of each grid's own aspect ratio, where the count peaks.

LLaVA-1.5 (a processor without grid pinpoints: CLIP's resize and centre crop) makes every image
one crop_size patch, (336 / 14)^2 = 576 tokens for ICM-LLaVA-v1.5-7B whatever its size; the
processor is run on a few sizes, which must agree. TensorRT-LLM's llava vision engine drops
CLIP's class token (`tensorrt_llm/tools/multimodal_builder.py`, build_llava_engine,
`hidden_states[feature_layer][:, 1:]`, read at commit 000a01d), so the processor must expand
`<image>` with the "default" strategy (576, not 577 tokens) and must expand it at all
(`patch_size` set: transformers 4.47's LlavaProcessor otherwise leaves one `<image>` token).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STEP = 4
ALIGN = 64


@dataclass(frozen=True)
class Limits:
    max_image_tokens: int
    largest_image: tuple[int, int]
    max_patches: int
    prompt_tokens: int
    max_input_len: int
    max_seq_len: int
    max_multimodal_len: int

    def shell(self) -> str:
        return "\n".join(
            f"{name.upper()}={value}"
            for name, value in [
                ("max_image_tokens", self.max_image_tokens),
                ("max_patches", self.max_patches),
                ("prompt_tokens", self.prompt_tokens),
                ("max_input_len", self.max_input_len),
                ("max_seq_len", self.max_seq_len),
                ("max_multimodal_len", self.max_multimodal_len),
            ]
        )


def candidate_sizes(max_side: int, pinpoints: Sequence[Sequence[int]]) -> Iterator[tuple[int, int]]:
    """(height, width) pairs up to max_side: a 4-px lattice, the full-side borders, and for
    each grid pinpoint the largest image of its aspect ratio that fits."""
    lattice = [*range(STEP, max_side + 1, STEP), max_side]
    for height in lattice:
        for width in lattice:
            yield height, width
    for side in range(1, max_side + 1):
        yield side, max_side
        yield max_side, side
    for pin_height, pin_width in pinpoints:
        scale = max_side / max(pin_height, pin_width)
        yield max(1, int(pin_height * scale)), max(1, int(pin_width * scale))


def image_tokens(processor: Any, height: int, width: int) -> int:
    """Tokens the processor expands `<image>` into for an image of height x width pixels.

    transformers' LlavaOnevisionProcessor computes it in `_get_number_of_features` (the function
    its __call__ uses); should a release drop that, the processor is run on a blank image.
    """
    size = processor.image_processor.size
    patch = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    if hasattr(processor, "_get_number_of_features"):
        count: int = processor._get_number_of_features(height, width, *patch)
        if processor.vision_feature_select_strategy == "default":
            count -= 1
        return count
    import numpy as np

    ids = processor(
        images=np.zeros((height, width, 3), np.uint8),
        text=processor.image_token,
        input_data_format="channels_last",  # an image 1 or 3 pixels high is not channels-first
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(1 for i in ids["input_ids"][0] if i == image_id)


def patches(processor: Any, height: int, width: int) -> int:
    from transformers.image_processing_utils import select_best_resolution

    size = processor.image_processor.size
    patch = size["height"] if "height" in size else size["shortest_edge"]
    best_height, best_width = select_best_resolution(
        [height, width], processor.image_processor.image_grid_pinpoints
    )
    return (best_height // patch) * (best_width // patch) + 1


def prompt_tokens(processor: Any, prompt: str) -> int:
    """Tokens of the rendered chat template around the policy, `<image>` not counted, with the
    special tokens the tokenizer adds as the processor calls it (LLaMA's leading `<s>`; Qwen2
    adds none): what the guard sends besides the image."""
    from triton_models.common.guard_answer import conversation

    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True)
    ids = processor.tokenizer(text)["input_ids"]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(1 for i in ids if i != image_id)


def one_patch_sizes(processor: Any, max_side: int) -> list[tuple[int, int]]:
    """Sizes to probe a LLaVA-1.5 processor with (each image becomes one crop): the crop itself,
    the largest square, and the longest wide and tall images of twice the aspect."""
    crop = processor.image_processor.crop_size
    half = max(1, max_side // 2)
    return [
        (crop["height"], crop["width"]),
        (max_side, max_side),
        (half, max_side),
        (max_side, half),
    ]


def check_one_patch_processor(processor: Any, counts: dict[tuple[int, int], int]) -> None:
    """A LLaVA-1.5 processor must expand `<image>` into the features the llava engine returns."""
    if getattr(processor, "patch_size", None) is None:
        raise ValueError(
            "the processor does not expand <image> (processor_config.json has no patch_size / "
            "vision_feature_select_strategy): the prompt would hold one image token for "
            "hundreds of features"
        )
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy is {strategy!r}: TensorRT-LLM's llava vision engine "
            "drops the class token, so only 'default' matches its features"
        )
    if len(set(counts.values())) != 1:
        raise ValueError(f"a one-patch processor gave different token counts: {counts}")


def compute(
    processor: Any,
    prompt: str,
    *,
    max_image_side: int,
    max_batch_size: int,
    max_new_tokens: int,
    headroom: int,
) -> Limits:
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        sizes = set(candidate_sizes(max_image_side, pinpoints))
    else:
        sizes = set(one_patch_sizes(processor, max_image_side))
    counts = {size: image_tokens(processor, *size) for size in sizes}
    if pinpoints:
        most_patches = max(patches(processor, *size) for size in counts)
    else:
        check_one_patch_processor(processor, counts)
        most_patches = 1
    largest = max(counts, key=lambda size: (counts[size], size))
    text = prompt_tokens(processor, prompt)
    max_input_len = -(-(text + counts[largest] + headroom) // ALIGN) * ALIGN
    return Limits(
        max_image_tokens=counts[largest],
        largest_image=largest,
        max_patches=most_patches,
        prompt_tokens=text,
        max_input_len=max_input_len,
        max_seq_len=max_input_len + max_new_tokens,
        max_multimodal_len=max_batch_size * counts[largest],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, required=True, help="the -hf checkpoint")
    parser.add_argument("--policy", type=Path, required=True, help="a service/policies/*.toml")
    parser.add_argument("--max-image-side", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--headroom", type=int, default=512, help="spare prompt tokens")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from transformers import AutoProcessor

    from service.core.policies import PolicyRegistry

    processor = AutoProcessor.from_pretrained(str(args.hf_dir))
    prompt = PolicyRegistry.policy_in(args.policy).render_prompt()
    try:
        limits = compute(
            processor,
            prompt,
            max_image_side=args.max_image_side,
            max_batch_size=args.max_batch_size,
            max_new_tokens=args.max_new_tokens,
            headroom=args.headroom,
        )
    except ValueError as exc:
        print(f"limits: {args.hf_dir}: {exc}", file=sys.stderr)
        return 2
    height, width = limits.largest_image
    print(
        f"limits: an image of at most {args.max_image_side} px is at most "
        f"{limits.max_image_tokens} tokens ({width}x{height} px) and {limits.max_patches} "
        f"patches; the policy and template are {limits.prompt_tokens} tokens",
        file=sys.stderr,
    )
    from transformers import AutoConfig

    hidden = int(AutoConfig.from_pretrained(str(args.hf_dir)).text_config.hidden_size)
    print(limits.shell())
    print(f"HIDDEN_SIZE={hidden}")
    print(f"PROMPT_TABLE_BYTES={limits.max_multimodal_len * hidden * 2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
