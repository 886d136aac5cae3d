"""The guard BLS model's logic, without Triton: request tensors in, the tensors of the calls to
`vision_encoder` and `tensorrt_llm` out, their outputs back into an answer.

    parse_settings        config parameters + engine config.json -> Settings (or why not)
    read_request          a request's input tensors -> GuardRequest (or InvalidRequestError)
    (square_padding)      LLaVA-1.5's padding of the image to a square, before the processor
    preprocess            processor + prompt + image -> token ids and the encoder's inputs
    prompt_table_ids      image tokens -> ids into the prompt-embedding table
    llm_inputs            ids + sampling + limits -> the `tensorrt_llm` request's tensors
    read_answer           `tensorrt_llm` outputs -> the answer text and rating_log_prob

A Yes/No answer (ICM-Assistant) is scored as ICM scores it, P(chosen) / (P(Yes) + P(No)) at the
deciding token (guard_answer). `output_log_probs` holds only the sampled token's log-prob, so
that needs the step's logits: with `yes_no_logits` on, the guard asks `tensorrt_llm` for its
`generation_logits` (the engine must be built with `--gather_generation_logits`) and reads the
Yes and No entries of the deciding step. Without them a Yes/No answer's rating_log_prob is NaN
(no confidence) rather than a number of another meaning.

TensorRT-LLM's multimodal convention (its p-tuning path): an input id >= the model's vocabulary
size v is not looked up in the embedding table; the row (id - v) of the request's
`prompt_embedding_table` is used instead. The processor expands the chat template's one
`<image>` into as many image tokens as the image has features, so replacing those, in order, by
v, v+1, ... puts row k of the encoder's table exactly where the HF model scatters feature k.

numpy and the standard library only; the processor is passed in (transformers, in the image).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from guard_answer import (
    DECISION_PATTERN,
    compile_decision_pattern,
    conversation,
    decision_token_index,
    token_pieces,
    two_way_log_prob,
)
from guard_request import (
    IMAGE_INPUT,
    MESSAGES_INPUT,
    InvalidRequestError,
    Turn,
    history_from_tensor,
    image_from_tensor,
)
from model_parameters import InvalidSettingsError, ModelParameters
from numpy.typing import NDArray

TEXT_INPUT = "text_input"
MAX_TOKENS_INPUT = "max_tokens"
JSON_SCHEMA_GUIDE = "json_schema"


@dataclass(frozen=True)
class EngineLimits:
    """What the LLM engine was built for (its config.json, written by trtllm-build)."""

    vocab_size: int
    max_input_len: int
    max_seq_len: int
    max_prompt_embedding_table_size: int
    max_batch_size: int

    @property
    def max_image_tokens(self) -> int:
        """The most prompt-table rows one request may bring.

        The executor splits the table evenly between the batch's slots: in NVIDIA/TensorRT-LLM
        `cpp/tensorrt_llm/batch_manager/promptTuningBuffers.cpp` (commit 2868d79, read here; the
        v1.2.1 tag could not be fetched) the per-request size is max_prompt_embedding_table_size
        / max batch size (integer division), and a larger request table fails that request as an
        internal error. The batch size is the engine's: the tensorrtllm backend gives the executor
        no max batch size (tensorrtllm_backend v0.19.0 `inflight_batcher_llm/src/
        model_instance_state.cc`, `/*maxBatchSize*/ std::nullopt`), so `TrtGptModel` takes the
        engine's (`cpp/tensorrt_llm/batch_manager/trtGptModel.h`, commit 2e2327b).
        """
        return self.max_prompt_embedding_table_size // self.max_batch_size


@dataclass(frozen=True)
class Settings:
    guard_model_name: str
    guard_model_version: str
    processor_dir: Path
    engine_dir: Path
    limits: EngineLimits
    guided_json_schema: str
    decision_pattern: re.Pattern[str]
    end_token: str
    pad_token: str
    max_image_side: int
    vision_encoder_model: str
    llm_model: str
    yes_no_logits: bool = False
    """Ask `tensorrt_llm` for the generation logits, to score Yes/No answers as ICM does."""
    pad_to_square: bool = False
    """Pad each image to a square of the processor's mean colour first (LLaVA-1.5)."""


@dataclass(frozen=True)
class Sampling:
    """A request's generation parameters; None where the request did not send one."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None


@dataclass(frozen=True)
class GuardRequest:
    prompt: str
    image: NDArray[np.uint8]
    sampling: Sampling
    history: tuple[Turn, ...] = ()
    """Earlier turns of a conversation about the image; `prompt` is the newest question."""


@dataclass(frozen=True)
class Preprocessed:
    """The processor's output for one request: token ids with the image tokens expanded, and the
    vision encoder's inputs (the anyres patches, or LLaVA-1.5's one, and the size of the image
    the processor was given)."""

    input_ids: NDArray[np.int64]
    pixel_values: NDArray[np.float16]
    image_sizes: NDArray[np.int64]


@dataclass(frozen=True)
class Answer:
    text: str
    rating_log_prob: float


class Processor(Protocol):
    """The parts of a transformers LlavaOnevisionProcessor or LlavaProcessor this model uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> str: ...

    def __call__(self, **kwargs: Any) -> Mapping[str, Any]: ...


# --- settings ----------------------------------------------------------------------------------


def read_engine_limits(engine_config: Mapping[str, Any]) -> EngineLimits:
    """The limits in a TensorRT-LLM engine's config.json ({"pretrained_config", "build_config"})."""
    try:
        pretrained = engine_config["pretrained_config"]
        build = engine_config["build_config"]
        limits = EngineLimits(
            vocab_size=int(pretrained["vocab_size"]),
            max_input_len=int(build["max_input_len"]),
            max_seq_len=int(build["max_seq_len"]),
            max_prompt_embedding_table_size=int(build["max_prompt_embedding_table_size"]),
            max_batch_size=int(build["max_batch_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidSettingsError(f"engine config.json: missing or invalid {exc}") from exc
    if limits.max_batch_size <= 0:
        raise InvalidSettingsError(
            f"engine config.json: max_batch_size {limits.max_batch_size} must be positive"
        )
    if limits.max_prompt_embedding_table_size <= 0:
        raise InvalidSettingsError(
            "engine config.json: max_prompt_embedding_table_size is 0: the engine was built "
            "without --max_multimodal_len and cannot take image features"
        )
    if limits.max_image_tokens == 0:
        raise InvalidSettingsError(
            f"engine config.json: max_prompt_embedding_table_size "
            f"{limits.max_prompt_embedding_table_size} is below max_batch_size "
            f"{limits.max_batch_size}: no request could bring an image (the executor gives each "
            "request table size / batch size rows)"
        )
    if not 0 < limits.max_input_len < limits.max_seq_len:
        raise InvalidSettingsError(
            f"engine config.json: max_input_len {limits.max_input_len} must be positive and "
            f"below max_seq_len {limits.max_seq_len}"
        )
    return limits


def parse_settings(parameters: Mapping[str, str], model_dir: Path) -> Settings:
    """Settings from config.pbtxt's parameters; relative paths are relative to `model_dir`."""
    read = ModelParameters(parameters)

    def path(name: str) -> Path:
        return model_dir / read.string(name, blank=False)  # an absolute value replaces model_dir

    def name(parameter: str) -> str:
        return read.string(parameter, blank=False).strip()

    # Blank, on purpose, turns the constraint off; anything else must be a JSON schema.
    schema = read.string("guided_json_schema").strip()
    if schema:
        read.json_object("guided_json_schema")
    try:
        pattern = compile_decision_pattern(read.string("decision_pattern") or DECISION_PATTERN)
    except ValueError as exc:
        raise InvalidSettingsError(str(exc)) from exc

    engine_dir = path("engine_dir")
    try:
        engine_config = json.loads((engine_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSettingsError(f"engine_dir: cannot read config.json: {exc}") from exc
    return Settings(
        guard_model_name=name("guard_model_name"),
        guard_model_version=name("guard_model_version"),
        processor_dir=path("processor_dir"),
        engine_dir=engine_dir,
        limits=read_engine_limits(engine_config),
        guided_json_schema=schema,
        decision_pattern=pattern,
        end_token=read.string("end_token"),
        pad_token=read.string("pad_token"),
        max_image_side=read.integer("max_image_side", minimum=1),
        vision_encoder_model=name("vision_encoder_model"),
        llm_model=name("llm_model"),
        yes_no_logits=read.boolean("yes_no_logits", default=False),
        pad_to_square=read.boolean("pad_to_square", default=False),
    )


def token_id(vocab: Mapping[str, int], token: str, parameter: str) -> int:
    """The id of a special token of the tokenizer's vocabulary, for end_token / pad_token."""
    if token not in vocab:
        raise InvalidSettingsError(f"parameter {parameter}: {token!r} is not in the vocabulary")
    return vocab[token]


# --- requests ----------------------------------------------------------------------------------


def _scalar(tensor: NDArray[Any] | None, name: str) -> Any:
    if tensor is None:
        return None
    if tensor.size != 1:
        raise InvalidRequestError(f"{name}: expected one value, got shape {list(tensor.shape)}")
    return tensor.reshape(-1)[0]


def read_request(get: Callable[[str], NDArray[Any] | None], max_image_side: int) -> GuardRequest:
    """A request from its input tensors; `get(name)` is the tensor as numpy, None if absent."""
    image = get(IMAGE_INPUT)
    if image is None:
        raise InvalidRequestError(f"{IMAGE_INPUT} is missing")
    raw_prompt = _scalar(get(TEXT_INPUT), TEXT_INPUT)
    if raw_prompt is None:
        raise InvalidRequestError(f"{TEXT_INPUT} is missing")
    try:
        prompt = raw_prompt.decode("utf-8") if isinstance(raw_prompt, bytes) else str(raw_prompt)
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{TEXT_INPUT}: not UTF-8: {exc}") from exc
    max_tokens = _scalar(get(MAX_TOKENS_INPUT), MAX_TOKENS_INPUT)
    if max_tokens is None:
        raise InvalidRequestError(f"{MAX_TOKENS_INPUT} is missing")
    if int(max_tokens) <= 0:
        raise InvalidRequestError(f"{MAX_TOKENS_INPUT}: must be positive, got {int(max_tokens)}")

    def optional(name: str, kind: type[float] | type[int]) -> Any:
        value = _scalar(get(name), name)
        if value is None:
            return None
        number = kind(value)
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidRequestError(f"{name}: must be finite, got {number}")
        return number

    sampling = Sampling(
        max_tokens=int(max_tokens),
        temperature=optional("temperature", float),
        top_p=optional("top_p", float),
        top_k=optional("top_k", int),
        seed=optional("seed", int),
        end_id=optional("end_id", int),
        pad_id=optional("pad_id", int),
    )
    if sampling.top_p is not None and not 0.0 < sampling.top_p <= 1.0:
        raise InvalidRequestError(f"top_p: must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k is not None and sampling.top_k < 0:
        raise InvalidRequestError(f"top_k: must not be negative, got {sampling.top_k}")
    return GuardRequest(
        prompt,
        image_from_tensor(image, max_image_side),
        sampling,
        history_from_tensor(get(MESSAGES_INPUT)),
    )


# --- preprocessing -----------------------------------------------------------------------------


def preprocess(
    processor: Processor,
    prompt: str,
    image: NDArray[np.uint8],
    history: Sequence[Turn] = (),
) -> Preprocessed:
    """The checkpoint's chat template and image processing, as the HF engine applies them."""
    text = processor.apply_chat_template(conversation(prompt, history), add_generation_prompt=True)
    # channels_last: without it an image 1 or 3 pixels high reads as channels-first.
    encoded = processor(
        images=image, text=text, return_tensors="np", input_data_format="channels_last"
    )
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    pixel_values, image_sizes = _vision_inputs(encoded, image)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise InvalidRequestError(f"processor: expected one sequence, got {input_ids.shape}")
    # [1, patches, 3, H, W]: one patch (LLaVA-1.5), or the base image plus the anyres grid's
    # crops (LLaVA-OneVision).
    if pixel_values.ndim != 5 or pixel_values.shape[0] != 1:
        raise InvalidRequestError(f"processor: unexpected pixel_values {pixel_values.shape}")
    return Preprocessed(
        input_ids=input_ids[0],
        pixel_values=pixel_values.astype(np.float16),
        image_sizes=image_sizes.reshape(1, 2),
    )


def _vision_inputs(
    encoded: Mapping[str, Any], image: NDArray[np.uint8]
) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """The processor's pixel_values as [1, patches, 3, H, W] and the image's (height, width).

    LLaVA-OneVision's processor gives both so. LLaVA-1.5's (`LlavaProcessor`, a
    `CLIPImageProcessor`) gives one [1, 3, H, W] crop per image and no `image_sizes`: the crop
    becomes the image's one patch, and the size is that of the image it was given.
    """
    pixel_values = np.asarray(encoded["pixel_values"])
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[:, None]
    sizes = encoded.get("image_sizes")
    image_sizes = np.asarray(image.shape[:2] if sizes is None else sizes, dtype=np.int64)
    return pixel_values, image_sizes


def prompt_table_ids(
    input_ids: NDArray[np.int64], image_token_id: int, vocab_size: int
) -> tuple[NDArray[np.int32], int]:
    """The ids with the k-th image token replaced by vocab_size + k, and the number replaced.

    The image's tokens must form one run: the chat template renders one `<image>`.
    """
    positions = np.flatnonzero(input_ids == image_token_id)
    count = int(positions.size)
    if count == 0:
        raise InvalidRequestError("the prompt has no image token: is the chat template right?")
    if int(positions[-1] - positions[0]) + 1 != count:
        raise InvalidRequestError("the prompt's image tokens are not one run: one image only")
    if int(input_ids.max()) >= vocab_size:
        raise InvalidRequestError("the prompt has token ids beyond the model's vocabulary")
    ids = input_ids.astype(np.int32)
    ids[positions] = vocab_size + np.arange(count, dtype=np.int32)
    return ids, count


def check_table(table_shape: Sequence[int], image_tokens: int) -> None:
    """The encoder's table must have one row per image token ([1, rows, hidden])."""
    rows = int(table_shape[-2]) if len(table_shape) >= 2 else -1
    if rows != image_tokens:
        raise ValueError(
            f"vision encoder returned {rows} feature rows for {image_tokens} image tokens: the "
            "processor and the encoder disagree on the image's token count"
        )


# --- the LLM call ------------------------------------------------------------------------------


def _one(value: Any, dtype: type[np.generic]) -> NDArray[Any]:
    return np.array([[value]], dtype=dtype)


def llm_inputs(
    ids: NDArray[np.int32],
    image_tokens: int,
    sampling: Sampling,
    limits: EngineLimits,
    *,
    end_id: int,
    pad_id: int,
    guided_json_schema: str,
    generation_logits: bool = False,
) -> dict[str, NDArray[Any]]:
    """The `tensorrt_llm` request's tensors, batch dimension first, except the prompt table.

    Greedy decoding (no temperature, or temperature <= 0) is sent as top_k 1: TensorRT-LLM only
    returns log-probs when a sampling parameter is set, and top_k 1 is what greedy is.
    `generation_logits` asks for every generated step's logits (`Settings.yes_no_logits`).
    """
    length = int(ids.shape[0])
    if length > limits.max_input_len:
        raise InvalidRequestError(
            f"the prompt is {length} tokens ({image_tokens} of them the image's), over the "
            f"engine's max_input_len {limits.max_input_len}: shorten the policy or the image"
        )
    if image_tokens > limits.max_image_tokens:
        raise InvalidRequestError(
            f"the image has {image_tokens} tokens, over the engine's {limits.max_image_tokens} "
            f"per request (max_multimodal_len {limits.max_prompt_embedding_table_size} / "
            f"max_batch_size {limits.max_batch_size}): send a smaller image"
        )
    tensors: dict[str, NDArray[Any]] = {
        "input_ids": ids.reshape(1, -1).astype(np.int32),
        "input_lengths": _one(length, np.int32),
        "request_output_len": _one(min(sampling.max_tokens, limits.max_seq_len - length), np.int32),
        "end_id": _one(end_id if sampling.end_id is None else sampling.end_id, np.int32),
        "pad_id": _one(pad_id if sampling.pad_id is None else sampling.pad_id, np.int32),
        "return_log_probs": _one(True, np.bool_),
        "exclude_input_in_output": _one(True, np.bool_),
    }
    if sampling.temperature is None or sampling.temperature <= 0.0:
        tensors["runtime_top_k"] = _one(1, np.int32)
    else:
        tensors["temperature"] = _one(sampling.temperature, np.float32)
        if sampling.top_k is not None:
            tensors["runtime_top_k"] = _one(sampling.top_k, np.int32)
        if sampling.top_p is not None or sampling.top_k is None:
            top_p = 1.0 if sampling.top_p is None else sampling.top_p
            tensors["runtime_top_p"] = _one(top_p, np.float32)
    if sampling.seed is not None:
        tensors["seed"] = _one(sampling.seed, np.uint64)
    if generation_logits:
        tensors["return_generation_logits"] = _one(True, np.bool_)
    if guided_json_schema:
        tensors["guided_decoding_guide_type"] = _one(JSON_SCHEMA_GUIDE.encode(), np.object_)
        tensors["guided_decoding_guide"] = _one(guided_json_schema.encode(), np.object_)
    return tensors


# --- the answer --------------------------------------------------------------------------------


def generated_ids(
    output_ids: NDArray[Any], sequence_length: NDArray[Any], stop_ids: Sequence[int]
) -> list[int]:
    """The generated tokens of the one beam ([1, 1, L] and [1, 1]), end and pad tokens cut."""
    length = int(np.asarray(sequence_length).reshape(-1)[0])
    ids = [int(i) for i in np.asarray(output_ids).reshape(-1)[:length]]
    while ids and ids[-1] in stop_ids:
        ids.pop()
    return ids


def read_answer(
    ids: Sequence[int],
    output_log_probs: NDArray[Any] | None,
    decode: Callable[[Sequence[int]], str],
    pattern: re.Pattern[str],
    rival_of: Mapping[int, int] | None = None,
    generation_logits: NDArray[Any] | None = None,
    *,
    greedy: bool = False,
) -> Answer:
    """The answer text (decode of all generated ids) and the deciding token's log-prob.

    `decode` must drop special tokens and not clean up spaces, so that the per-token pieces add
    up to the text (guard_answer.token_pieces). When the deciding token is a Yes/No token
    (`rival_of`, from guard_answer.yes_no_rivals), the log-prob is ICM's two-way one, read from
    `generation_logits` ([..., steps, vocabulary]; NaN without them). When decoding was
    `greedy`, the deciding token must be its row's argmax: if it is not, the rows are not the
    steps they should be, and the answer gets NaN rather than another step's probability.
    """
    text = decode(ids)
    pieces = token_pieces(ids, decode)
    index = decision_token_index(pieces, pattern)
    if index is None:
        return Answer(text, math.nan)
    rival = (rival_of or {}).get(ids[index])
    if rival is not None:
        return Answer(text, _two_way(generation_logits, index, ids[index], rival, greedy))
    log_prob = math.nan
    if output_log_probs is not None:
        values = np.asarray(output_log_probs, dtype=np.float32).reshape(-1)
        if index < values.size:
            log_prob = float(values[index])
    return Answer(text, log_prob)


def _two_way(
    logits: NDArray[Any] | None, step: int, chosen: int, rival: int, greedy: bool
) -> float:
    """log P(chosen) / (P(chosen) + P(rival)) from the raw logits of `step`; NaN without them."""
    if logits is None:
        return math.nan
    array = np.asarray(logits, dtype=np.float32)
    rows = array.reshape(-1, array.shape[-1])
    if step >= rows.shape[0] or max(chosen, rival) >= rows.shape[1]:
        return math.nan
    row = rows[step]
    if greedy and row[chosen] < row.max():
        return math.nan
    return two_way_log_prob(float(row[chosen]), float(row[rival]))
