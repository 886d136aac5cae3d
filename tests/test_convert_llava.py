"""deploy/icm/convert_llava.py: an original LLaVA-1.5 checkpoint into transformers' LLaVA.

No real weights can be had here, so the conversion runs on a tiny checkpoint written at test
time as haotian-liu/LLaVA writes ICM-LLaVA-v1.5-7B (tests/support/tiny_llava15.py), with a tiny
CLIP tower apart. The converted model must compute what LLaVA-1.5 computes from the original
weights: the reference below is LLaVA's forward written again from its source (llava_arch.py's
encode_images and prepare_inputs_labels_for_multimodal, clip_encoder.py's feature_select), on
the original state dict, not on anything the conversion wrote.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import tiny_llava15
from tests.support.lazy import lazy

torch = lazy("torch")
convert_llava = tiny_llava15.converter()

IMAGE_FEATURES = tiny_llava15.IMAGE_FEATURES


@dataclass(frozen=True)
class Checkpoints:
    original: Path
    tower: Path
    converted: Path


@pytest.fixture(scope="module")
def llava15_conversion(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """The tiny original and its tower, converted by the documented command."""
    root = tmp_path_factory.mktemp("convert-llava")
    original = tiny_llava15.build_original(root / "original")
    tower = tiny_llava15.build_vision_tower(root / "tower")
    converted = root / "converted"
    done = subprocess.run(
        [
            sys.executable,
            str(tiny_llava15.CONVERTER),
            "--original",
            str(original),
            "--vision-tower",
            str(tower),
            "--out",
            str(converted),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {converted}"
    return Checkpoints(original, tower, converted)


@pytest.fixture(scope="module")
def llava15_tokenizer() -> Any:
    return tiny_llava15.base_tokenizer()


def original_state(original: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for shard in sorted(original.glob("pytorch_model-*.bin")):
        state |= torch.load(shard, map_location="cpu", weights_only=True)
    return state


def llava_forward(
    original: Path, tower: Path, before: list[int], after: list[int], pixels: Any
) -> Any:
    """LLaVA-1.5's logits for `before` <image> `after`, from the original layout: LLaMA on the
    `model.*` and `lm_head` weights, the tower's second-to-last hidden states without CLS
    through Linear-GELU-Linear of `model.mm_projector.{0,2}`, spliced where <image> stands."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    state = original_state(original)
    projector = {k: v for k, v in state.items() if k.startswith("model.mm_projector.")}
    vocabulary = state["model.embed_tokens.weight"].shape[0]
    llama = LlamaForCausalLM(tiny_llava15.text_config(vocabulary, pad_token_id=0))
    llama.load_state_dict({k: v for k, v in state.items() if k not in projector}, strict=True)
    clip = CLIPVisionModel.from_pretrained(tower)
    with torch.no_grad():
        hidden = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        first = torch.nn.functional.linear(
            hidden, projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"]
        )
        features = torch.nn.functional.linear(
            torch.nn.functional.gelu(first),
            projector["model.mm_projector.2.weight"],
            projector["model.mm_projector.2.bias"],
        )
        embed = llama.get_input_embeddings()
        spliced = torch.cat([embed(torch.tensor(before)), features[0], embed(torch.tensor(after))])
        return llama(inputs_embeds=spliced[None]).logits


def test_the_converted_model_computes_what_llava_computes_from_the_original_weights(
    llava15_conversion: Checkpoints, llava15_tokenizer: Any
) -> None:
    from transformers import LlavaForConditionalGeneration

    before = llava15_tokenizer("USER:")["input_ids"]
    after = llava15_tokenizer("\nIs the picture sexy? ASSISTANT:", add_special_tokens=False)[
        "input_ids"
    ]
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, tiny_llava15.IMAGE_SIZE, tiny_llava15.IMAGE_SIZE)
    expected = llava_forward(
        llava15_conversion.original, llava15_conversion.tower, before, after, pixels
    )
    model = LlavaForConditionalGeneration.from_pretrained(llava15_conversion.converted).eval()
    image = model.config.image_token_index
    ids = torch.tensor([[*before, *[image] * IMAGE_FEATURES, *after]])
    with torch.no_grad():
        found = model(input_ids=ids, pixel_values=pixels).logits
    vocabulary = expected.shape[-1]
    assert found.shape == (1, len(before) + IMAGE_FEATURES + len(after), vocabulary + 2)
    assert expected.abs().max() > 1  # logits that a wrong splice would change visibly
    torch.testing.assert_close(found[..., :vocabulary], expected, rtol=1e-5, atol=1e-4)


