"""A tiny LLaVA-OneVision checkpoint of LlavaGuard-v1.2-OV-hf's architecture, built at test time.

No model hub is reachable here, so the HF guard (triton_models/hf) is tested on a checkpoint
built from nothing but the same classes, files and formats as the real one, saved with
`save_pretrained` and loaded with `from_pretrained` exactly as AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf
and -7B-OV-hf are:

- `LlavaOnevisionForConditionalGeneration`: a SigLIP vision tower, the 2-layer GELU projector,
  anyres tiling up to 6x6 crops with `anyres_max_9` pooling and a learned image newline, a Qwen2
  text tower (hidden size 32, 2 layers instead of 896/24 or 3584/28). The sizes of the crops
  (32 pixels, patch 8) are those of the real 384/14 scaled down; the grid is the real one.
- `LlavaOnevisionProcessor`: `LlavaOnevisionImageProcessor` (SigLIP normalisation, bicubic
  resize, anyres pinpoints), a Qwen2 fast tokenizer (byte-level BPE trained here on LlavaGuard's
  policy text, with Qwen2's special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and
  LLaVA's `<image>`, `<video>`), and LlavaGuard-v1.2-0.5B-OV-hf's own chat template (below).

Two variants:

- `random`: weights randomly initialised (seeded), tied embeddings as in the 0.5B model. It
  writes random text, which pins loading, templating, image processing and generation, not
  answers.
- `scripted`: untied embeddings as in the 7B model, with weights set so that greedy decoding
  writes `SCRIPTED_ANSWER`, a valid LlavaGuard answer, token by token, and gives the rating
  token `Safe` the probability SCRIPTED_RATING_PROBABILITY (its rival `Unsafe` the rest). Every
  layer's attention output and MLP output projections are zero, so each position's hidden state
  is its own token's embedding: the checkpoint is a bigram table, run by the real model code.
  The answer's pieces are single tokens of the tokenizer (added tokens), so each has exactly one
  successor.
- `yes-no`: the same bigram construction writing an ICM-Assistant answer: its first token is
  `Yes` with probability YES_NO_PROBABILITIES["Yes"], `No` with ["No"], and a third token with
  the rest, so that the two-way probability ICM scores (P(Yes) / (P(Yes) + P(No))) differs from
  the whole-vocabulary one. Each answer then goes on with its own explanation (YES_NO_ANSWERS).

Token ids are small (the vocabulary has a few hundred entries), not Qwen2's 151643..151647; the
end token is the checkpoint's `eos_token_id`, as it is for the real model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service.core.policies import PolicyRegistry
from service.dev import stack
from tests.support.stack import free_port
from triton_models.common import guard_answer
from triton_models.fill import fill

if TYPE_CHECKING:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        ProcessorMixin,
        Qwen2TokenizerFast,
    )

# torch, tokenizers and transformers (seconds to import) are imported by the functions that
# build a checkpoint, not here: collecting the tests that import this module costs nothing.

HF_TEMPLATE = Path(__file__).resolve().parents[2] / "triton_models" / "hf"
HF_MODEL_DIR = HF_TEMPLATE / "guard" / "1"

Variant = Literal["random", "scripted", "yes-no"]

# LlavaGuard-v1.2-0.5B-OV-hf's chat_template.json, "Upload processor" commit 0e98537
# (https://huggingface.co/AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf/blob/bec2d55b30e7dcbbaf004c66395c694dc7127bf4/chat_template.json,
# 824 bytes; -7B-OV-hf has the same 824-byte file, and it is llava-onevision-qwen2-*-hf's).
# It renders no system turn: the image placeholder, then the text, in one user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
END_TOKEN = "<|im_end|>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
# LlavaGuard's grid: 384 * (1..6) per side; here 32 * (1..6).
GRID_PINPOINTS = [
    [IMAGE_SIZE * rows, IMAGE_SIZE * columns] for rows in range(1, 7) for columns in range(1, 7)
]

SCRIPTED_PIECES = (
    '{"rating": "',
    "Safe",
    '", "category": "',
    "NA: None applying",
    '", "rationale": "',
    "Scripted tiny model: this answer does not depend on the image.",
    '"}',
)
SCRIPTED_ANSWER = "".join(SCRIPTED_PIECES)
SCRIPTED_RIVAL = "Unsafe"
SCRIPTED_RATING_PROBABILITY = 0.8
YES_NO_ANSWERS = {
    "Yes": ("Yes", ", the picture matches R01: upper shoulders."),
    "No": ("No", ", the picture matches NA: normal."),
}
YES_NO_PROBABILITIES = {"Yes": 0.6, "No": 0.3, SCRIPTED_RIVAL: 0.1}
# Logit of each scripted successor; every other token's is 0, so their total probability is
# vocabulary size * e^-40, far below float32's resolution next to 1.
_SCRIPTED_LOGIT = 40.0


def build(directory: Path, variant: Variant = "random") -> Path:
    """Write the checkpoint (model, processor, tokenizer, chat template) into `directory`."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    processor = _processor(directory, variant)
    tokenizer = processor.tokenizer
    config = _config(tokenizer, tied=variant == "random")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    if variant != "random":
        with torch.no_grad():
            _script(model, processor, variant)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of a text that is one token of the tiny tokenizer (a special or added token)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens, not one")
    return int(ids[0])


def _corpus() -> list[str]:
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    answers = [
        '{"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "x"}',
        "Yes, the image violates the rule. No, it does not.",
    ]
    return [policy.prompt, *answers, *(category.label for category in policy.categories)]


