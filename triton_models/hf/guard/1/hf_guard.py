"""Guard checkpoints under transformers: the model behind triton_models/hf's `guard`.

Runs AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf or -7B-OV-hf (LlavaOnevisionForConditionalGeneration:
SigLIP vision tower, Qwen2 text tower) or a LLaVA-1.5 checkpoint such as ICM-Assistant's
(LlavaForConditionalGeneration: CLIP, LLaMA; hf_architectures says what differs) on the CPU or a
CUDA GPU, with the checkpoint's own processor and chat template. Nothing here imports Triton:
`model.py` is the glue, so the tests run this module in-process as well as through a real
tritonserver. In the order data flows:

    parse_settings     config.pbtxt parameters -> Settings, or InvalidSettingsError (no load)
    parse_request      one request's tensors -> Request, or InvalidRequestError (that request)
    Engine.prepare     Request -> Prepared: chat template, image processing, token budget
    plan_batches       Prepared requests -> groups that may share one generate() call
    Engine.answer      one group -> Answer per request (text_output, rating_log_prob), or the
                       error of that request alone

Batching: requests of one Triton batch whose sampling settings are equal run as ONE batched
`generate()` (left-padded prompts, image crops padded as the processor pads them), because on a
GPU decoding is memory-bound and a batch of 8 costs little more than one. A request that samples
with a seed runs alone: in a batch, the random draws of all rows come from one generator, so
its answer would depend on its neighbours. If a batched call fails, each of its requests is run
again alone, so that one bad request cannot fail the others.

`rating_log_prob` is the natural log of the probability the model's own distribution (softmax of
the raw logits, temperature 1, before top-k/top-p) gave to the token that decided the answer
(`guard_answer.decision_token_index`); NaN when the answer has no deciding token. When that token
is a Yes or No (an ICM-Assistant answer), the distribution is the two-way one ICM scores:
P(chosen) / (P(Yes) + P(No)) at that step (`guard_answer.two_way_log_prob`). Both are recorded
during generation, the chosen token's and its rival's log-prob per step, so memory stays at one
vocabulary row per sequence instead of `output_logits`' steps x vocabulary (300 MB per 500-token
answer with Qwen2's 151k tokens).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from checkpoint_identity import fingerprint
from guard_answer import (
    DECISION_PATTERN,
    compile_decision_pattern,
    conversation,
    decision_token_index,
    token_pieces,
    two_way_log_prob,
    yes_no_rivals,
)
from guard_request import (
    MESSAGES_INPUT,
    InvalidRequestError,
    Turn,
    history_from_tensor,
    image_from_tensor,
)
from hf_architectures import architecture_of, collate
from model_parameters import InvalidSettingsError, ModelParameters
from numpy.typing import NDArray
from square_padding import mean_fill_rgb, pad_to_square
from transformers import (
    AutoProcessor,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

PARAMETERS = (
    "checkpoint",
    "guard_model_name",
    "guard_model_version",
    "verify_checkpoint",
    "device",
    "dtype",
    "attn_implementation",
    "max_new_tokens",
    "max_input_tokens",
    "max_image_side",
    "decision_pattern",
    "torch_num_threads",
)
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

TensorLookup = Callable[[str], NDArray[Any] | None]
"""A request's input tensor by name, None when the client did not send it."""


@dataclass(frozen=True)
class Settings:
    checkpoint: Path
    model_name: str
    model_version: str
    verify_checkpoint: bool
    device: str
    dtype: str
    attn_implementation: str
    max_new_tokens: int
    max_input_tokens: int
    max_image_side: int
    decision_pattern: re.Pattern[str]
    torch_num_threads: int


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, normalised so that equal settings compare equal."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Request:
    prompt: str
    image: NDArray[np.uint8]
    sampling: Sampling
    history: tuple[Turn, ...] = ()
    """Earlier turns of a conversation about the image; `prompt` is the newest question."""