def test_the_converted_checkpoint_is_laid_out_as_llava_hf_s(
    llava15_conversion: Checkpoints, llava15_tokenizer: Any
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    converted = llava15_conversion.converted
    config = json.loads((converted / "config.json").read_text())
    vocabulary = len(llava15_tokenizer)
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (config["image_token_index"], config["pad_token_id"]) == (vocabulary, vocabulary + 1)
    assert config["text_config"]["vocab_size"] == vocabulary + 2
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (
        -2,
        "default",
    )
    assert (config["image_seq_length"], config["projector_hidden_act"]) == (IMAGE_FEATURES, "gelu")
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert generation["pad_token_id"] == vocabulary + 1

    weights = load_file(converted / "model.safetensors")
    state = original_state(llava15_conversion.original)
    for old, new in [
        ("model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.up_proj.weight"),
        ("model.norm.weight", "language_model.model.norm.weight"),
        ("model.mm_projector.2.bias", "multi_modal_projector.linear_2.bias"),
    ]:
        assert torch.equal(weights[new], state[old]), new
    tower = load_file(llava15_conversion.tower / "model.safetensors")
    assert torch.equal(
        weights["vision_tower.vision_model.post_layernorm.weight"],
        tower["vision_model.post_layernorm.weight"],
    )
    for new, old in [
        ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
    ]:
        assert torch.equal(weights[new][:vocabulary], state[old])
        mean = state[old].mean(dim=0)
        for row in (vocabulary, vocabulary + 1):
            torch.testing.assert_close(weights[new][row], mean)

    processor = AutoProcessor.from_pretrained(converted)
    assert processor.chat_template == convert_llava.CHAT_TEMPLATE
    assert (processor.tokenizer.pad_token, processor.tokenizer.eos_token_id) == ("<pad>", 2)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Sexy?"}]}],
        add_generation_prompt=True,
    )
    ids = processor(images=[torch.zeros(3, 40, 40)], text=[prompt])["input_ids"][0]
    assert ids.count(config["image_token_index"]) == IMAGE_FEATURES


def llava_v1_prompt(turns: list[tuple[str, str | None]], system: str) -> str:
    """haotian-liu/LLaVA's Conversation.get_prompt for separator style TWO (conv_llava_v1:
    sep " ", sep2 "</s>"), the image moved to the start of the first turn as "<image>\\n"."""
    seps = (" ", "</s>")
    prompt = system + seps[0]
    for index, (role, message) in enumerate(turns):
        if message is None:
            prompt += role + ":"
            continue
        if index == 0:
            message = "<image>\n" + message.replace("<image>", "").strip()
        prompt += role + ": " + message + seps[index % 2]
    return prompt


def chat(*texts: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        content: list[dict[str, str]] = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return messages


@pytest.mark.parametrize(
    "texts",
    [
        ("Is the picture sexy? Answer yes or no.",),
        ("Is the picture sexy?", "Yes, it matches R01.", "Which rule?"),
        ("Q1", "A1", "Q2", "A2", "Q3"),
    ],
)
def test_the_chat_template_renders_llavas_llava_v1_conversation(
    llava15_tokenizer: Any, texts: tuple[str, ...]
) -> None:
    rendered = llava15_tokenizer.apply_chat_template(
        chat(*texts),
        chat_template=convert_llava.CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    turns: list[tuple[str, str | None]] = [
        ("USER" if index % 2 == 0 else "ASSISTANT", text) for index, text in enumerate(texts)
    ]
    expected = llava_v1_prompt([*turns, ("ASSISTANT", None)], convert_llava.LLAVA_V1_SYSTEM)
    assert rendered == expected
    assert rendered.startswith(
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
    )


def test_the_chat_template_takes_a_system_turn_and_refuses_other_roles(
    llava15_tokenizer: Any,
) -> None:
    def render(messages: list[dict[str, Any]]) -> str:
        return str(
            llava15_tokenizer.apply_chat_template(
                messages, chat_template=convert_llava.CHAT_TEMPLATE, tokenize=False
            )
        )

    system = {"role": "system", "content": "Be brief."}
    assert render([system, *chat("Q")]) == "Be brief. USER: <image>\nQ "
    with pytest.raises(Exception, match="not tool"):
        render([{"role": "tool", "content": "x"}])


def test_the_original_names_become_transformers_names() -> None:
    tensor = torch.zeros(1)
    assert convert_llava.hf_weights(
        {
            "model.embed_tokens.weight": tensor,
            "model.layers.0.self_attn.rotary_emb.inv_freq": tensor,
            "model.mm_projector.0.weight": tensor,
            "model.mm_projector.2.bias": tensor,
            "lm_head.weight": tensor,
        }
    ).keys() == {
        "language_model.model.embed_tokens.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "language_model.lm_head.weight",
    }
    with pytest.raises(convert_llava.ConversionError, match="vision-tower weights"):
        convert_llava.hf_weights({"model.vision_tower.vision_tower.x": tensor})
    with pytest.raises(convert_llava.ConversionError, match=r"unexpected weight other\.x"):
        convert_llava.hf_weights({"other.x": tensor})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"mm_projector_type": "linear"},
            "mm_projector_type is 'linear'; this converts LLaVA-1.5 checkpoints with "
            "mm_projector_type 'mlp2x_gelu' only",
        ),
        (
            {"architectures": ["LlavaMistralForCausalLM"]},
            "architectures is \\['LlavaMistralForCausalLM'\\]",
        ),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio is 'anyres'"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end is True"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature is 'cls', not one of"),
        (
            {"mm_hidden_size": 64},
            "the tower's hidden size is 32, the checkpoint's mm_hidden_size 64",
        ),
        ({"vocab_size": 800}, "the tokenizer has 700 tokens, config.json's vocab_size is 800"),
    ],
)
def test_what_it_does_not_convert_is_refused_saying_why(
    llava15_conversion: Checkpoints,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    message: str,
) -> None:
    original = shutil.copytree(llava15_conversion.original, tmp_path / "original")
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    argv = ["--original", str(original), "--vision-tower", str(llava15_conversion.tower)]
    assert convert_llava.main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("convert_llava: ")
    assert re.search(message, error), error
    assert not out.exists()
