"""Tiny LLaVA-1.5 checkpoints of ICM-LLaVA-v1.5-7B's architecture, built at test time.

ICM-Assistant's model is LLaVA-1.5: a CLIP ViT-L/14-336 vision tower, its second-to-last layer's
patch features (CLS dropped) through the 2-layer GELU projector, a LLaMA (Vicuna-7B) text
tower, images padded to a square with the image processor's mean colour, and LLaVA's llava_v1
conversation. No hub is reachable here, so the HF guard and the conversion are tested on
checkpoints built from the same classes, files and formats, at a tiny size:

- `build`: transformers' format, what deploy/icm/convert_llava.py writes and the HF guard
  loads. `LlavaForConditionalGeneration` with a CLIP vision tower (28 pixels, patch 14: 4
  image features instead of 576; hidden size 32, 2 layers) and a LLaMA text tower (hidden size
  32, 2 layers); `LlavaProcessor` with a `CLIPImageProcessor` (shortest side resized to 28,
  centre crop, CLIP's mean and std) and a LLaMA-style fast tokenizer (below). The processor,
  the `<image>` and `<pad>` tokens, the config and the chat template come from the
  conversion module's own functions, so the two cannot drift apart.
- `build_original` and `build_vision_tower`: the same tiny model as haotian-liu/LLaVA saves it
  (LLaMA's weight names plus `model.mm_projector.*`, config.json with the mm_* keys, the slow
  checkpoint's shard names) and, apart, the CLIP tower it names, which the conversion reads.

The tokenizer is LLaMA's layout rebuilt with the `tokenizers` library: a BPE vocabulary trained
here on ICM-Assistant's policy text with SentencePiece's word marker `▁` (Metaspace), ids
`<unk>` 0, `<s>` 1, `</s>` 2, a leading `<s>` on every encoding, `</s>` ending answers. After
"ASSISTANT:" the model writes `▁Yes` or `▁No`, as LLaMA's tokens 3869 and 1939 are.

Two variants of `build`:

- `random`: seeded random weights (wide, so that they write varied text).
- `yes-no`: tiny_llava's bigram construction (`script_bigrams`) writing ICM-Assistant's answer:
  `▁Yes` with probability tiny_llava.YES_NO_PROBABILITIES["Yes"], `▁No` with ["No"], a third
  token with the rest, each answer then going on with its explanation (YES_NO_ANSWERS, one
  added token) and `</s>`.
"""

from __future__ import annotations

import importlib.util
import json
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from service.core.policies import PolicyRegistry
from tests.support import tiny_llava
from tests.support.tiny_llava import (
    SCRIPTED_RIVAL,
    YES_NO_ANSWERS,
    fill_hf_repository,
    served,
    token_id,
)

if TYPE_CHECKING:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaTokenizerFast,
        LlavaProcessor,
    )

__all__ = [
    "CONVERTER",
    "IMAGE_SIZE",
    "build",
    "build_original",
    "build_vision_tower",
    "converter",
    "fill_hf_repository",
    "served",
    "token_id",
]