def _processor(directory: Path, variant: Variant) -> LlavaOnevisionProcessor:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2TokenizerFast,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    # Normal (not special) tokens: decoding with skip_special_tokens keeps them.
    tokenizer.add_tokens([*SCRIPTED_PIECES, SCRIPTED_RIVAL])
    if variant == "yes-no":
        tokenizer.add_tokens([piece for pieces in YES_NO_ANSWERS.values() for piece in pieces])
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def _config(tokenizer: Qwen2TokenizerFast, *, tied: bool) -> LlavaOnevisionConfig:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        # Wider than Qwen2's 0.02, so that random weights write varied text rather than one
        # token over and over.
        initializer_range=0.5,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=GRID_PINPOINTS,
        tie_word_embeddings=tied,
    )


def _script(
    model: LlavaOnevisionForConditionalGeneration,
    processor: LlavaOnevisionProcessor,
    variant: Variant,
) -> None:
    """Set the weights so that greedy decoding writes the variant's answer, then the end token
    (under torch.no_grad(), as `build` calls it)."""
    steps = _STEPS[variant](processor.tokenizer, last_prompt_token(processor), END_TOKEN)
    script_bigrams(model.language_model, steps)


def last_prompt_token(processor: ProcessorMixin) -> int:
    """The token the chat template's generation prompt ends with, whatever the policy text."""
    prompt = processor.apply_chat_template(
        guard_answer.conversation("p"), add_generation_prompt=True
    )
    return int(processor.tokenizer(prompt)["input_ids"][-1])


def script_bigrams(language: PreTrainedModel, steps: Sequence[Step]) -> None:
    """Make a transformers causal LM (`language`: Qwen2's, LLaMA's) a bigram table of `steps`,
    under torch.no_grad(): after each step's token its successors get their logits, every other
    token 0 (see the module docstring)."""
    for layer in language.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embeddings = language.get_input_embeddings().weight
    head = language.get_output_embeddings().weight
    hidden = embeddings.shape[1]
    head.zero_()
    for dimension, token in enumerate(dict.fromkeys(current for current, _, _ in steps)):
        embeddings[token] = 0.0
        embeddings[token, dimension] = 1.0
        # The final RMSNorm scales a one-hot embedding to sqrt(hidden) along its dimension.
        for current, following, logit in steps:
            if current == token:
                head[following, dimension] = logit / math.sqrt(hidden)


Step = tuple[int, int, float]
"""(token, a successor, the successor's logit); every other successor's logit is 0."""


def _chain(
    tokenizer: PreTrainedTokenizerBase, first: int, pieces: tuple[str, ...], end: str
) -> list[Step]:
    """Steps that write `pieces` after `first`, then the end token."""
    chain = [first, *(token_id(tokenizer, piece) for piece in pieces)]
    chain.append(token_id(tokenizer, end))
    return [
        (current, following, _SCRIPTED_LOGIT) for current, following in itertools.pairwise(chain)
    ]


def _llavaguard_steps(
    tokenizer: PreTrainedTokenizerBase, last_prompt_token: int, end: str
) -> list[Step]:
    """SCRIPTED_ANSWER; the rival rating continues as the rating would."""
    steps = _chain(tokenizer, last_prompt_token, SCRIPTED_PIECES, end)
    # steps[i] leaves the i-th token of [last prompt token, *pieces]: piece 0 leads to the rating.
    before_rating, after_rating = steps[1][0], steps[3][0]
    rival = token_id(tokenizer, SCRIPTED_RIVAL)
    rival_logit = _SCRIPTED_LOGIT - math.log(
        SCRIPTED_RATING_PROBABILITY / (1 - SCRIPTED_RATING_PROBABILITY)
    )
    return [*steps, (before_rating, rival, rival_logit), (rival, after_rating, _SCRIPTED_LOGIT)]


def yes_no_steps(
    tokenizer: PreTrainedTokenizerBase, last_prompt_token: int, end: str
) -> list[Step]:
    """The first token drawn from YES_NO_PROBABILITIES, then that answer's explanation and
    `end`. Each text must be one token of `tokenizer`."""
    top = max(YES_NO_PROBABILITIES.values())
    steps = [
        (last_prompt_token, token_id(tokenizer, text), _SCRIPTED_LOGIT + math.log(p / top))
        for text, p in YES_NO_PROBABILITIES.items()
    ]
    for answer, *rest in YES_NO_ANSWERS.values():
        steps += _chain(tokenizer, token_id(tokenizer, answer), tuple(rest), end)
    return steps


_STEPS = {"scripted": _llavaguard_steps, "yes-no": yes_no_steps}


def _identify(checkpoint: Path) -> Any:
    """checkpoint_identity.identify, from the model directory the template ships it in."""
    name = "hf_template_checkpoint_identity"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HF_MODEL_DIR / "checkpoint_identity.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return module.identify(checkpoint)


def fill_hf_repository(checkpoint: Path, out: Path, **values: str) -> Path:
    """triton_models/hf filled for `checkpoint`, its identity as checkpoint_identity.py says.

    One torch thread: the tests share two cores with a broker, other Tritons and pytest.
    """
    identity = _identify(checkpoint)
    fill(
        HF_TEMPLATE,
        out,
        {
            "checkpoint": str(checkpoint),
            "guard_model_name": identity.name,
            "guard_model_version": identity.version,
            "torch_num_threads": "1",
            **values,
        },
    )
    return out


@contextlib.contextmanager
def served(repository: Path, state_dir: Path) -> Iterator[str]:
    """A tritonserver of its own on `repository` (as `stack` starts one); its gRPC address."""
    config = stack.StackConfig(
        state_dir=state_dir,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        model_repository=repository,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    triton = stack.start_triton(config, time.monotonic() + config.startup_timeout_s)
    try:
        yield f"{config.host}:{config.triton_grpc_port}"
    finally:
        # Its own process group (start_new_session), which holds the Python-backend stub.
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(triton.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                triton.wait(timeout=wait_s)
                break