@dataclass(frozen=True)
class Prepared:
    """A request's model inputs (batch of one), ready to be batched with others."""

    features: Mapping[str, torch.Tensor]
    sampling: Sampling


@dataclass(frozen=True)
class Answer:
    text: str
    rating_log_prob: float
    """NaN when the answer has no deciding token."""
    token_count: int


def parse_settings(parameters: Mapping[str, str]) -> Settings:
    """Settings from config.pbtxt's parameters, each required (fill.py writes them all)."""
    read = ModelParameters(parameters, required=PARAMETERS)
    checkpoint = read.string("checkpoint", blank=False)
    model_name = read.string("guard_model_name", blank=False)
    model_version = read.string("guard_model_version", blank=False)
    device = read.string("device")
    if not _DEVICE.fullmatch(device):
        raise InvalidSettingsError(f"device: must be cpu, cuda or cuda:N, got {device!r}")
    dtype = read.choice("dtype", tuple(DTYPES))
    if dtype == "float16" and device == "cpu":
        # PyTorch's CPU kernels for half precision are missing or slow; bfloat16 works.
        raise InvalidSettingsError("dtype: float16 is for CUDA; use float32 or bfloat16 on cpu")
    attention = read.choice("attn_implementation", ATTENTION)
    try:
        pattern = compile_decision_pattern(read.string("decision_pattern") or DECISION_PATTERN)
    except ValueError as exc:
        raise InvalidSettingsError(str(exc)) from exc
    return Settings(
        checkpoint=Path(checkpoint),
        model_name=model_name,
        model_version=model_version,
        verify_checkpoint=read.boolean("verify_checkpoint"),
        device=device,
        dtype=dtype,
        attn_implementation=attention,
        max_new_tokens=read.integer("max_new_tokens", minimum=1),
        max_input_tokens=read.integer("max_input_tokens", minimum=1),
        max_image_side=read.integer("max_image_side", minimum=1),
        decision_pattern=pattern,
        torch_num_threads=read.integer("torch_num_threads", minimum=0),
    )


def resolve_device(device: str, instance_kind: str, instance_device_id: str) -> torch.device:
    """The torch device of one model instance: `cuda` follows Triton's KIND_GPU placement."""
    if device == "cpu":
        if instance_kind == "GPU":
            raise InvalidSettingsError("instance_group kind is KIND_GPU but device is cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidSettingsError(f"device is {device} but PyTorch sees no CUDA device")
    if device == "cuda" and instance_kind == "GPU":
        return torch.device("cuda", int(instance_device_id))
    return torch.device(device)


def parse_request(tensor: TensorLookup, settings: Settings, vocab_size: int) -> Request:
    """One request's prompt, image, sampling and history, checked against the contract."""
    return Request(
        prompt=_prompt(tensor),
        image=_image(tensor, settings.max_image_side),
        sampling=_sampling(tensor, settings.max_new_tokens, vocab_size),
        history=history_from_tensor(tensor(MESSAGES_INPUT)),
    )


def _prompt(tensor: TensorLookup) -> str:
    value = _scalar(tensor, "text_input", required=True)
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"text_input: not UTF-8: {exc}") from exc
    if not prompt.strip():
        raise InvalidRequestError("text_input: empty; the guard needs the policy prompt")
    return prompt


def _image(tensor: TensorLookup, max_side: int) -> NDArray[np.uint8]:
    pixels = tensor("image_bytes_input")
    if pixels is None:
        raise InvalidRequestError("image_bytes_input: missing")
    return image_from_tensor(pixels, max_side)


def _sampling(tensor: TensorLookup, cap: int, vocab_size: int) -> Sampling:
    max_tokens = _int(tensor, "max_tokens", required=True)
    if max_tokens is None or max_tokens < 1:
        raise InvalidRequestError(f"max_tokens: must be at least 1, got {max_tokens}")
    temperature = _float(tensor, "temperature")
    top_p = _float(tensor, "top_p")
    top_k = _int(tensor, "top_k")
    if temperature is not None and not temperature >= 0:  # NaN fails too
        raise InvalidRequestError(f"temperature: must be a number >= 0, got {temperature}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise InvalidRequestError(f"top_p: must be in 0..1, got {top_p}")
    if top_k is not None and top_k < 0:
        raise InvalidRequestError(f"top_k: must be >= 0, got {top_k}")
    end_id, pad_id = (_token_id(tensor, name, vocab_size) for name in ("end_id", "pad_id"))
    max_new_tokens = min(max_tokens, cap)
    if not temperature:
        # Greedy: top_p, top_k and seed change nothing, so they must not split batches.
        return Sampling(max_new_tokens, end_id=end_id, pad_id=pad_id)
    return Sampling(
        max_new_tokens,
        temperature=temperature,
        # 0 turns either filter off, as in TensorRT-LLM; transformers spells that 1.0 and 0.
        top_p=top_p or 1.0,
        top_k=top_k or 0,
        seed=_int(tensor, "seed"),
        end_id=end_id,
        pad_id=pad_id,
    )


def _token_id(tensor: TensorLookup, name: str, vocab_size: int) -> int | None:
    value = _int(tensor, name)
    if value is not None and not 0 <= value < vocab_size:
        raise InvalidRequestError(f"{name}: {value} is not a token id (0..{vocab_size - 1})")
    return value


def _scalar(tensor: TensorLookup, name: str, *, required: bool = False) -> Any:
    values = tensor(name)
    if values is None:
        if required:
            raise InvalidRequestError(f"{name}: missing")
        return None
    if values.size != 1:
        raise InvalidRequestError(f"{name}: expected one value, got shape {list(values.shape)}")
    return values.reshape(-1)[0]


def _int(tensor: TensorLookup, name: str, *, required: bool = False) -> int | None:
    value = _scalar(tensor, name, required=required)
    return None if value is None else int(value)


def _float(tensor: TensorLookup, name: str) -> float | None:
    value = _scalar(tensor, name)
    return None if value is None else float(value)


def plan_batches(samplings: Sequence[Sampling]) -> list[list[int]]:
    """Indices of `samplings` grouped into generate() calls, in first-seen order.

    Equal settings share a call; a seeded sampled request is alone (see the module docstring).
    """
    groups: dict[Sampling, list[int]] = {}
    alone: list[list[int]] = []
    for index, sampling in enumerate(samplings):
        if sampling.sampled and sampling.seed is not None:
            alone.append([index])
        else:
            groups.setdefault(sampling, []).append(index)
    return [*groups.values(), *alone]


class ChosenTokenLogProbs(StoppingCriteria):
    """Log-probability of each generated token, and of its rival, under the model's raw
    distribution.

    A forward hook keeps the log-softmax of the newest position's raw logits; this criterion,
    which generate() calls once the step's tokens are appended, gathers the chosen token's
    entry and that of its rival (`rivals[token]`: the other answer's token for a Yes/No token,
    the token itself otherwise). It never stops generation.
    """

    def __init__(self, rivals: torch.Tensor) -> None:
        """`rivals`: `rival_table`, on the device the logits are on."""
        self._rivals = rivals
        self._latest: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []
        self._rival_steps: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator[ChosenTokenLogProbs]:
        handle = model.register_forward_hook(self._keep_latest)
        try:
            yield self
        finally:
            handle.remove()

    def _keep_latest(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._latest = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        if self._latest is None:
            raise RuntimeError("no logits recorded for this step")
        chosen = input_ids[:, -1:].to(self._latest.device)
        rival = self._rivals[chosen]
        self._steps.append(self._latest.gather(1, chosen).squeeze(1))
        self._rival_steps.append(self._latest.gather(1, rival).squeeze(1))
        self._latest = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def log_probs(self) -> NDArray[np.float32]:
        """[steps, batch] float32; row t holds the log-prob of each sequence's t-th token."""
        return self._stacked(self._steps)

    def rival_log_probs(self) -> NDArray[np.float32]:
        """[steps, batch] float32; the log-prob of each t-th token's rival at step t."""
        return self._stacked(self._rival_steps)

    @staticmethod
    def _stacked(steps: list[torch.Tensor]) -> NDArray[np.float32]:
        if not steps:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.stack(steps).cpu().numpy().astype(np.float32)


class Engine:
    """The checkpoint loaded on one device, answering prepared requests."""

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        if settings.torch_num_threads:
            torch.set_num_threads(settings.torch_num_threads)
        checkpoint = settings.checkpoint
        if not checkpoint.is_dir():
            # from_pretrained would read a missing path as a hub repository id.
            raise InvalidSettingsError(f"checkpoint: {checkpoint} is not a directory")
        if settings.verify_checkpoint:
            found = fingerprint(checkpoint)
            if found != settings.model_version:
                raise InvalidSettingsError(
                    f"checkpoint: {checkpoint} fingerprints as {found}, but guard_model_version "
                    f"says {settings.model_version}: verdicts would name the wrong model "
                    "(fill the version with checkpoint_identity.py, or set verify_checkpoint "
                    "false)"
                )
        self.architecture = architecture_of(checkpoint)
        self.processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
        if not getattr(self.processor, "chat_template", None):
            raise InvalidSettingsError(f"checkpoint: {checkpoint} has no chat template")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.model = self.architecture.model_class.from_pretrained(
            checkpoint,
            torch_dtype=DTYPES[settings.dtype],
            attn_implementation=settings.attn_implementation,
            device_map=device,
            local_files_only=True,
        ).eval()
        for key, value in self.architecture.config_overrides.items():
            setattr(self.model.config, key, value)
        self._check_tokens()
        self._pad_colour = mean_fill_rgb(self.processor.image_processor.image_mean)
        self.vocab_size = int(self.model.config.text_config.vocab_size)
        self._rival_of = {
            token: rival
            for token, rival in yes_no_rivals(self.tokenizer.get_vocab()).items()
            if max(token, rival) < self.vocab_size
        }
        self._rivals = rival_table(self._rival_of, self.vocab_size).to(device)
        defaults = self.model.generation_config
        self._end_ids = _ids(defaults.eos_token_id) or _ids(self.tokenizer.eos_token_id)
        if not self._end_ids:
            raise InvalidSettingsError(f"checkpoint: {checkpoint} names no end-of-answer token")
        pad = defaults.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.pad_token_id)

    def _check_tokens(self) -> None:
        """The processor's <image> placeholder must be the token the model replaces, and for
        LLaVA-1.5 expand to as many tokens as the model has features for it."""
        image_token = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        expected = self.model.config.image_token_index
        if image_token != expected:
            raise InvalidSettingsError(
                f"checkpoint: the tokenizer's {self.processor.image_token} is id {image_token}, "
                f"the model's image_token_index is {expected}"
            )
        if self.architecture.model_type == "llava":
            # Without both, LlavaProcessor leaves <image> unexpanded (transformers 4.47).
            config = self.model.config
            model = (config.vision_config.patch_size, config.vision_feature_select_strategy)
            found = tuple(
                getattr(self.processor, name, None)
                for name in ("patch_size", "vision_feature_select_strategy")
            )
            if found != model:
                raise InvalidSettingsError(
                    "checkpoint: the processor's patch_size and vision_feature_select_strategy "
                    f"are {found}, the model's {model}"
                )

    def prepare(self, request: Request) -> Prepared:
        """Chat template, image processing and tokenisation of one request."""
        prompt = self.processor.apply_chat_template(
            conversation(request.prompt, request.history), add_generation_prompt=True
        )
        image = request.image
        if self.architecture.pads_to_square:
            image = pad_to_square(image, self._pad_colour)
        # channels_last: without it a 3-pixel-high image reads as channels-first.
        features = self.processor(
            images=[image],
            text=[prompt],
            return_tensors="pt",
            input_data_format="channels_last",
        )
        length = int(features["input_ids"].shape[1])
        if length > self.settings.max_input_tokens:
            raise InvalidRequestError(
                f"prompt and image make {length} tokens, over max_input_tokens "
                f"{self.settings.max_input_tokens}"
            )
        inputs = self.architecture.model_inputs
        return Prepared({name: features[name] for name in inputs}, request.sampling)

    def answer(self, group: Sequence[Prepared]) -> list[Answer | Exception]:
        """One answer (or error) per request, in one generate() call when that works."""
        try:
            return list(self.generate(group))
        except Exception as exc:
            if len(group) == 1:
                return [exc]
        results: list[Answer | Exception] = []
        for prepared in group:
            results.extend(self.answer([prepared]))
        return results

    @torch.inference_mode()
    def generate(self, group: Sequence[Prepared]) -> list[Answer]:
        """Requests with equal sampling settings, generated as one batch."""
        sampling = group[0].sampling
        if any(prepared.sampling != sampling for prepared in group):
            raise ValueError("one generate() call needs equal sampling settings")
        pad_id = self._pad_id if sampling.pad_id is None else sampling.pad_id
        batch = collate([prepared.features for prepared in group], pad_id)
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        end_ids = self._end_ids if sampling.end_id is None else [sampling.end_id]
        recorder = ChosenTokenLogProbs(self._rivals)
        with recorder.recording(self.model), _seeded(sampling.seed, self.device):
            sequences = self.model.generate(
                **batch,
                generation_config=self._generation_config(sampling, end_ids, pad_id),
                stopping_criteria=StoppingCriteriaList([recorder]),
            )
        generated = sequences[:, batch["input_ids"].shape[1] :].cpu().tolist()
        log_probs, rival_log_probs = recorder.log_probs(), recorder.rival_log_probs()
        return [
            self._answer(tokens, log_probs[:, row], rival_log_probs[:, row], end_ids)
            for row, tokens in enumerate(generated)
        ]

    def _generation_config(
        self, sampling: Sampling, end_ids: list[int], pad_id: int
    ) -> GenerationConfig:
        # A fresh config, not the checkpoint's: the request decides how to decode.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            num_beams=1,
            do_sample=sampling.sampled,
            eos_token_id=end_ids,
            pad_token_id=pad_id,
            bos_token_id=self.model.generation_config.bos_token_id,
        )
        if sampling.sampled:
            config.update(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )
        return config

    def _answer(
        self,
        tokens: list[int],
        log_probs: NDArray[np.float32],
        rival_log_probs: NDArray[np.float32],
        end_ids: list[int],
    ) -> Answer:
        """Text and rating log-prob of one sequence's new tokens (through its end token): over
        the vocabulary, or over Yes and No when a Yes/No token decided."""
        end = next((i + 1 for i, token in enumerate(tokens) if token in end_ids), len(tokens))
        tokens = tokens[:end]
        text = self._decode(tokens)
        index = decision_token_index(
            token_pieces(tokens, self._decode), self.settings.decision_pattern
        )
        if index is None:
            rating = math.nan
        elif tokens[index] in self._rival_of:
            rating = two_way_log_prob(float(log_probs[index]), float(rival_log_probs[index]))
        else:
            rating = float(log_probs[index])
        return Answer(text, rating, len(tokens))

    def _decode(self, tokens: Sequence[int]) -> str:
        # No space clean-up, so that each prefix decodes to a prefix (guard_answer.token_pieces).
        return str(
            self.tokenizer.decode(
                list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )


def rival_table(rival_of: Mapping[int, int], width: int) -> torch.Tensor:
    """[width] token ids: each Yes/No token's rival (`guard_answer.yes_no_rivals`), every other
    token itself. `width` is the logits' (the model's vocabulary may pad the tokenizer's)."""
    table = torch.arange(width, dtype=torch.long)
    for token, rival in rival_of.items():
        table[token] = rival
    return table


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed this call's random draws without moving the process's generators for later calls."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