CONVERTER = Path(__file__).resolve().parents[2] / "deploy" / "icm" / "convert_llava.py"
IMAGE_SIZE, PATCH_SIZE = 28, 14
IMAGE_FEATURES = (IMAGE_SIZE // PATCH_SIZE) ** 2
SELECT_LAYER = -2
END_TOKEN = "</s>"
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in LLaMA

Variant = Literal["random", "yes-no"]


def converter() -> ModuleType:
    """deploy/icm/convert_llava.py (deploy/ is not a package: loaded by path, once)."""
    name = "convert_llava"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, CONVERTER)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def build(directory: Path, variant: Variant = "random") -> Path:
    """Write the checkpoint in transformers' format (model, processor, tokenizer, chat
    template, generation config) into `directory`."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    convert = converter()
    tokenizer = base_tokenizer()
    image_id, pad_id = convert.add_llava_tokens(tokenizer)
    if variant == "yes-no":
        # Normal tokens after LLaVA's: decoding with skip_special_tokens keeps them. `▁Yes` and
        # `▁No` are the vocabulary's own.
        explanations = [piece for _, *rest in YES_NO_ANSWERS.values() for piece in rest]
        tokenizer.add_tokens([*explanations, SCRIPTED_RIVAL])
    vision = vision_config()
    processor: LlavaProcessor = convert.llava_processor(
        image_processor(), tokenizer, vision, "default"
    )
    config = convert.llava_config(
        vision,
        text_config(len(tokenizer), pad_id),
        image_token_id=image_id,
        select_layer=SELECT_LAYER,
        strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # <image> and <pad> as the conversion writes them, the mean of the rows before: a pad
        # embedding that is not zero, as in converted checkpoints (see hf_architectures).
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[: pad_id + 1] = convert.grown(matrix[:image_id], pad_id + 1)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    if variant == "yes-no":
        steps = tiny_llava.yes_no_steps(
            tokenizer, tiny_llava.last_prompt_token(processor), END_TOKEN
        )
        with torch.no_grad():
            tiny_llava.script_bigrams(model.language_model, steps)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_vision_tower(directory: Path) -> Path:
    """The CLIP vision tower LLaVA loads apart from its checkpoint, with its image processor,
    as `CLIPVisionModel.save_pretrained` writes it."""
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    CLIPVisionModel(vision_config()).save_pretrained(directory)
    image_processor().save_pretrained(directory)
    return directory


def build_original(directory: Path, **config_overrides: Any) -> Path:
    """The tiny model as haotian-liu/LLaVA saves LLaVA-1.5 (`LlavaLlamaForCausalLM`): LLaMA's
    weights under their own names plus `model.mm_projector.{0,2}`, in two pytorch_model-*.bin
    shards, config.json with the mm_* keys (`config_overrides` replace keys), and the tokenizer
    without `<image>`, its pad token `<unk>` as LLaVA's training sets it."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = base_tokenizer()
    text = text_config(len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(2)
    state = LlamaForCausalLM(text).state_dict()
    mm_hidden = vision_config().hidden_size
    state |= {
        "model.mm_projector.0.weight": torch.randn(text.hidden_size, mm_hidden) * 0.5,
        "model.mm_projector.0.bias": torch.randn(text.hidden_size) * 0.5,
        "model.mm_projector.2.weight": torch.randn(text.hidden_size, text.hidden_size) * 0.5,
        "model.mm_projector.2.bias": torch.randn(text.hidden_size) * 0.5,
    }
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    for index, half in enumerate(halves, start=1):
        shard = {name: state[name].clone() for name in half}
        torch.save(shard, directory / f"pytorch_model-{index:05d}-of-00002.bin")
    config = {
        **text.to_dict(),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": mm_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": SELECT_LAYER,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        **config_overrides,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    return directory


def base_tokenizer() -> LlamaTokenizerFast:
    """LLaMA's tokenizer layout at a tiny size, before LLaVA adds `<image>` and `<pad>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=list(LLAMA_SPECIAL_TOKENS),
        initial_alphabet=[*string.ascii_letters, *string.digits, *string.punctuation, "▁"],
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    return LlamaTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def _corpus() -> list[str]:
    system = converter().LLAVA_V1_SYSTEM
    policy = PolicyRegistry.load().get("icm-assistant")
    # Answers often enough that `▁Yes` and `▁No` become tokens, as they are LLaMA's.
    answers = ["Yes No yes no"] * 50 + ["USER: ASSISTANT:"] * 5
    return [system, policy.prompt, *answers, *(category.label for category in policy.categories)]


def vision_config() -> CLIPVisionConfig:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )


def image_processor() -> CLIPImageProcessor:
    """openai/clip-vit-large-patch14-336's preprocessing (resize the shortest side, centre
    crop, CLIP's mean and std, bicubic), at IMAGE_SIZE."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def text_config(vocab_size: int, pad_token_id: int | None) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # LLaMA-7B has no grouped-query attention
        max_position_embeddings=4096,
        # Wider than LLaMA's 0.02, so that random weights write varied text and give logits
        # that tell a wrong splice of the image features from a right one.
        initializer_range=0.5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )
