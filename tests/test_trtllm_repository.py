"""The TensorRT-LLM model repository (triton_models/trtllm): all of it that runs without a GPU.

- The wiring: the client-facing `guard` declares the CPU guard's contract plus
  `rating_log_prob`; every tensor `guard` sends to `vision_encoder` and `tensorrt_llm` is declared
  there with its type and rank, every output it reads is declared, every required input is sent;
  the models it calls exist; the tensorrtllm backend finds the parameters it cannot load without.
- The BLS end to end, through a fake `triton_python_backend_utils`: the real `guard` model code,
  with the tiny LLaVA-OneVision checkpoint (tests/support/tiny_llava.py) standing in for the
  engines.
  The fake `vision_encoder` is the real feature packing fed by the tiny model's own vision tower
  and projector (what the TensorRT vision engine computes); the fake `tensorrt_llm` applies
  TensorRT-LLM's prompt-table rule (ids >= vocabulary size select table rows) and generates with
  the tiny model's language model. So the prompt the engine would see is checked against the HF
  model's own input embeddings, and the answer and its rating log-prob against the scripted
  checkpoint's.
- The pure functions of the BLS and of the vision encoder.

Not here (needs a GPU): the engines themselves, the real tensorrtllm backend, xgrammar.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import math
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.support import tiny_llava, tiny_llava15
from tests.support.lazy import lazy
from triton_models import fill
from triton_models.common import square_padding

torch = lazy("torch")  # imported by the first test that uses it, not by collection

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "triton_models" / "trtllm"
CPU_GUARD = ROOT / "triton_models" / "cpu" / "guard" / "config.pbtxt"

# The answer schema `python -m service schemas` writes, which build.sh fills in.
ANSWER_SCHEMA = json.loads(
    (ROOT / "service" / "schemas" / "answer.llavaguard-v1.2.json").read_text()
)
ENGINE_MAX_INPUT_LEN = 4096
ENGINE_MAX_SEQ_LEN = 4608
ENGINE_MAX_TABLE = 16 * 2048

DTYPES = {
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.bool_): "TYPE_BOOL",
    np.dtype(np.int32): "TYPE_INT32",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.uint64): "TYPE_UINT64",
    np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.object_): "TYPE_STRING",
}


# --- the filled repository ---------------------------------------------------------------------


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def sample_values(out: Path, processor_dir: Path) -> dict[str, str]:
    return {
        "engine_dir": str(out / "tensorrt_llm" / "1"),
        "processor_dir": str(processor_dir),
        "xgrammar_tokenizer_info_path": str(out / "tensorrt_llm" / "1" / "xgrammar.json"),
        "guided_json_schema": json.dumps(ANSWER_SCHEMA),
        "guard_model_name": "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        "guard_model_version": "test",
        "max_batch_size": "4",
        "llm_max_batch_size": "4",
    }


def engine_config(vocab_size: int) -> dict[str, Any]:
    """The parts of a trtllm-build config.json the guard reads."""
    return {
        "pretrained_config": {"architecture": "Qwen2ForCausalLM", "vocab_size": vocab_size},
        "build_config": {
            "max_batch_size": 4,
            "max_input_len": ENGINE_MAX_INPUT_LEN,
            "max_seq_len": ENGINE_MAX_SEQ_LEN,
            "max_prompt_embedding_table_size": ENGINE_MAX_TABLE,
        },
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llava.build(tmp_path_factory.mktemp("tiny") / "scripted", "scripted")


@pytest.fixture(scope="module")
def tiny_model(checkpoint: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def processor(checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, tiny_model: Any) -> Path:
    out = tmp_path_factory.mktemp("trtllm") / "models"
    fill.fill(TEMPLATE, out, sample_values(out, checkpoint))
    engine_dir = out / "tensorrt_llm" / "1"
    (engine_dir / "config.json").write_text(
        json.dumps(engine_config(tiny_model.config.text_config.vocab_size))
    )
    return out


@pytest.fixture(scope="module")
def configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {path.parent.name: read_config(path) for path in repository.glob("*/config.pbtxt")}


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


# --- the contract and the repository's shape ---------------------------------------------------


def test_the_repository_has_the_guard_and_the_models_it_calls(
    configs: dict[str, model_config_pb2.ModelConfig],
) -> None:
    assert set(configs) == {"guard", "vision_encoder", "tensorrt_llm"}
    for name, config in configs.items():
        assert config.name == name
    guard = parameters(configs["guard"])
    assert guard["vision_encoder_model"] in configs
    assert guard["llm_model"] in configs
    assert configs["vision_encoder"].backend == "python"
    assert configs["tensorrt_llm"].backend == "tensorrtllm"


def test_the_guard_declares_the_cpu_guards_contract_plus_rating_log_prob(
    configs: dict[str, model_config_pb2.ModelConfig],
) -> None:
    cpu = read_config(CPU_GUARD)
    guard = configs["guard"]
    assert list(guard.input) == list(cpu.input)
    assert list(guard.output)[: len(cpu.output)] == list(cpu.output)
    extra = list(guard.output)[len(cpu.output) :]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in extra] == [
        ("rating_log_prob", "TYPE_FP32", [1])
    ]
    # The client sends [1, ...] tensors: both batch.
    assert cpu.max_batch_size > 0
    assert guard.max_batch_size > 0


def test_the_guard_names_the_served_model(configs: dict[str, model_config_pb2.ModelConfig]) -> None:
    guard = parameters(configs["guard"])
    assert guard["guard_model_name"] == "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
    assert guard["guard_model_version"] == "test"


# The tensorrtllm backend's ModelState::GetParameter throws for a missing key; these are read
# without a fallback (model_instance_state.cc: getBatchingTypeFromParams,
# getGuidedDecodingConfigFromParams) or make the engine path.
BACKEND_REQUIRED = (
    "gpt_model_type",
    "gpt_model_path",
    "tokenizer_dir",
    "guided_decoding_backend",
    "xgrammar_tokenizer_info_path",
)
# Parsed with GetParameter<bool>, which accepts only these; anything else is silently the default.
BACKEND_BOOLEANS = (
    "enable_kv_cache_reuse",
    "enable_chunked_context",
    "exclude_input_in_output",
    "normalize_log_probs",
)
BACKEND_BOOLEAN_VALUES = {"True", "true", "TRUE", "1", "False", "false", "FALSE", "0"}


def test_the_tensorrt_llm_model_has_what_the_backend_requires(
    configs: dict[str, model_config_pb2.ModelConfig],
) -> None:
    llm = configs["tensorrt_llm"]
    values = parameters(llm)
    for key in BACKEND_REQUIRED:
        assert key in values, key
    assert values["gpt_model_type"] in {"inflight_fused_batching", "inflight_batching"}
    for key in BACKEND_BOOLEANS:
        assert values[key] in BACKEND_BOOLEAN_VALUES, key
    assert 0 < float(values["kv_cache_free_gpu_mem_fraction"]) < 1
    assert values["batch_scheduler_policy"] in {"guaranteed_no_evict", "max_utilization"}
    # Non-decoupled: the guard makes one request per answer and waits for it.
    assert not llm.model_transaction_policy.decoupled
    # Guided decoding is on whenever the guard sends a schema.
    assert values["guided_decoding_backend"] == "xgrammar"
    assert values["xgrammar_tokenizer_info_path"]


# The request fields the tensorrtllm backend reads (triton_backend/inflight_batcher_llm/src/
# utils.h, InputFieldsNames and the stop/streaming names, TensorRT-LLM 1.x): an input it does
# not know is ignored, so a misspelt one (0.x's "random_seed") would silently do nothing.
BACKEND_INPUTS = {
    "input_ids", "encoder_input_features", "encoder_output_lengths", "input_lengths",
    "decoder_input_ids", "request_output_len", "no_repeat_ngram_size", "num_return_sequences",
    "end_id", "pad_id", "bad_words_list", "stop_words_list", "embedding_bias",
    "context_phase_params", "cross_attention_mask", "skip_cross_attn_blocks",
    "multimodal_embedding", "return_log_probs", "return_generation_logits",
    "return_context_logits", "exclude_input_in_output", "return_perf_metrics", "beam_width",
    "runtime_top_k", "runtime_top_p", "runtime_top_k_min", "runtime_top_p_decay",
    "runtime_top_p_reset_ids", "temperature", "len_penalty", "early_stopping",
    "repetition_penalty", "min_tokens", "beam_search_diversity_rate", "presence_penalty",
    "frequency_penalty", "seed", "prompt_embedding_table", "prompt_table_extra_ids",
    "mrope_rotary_cos_sin", "mrope_position_deltas", "lora_task_id", "lora_weights",
    "lora_config", "draft_input_ids", "draft_logits", "draft_acceptance_threshold",
    "retention_token_range_starts", "retention_token_range_ends",
    "retention_token_range_priorities", "retention_token_range_durations_ms",
    "retention_decode_priority", "retention_decode_duration_ms", "guided_decoding_guide_type",
    "guided_decoding_guide", "lookahead_window_size", "lookahead_ngram_size",
    "lookahead_verification_set_size", "stop", "streaming",
}  # fmt: skip


def test_the_engine_declares_only_inputs_the_backend_reads(
    configs: dict[str, model_config_pb2.ModelConfig],
) -> None:
    declared = {i.name for i in configs["tensorrt_llm"].input}
    assert declared <= BACKEND_INPUTS, declared - BACKEND_INPUTS


def test_the_guard_and_the_engine_name_the_same_engine(
    configs: dict[str, model_config_pb2.ModelConfig],
) -> None:
    engine = parameters(configs["tensorrt_llm"])["gpt_model_path"]
    assert parameters(configs["guard"])["engine_dir"] == engine
    assert Path(engine).is_absolute()


def test_the_guard_refuses_an_invalid_schema_or_engine(repository: Path) -> None:
    spec = _import("trtllm_guard", repository / "guard" / "1")
    values = parameters(read_config(repository / "guard" / "config.pbtxt"))
    settings = spec.parse_settings(values, repository / "guard")
    assert settings.limits.max_input_len == ENGINE_MAX_INPUT_LEN
    assert json.loads(settings.guided_json_schema) == ANSWER_SCHEMA
    for change, message in [
        ({"guided_json_schema": "{not json"}, "guided_json_schema: not valid JSON"),
        ({"guided_json_schema": "[1]"}, "guided_json_schema: must be a JSON object, got list"),
        ({"decision_pattern": "no group"}, "needs at least one group"),
        ({"engine_dir": str(repository)}, "cannot read config.json"),
        ({"max_image_side": "0"}, "max_image_side: must be an integer of at least 1, got '0'"),
        ({"guard_model_name": " "}, "guard_model_name: must not be empty"),
        ({"engine_dir": ""}, "engine_dir: must not be empty"),
    ]:
        with pytest.raises(spec.InvalidSettingsError, match=re.escape(message)):
            spec.parse_settings({**values, **change}, repository / "guard")
    # An empty schema, on purpose, turns the constraint off.
    assert (
        spec.parse_settings(
            {**values, "guided_json_schema": " "}, repository / "guard"
        ).guided_json_schema
        == ""
    )


def test_engine_limits_refuse_an_engine_without_a_prompt_table(repository: Path) -> None:
    spec = _import("trtllm_guard", repository / "guard" / "1")
    config = engine_config(100)
    config["build_config"]["max_prompt_embedding_table_size"] = 0
    with pytest.raises(spec.InvalidSettingsError, match="--max_multimodal_len"):
        spec.read_engine_limits(config)
    with pytest.raises(spec.InvalidSettingsError, match="missing or invalid 'vocab_size'"):
        spec.read_engine_limits({"pretrained_config": {}, "build_config": {}})
    config = engine_config(100)
    config["build_config"]["max_seq_len"] = config["build_config"]["max_input_len"]
    with pytest.raises(spec.InvalidSettingsError, match="below max_seq_len"):
        spec.read_engine_limits(config)
    config = engine_config(100)
    del config["build_config"]["max_batch_size"]
    with pytest.raises(spec.InvalidSettingsError, match="missing or invalid 'max_batch_size'"):
        spec.read_engine_limits(config)
    config["build_config"]["max_batch_size"] = 0
    with pytest.raises(spec.InvalidSettingsError, match="max_batch_size 0 must be positive"):
        spec.read_engine_limits(config)
    # A table smaller than the batch leaves no row for any request.
    config["build_config"].update(max_batch_size=8, max_prompt_embedding_table_size=7)
    with pytest.raises(spec.InvalidSettingsError, match="no request could bring an image"):
        spec.read_engine_limits(config)


def test_each_request_gets_the_tables_share_of_one_batch_slot(repository: Path) -> None:
    spec = _import("trtllm_guard", repository / "guard" / "1")
    limits = spec.read_engine_limits(engine_config(100))
    assert limits.max_batch_size == 4
    assert limits.max_image_tokens == ENGINE_MAX_TABLE // 4
    config = engine_config(100)
    config["build_config"].update(max_batch_size=3, max_prompt_embedding_table_size=100)
    # Integer division, as the executor does.
    assert spec.read_engine_limits(config).max_image_tokens == 33


def test_filling_leaves_no_placeholder(repository: Path) -> None:
    for path in repository.rglob("*"):
        if path.is_file() and path.suffix in {".pbtxt", ".py", ".md", ".json"}:
            assert "${" not in path.read_text(), path
    assert not list(repository.rglob("*.tmpl"))
    # The shared module lands next to each Python model.
    assert (repository / "guard" / "1" / "guard_answer.py").is_file()
    assert (repository / "vision_encoder" / "1" / "guard_answer.py").is_file()


def test_filling_requires_the_engine_the_schema_and_the_served_models_name(tmp_path: Path) -> None:
    required = {p.name for p in fill.placeholders(TEMPLATE) if p.default is None}
    assert required == {
        "engine_dir",
        "xgrammar_tokenizer_info_path",
        "guided_json_schema",
        "guard_model_name",
        "guard_model_version",
    }
    with pytest.raises(fill.FillError, match="no value for"):
        fill.fill(TEMPLATE, tmp_path / "out", {"engine_dir": "/e"})


# --- the BLS, end to end, through a fake pb_utils ----------------------------------------------


class FakeTensor:
    def __init__(self, name: str, value: Any) -> None:
        self._name = name
        self._value = np.asarray(value) if not isinstance(value, np.ndarray) else value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> Any:
        return self._value

    def shape(self) -> list[int]:
        return list(self._value.shape)

    def is_cpu(self) -> bool:
        return True


class FakeError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: Any = None) -> None:
        self.outputs = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> Any:
        return self._error

    def output_tensors(self) -> list[FakeTensor]:
        return list(self.outputs.values())


class FakeRequest:
    """A client request (inputs only) or a BLS request (to `model_name`)."""

    models: ClassVar[dict[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {}
    calls: ClassVar[list[tuple[str, dict[str, FakeTensor], list[str]]]] = []

    def __init__(
        self,
        model_name: str = "",
        inputs: list[FakeTensor] | None = None,
        requested_output_names: list[str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.inputs = {t.name(): t for t in inputs or []}
        self.requested = list(requested_output_names or [])

    async def async_exec(self) -> FakeResponse:
        FakeRequest.calls.append((self.model_name, self.inputs, self.requested))
        try:
            outputs = FakeRequest.models[self.model_name](self.inputs)
        except Exception as exc:
            return FakeResponse(error=FakeError(f"{type(exc).__name__}: {exc}"))
        return FakeResponse([FakeTensor(n, v) for n, v in outputs.items() if n in self.requested])


def fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.InferenceRequest = FakeRequest  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda r, n: r.inputs.get(n)  # type: ignore[attr-defined]
    module.get_output_tensor_by_name = lambda r, n: r.outputs.get(n)  # type: ignore[attr-defined]
    module.Logger = types.SimpleNamespace(  # type: ignore[attr-defined]
        log_error=lambda m: None, log_warn=lambda m: None, log_info=lambda m: None
    )
    return module


def _import(name: str, directory: Path) -> Any:
    """A module of a model's version directory, imported as Triton's stub does (its siblings on
    sys.path); `model` modules get a unique name."""
    sys.path.insert(0, str(directory))
    try:
        unique = f"{name}_{directory.parent.name}"
        spec = importlib.util.spec_from_file_location(unique, directory / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # dataclasses look their module up while the class is made.
        sys.modules[unique] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(directory))


def check_call(
    config: model_config_pb2.ModelConfig, inputs: dict[str, FakeTensor], outputs: list[str]
) -> None:
    """A BLS call matches the callee's declaration: names, types, ranks (plus the batch
    dimension), required inputs present, requested outputs declared."""
    declared = {i.name: i for i in config.input}
    for name, tensor in inputs.items():
        assert name in declared, f"{config.name}: {name} is not declared"
        value = tensor.as_numpy()
        assert DTYPES[value.dtype] == model_config_pb2.DataType.Name(declared[name].data_type), name
        assert value.ndim == len(declared[name].dims) + 1, f"{config.name}: {name} {value.shape}"
        assert value.shape[0] == 1, name
    for name, declaration in declared.items():
        assert declaration.optional or name in inputs, f"{config.name}: {name} not sent"
    assert set(outputs) <= {o.name for o in config.output}


StandIns = dict[str, Callable[[dict[str, FakeTensor]], dict[str, Any]]]


@pytest.fixture(scope="module")
def fake_models(
    configs: dict[str, model_config_pb2.ModelConfig], repository: Path, tiny_model: Any
) -> StandIns:
    features = _import("vision_features", repository / "vision_encoder" / "1")
    layout = features.layouts(tiny_model.config, tiny_model.image_newline.detach())[
        "llava_onevision"
    ]

    @torch.no_grad()
    def vision_engine(patches: torch.Tensor) -> torch.Tensor:
        """What the TensorRT vision engine computes: tower, selected layer, projector."""
        hidden = tiny_model.vision_tower(patches.float(), output_hidden_states=True).hidden_states
        return tiny_model.multi_modal_projector(hidden[tiny_model.config.vision_feature_layer])

    return stand_ins(configs, features, layout, vision_engine, tiny_model)


def stand_ins(
    configs: dict[str, model_config_pb2.ModelConfig],
    features: Any,
    layout: Any,
    vision_engine: Callable[[torch.Tensor], torch.Tensor],
    tiny_model: Any,
) -> StandIns:
    """`vision_encoder` and `tensorrt_llm` as the guard calls them, each call checked against
    the callee's config: the real feature layout on `vision_engine`'s output (what the TensorRT
    vision engine computes), and TensorRT-LLM's prompt-table rule on the tiny model's language
    model, generating greedily."""
    vocab = tiny_model.config.text_config.vocab_size
    language = tiny_model.language_model

    def vision_encoder(inputs: dict[str, FakeTensor]) -> dict[str, Any]:
        pixels = torch.from_numpy(inputs["pixel_values"].as_numpy())
        size = tuple(int(s) for s in inputs["image_sizes"].as_numpy()[0])
        count = layout.patch_count(size)
        [rows] = features.run_batched([pixels[0, :count]], vision_engine, max_batch=3)
        table = layout.pack(rows, size)
        return {"prompt_embedding_table": table[None].numpy().astype(np.float16)}

    @torch.no_grad()
    def tensorrt_llm(inputs: dict[str, FakeTensor]) -> dict[str, Any]:
        ids = torch.from_numpy(inputs["input_ids"].as_numpy()[0].astype(np.int64))
        table = torch.from_numpy(inputs["prompt_embedding_table"].as_numpy()[0].astype(np.float32))
        embeds = prompt_tuning_embeddings(ids, table, vocab, language.get_input_embeddings())
        steps = int(inputs["request_output_len"].as_numpy()[0, 0])
        end_id = int(inputs["end_id"].as_numpy()[0, 0])
        assert int(inputs["runtime_top_k"].as_numpy()[0, 0]) == 1  # greedy, as the tests ask
        out = language.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=int(inputs["pad_id"].as_numpy()[0, 0]),
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = out.sequences[0, -len(out.scores) :]
        log_probs = [
            float(torch.log_softmax(score[0].float(), dim=-1)[token])
            for score, token in zip(out.scores, generated, strict=True)
        ]
        # TensorRT-LLM pads to the longest sequence of the batch; one sequence, 3 pad slots.
        padded = generated.tolist() + [end_id] * 3
        outputs = {
            "output_ids": np.array([[padded]], dtype=np.int32),
            "sequence_length": np.array([[len(generated)]], dtype=np.int32),
            "output_log_probs": np.array([[log_probs + [0.0] * 3]], dtype=np.float32),
            "cum_log_probs": np.array([[sum(log_probs)]], dtype=np.float32),
        }
        wants_logits = inputs.get("return_generation_logits")
        if wants_logits is not None and bool(wants_logits.as_numpy()[0, 0]):
            # The raw logits of each generated step, [1, beams, steps, vocabulary].
            logits = torch.stack([step[0] for step in out.logits]).float().numpy()
            outputs["generation_logits"] = logits[None, None]
        return outputs

    def checked(name: str, model: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[..., Any]:
        def call(inputs: dict[str, FakeTensor]) -> dict[str, Any]:
            check_call(configs[name], inputs, FakeRequest.calls[-1][2])
            return model(inputs)

        return call

    return {
        "vision_encoder": checked("vision_encoder", vision_encoder),
        "tensorrt_llm": checked("tensorrt_llm", tensorrt_llm),
    }


def prompt_tuning_embeddings(
    ids: torch.Tensor, table: torch.Tensor, vocab_size: int, embedding: torch.nn.Module
) -> torch.Tensor:
    """TensorRT-LLM's p-tuning lookup: id < vocab_size -> the token's embedding, else row
    (id - vocab_size) of the request's prompt table."""
    from_table = ids >= vocab_size
    embeds = embedding(torch.where(from_table, torch.zeros_like(ids), ids)).clone()
    embeds[from_table] = table[ids[from_table] - vocab_size].to(embeds.dtype)
    return embeds


@pytest.fixture(scope="module")
def guard(
    repository: Path, configs: dict[str, model_config_pb2.ModelConfig], fake_models: StandIns
) -> Iterator[Any]:
    yield from loaded_guard(repository, configs, fake_models)


def loaded_guard(
    repository: Path, configs: dict[str, model_config_pb2.ModelConfig], models: StandIns
) -> Iterator[Any]:
    """The repository's real `guard` model, initialised as Triton's stub would, calling
    `models` (`judge` routes its calls there)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
        module = _import("model", repository / "guard" / "1")
        model = module.TritonPythonModel()
        model.initialize(
            {
                "model_config": json.dumps(
                    json_format.MessageToDict(
                        configs["guard"],
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    )
                ),
                "model_repository": str(repository / "guard"),
            }
        )
        model.stand_ins = models
        yield model


def client_request(image: np.ndarray, prompt: str = "policy", **extra: Any) -> FakeRequest:
    tensors = [
        FakeTensor("text_input", np.array([[prompt.encode()]], dtype=np.object_)),
        FakeTensor("image_bytes_input", image[None, None]),
        FakeTensor("max_tokens", np.array([[500]], dtype=np.int32)),
    ]
    tensors += [FakeTensor(name, value) for name, value in extra.items()]
    return FakeRequest(inputs=tensors)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def judge(model: Any, requests: list[FakeRequest]) -> list[FakeResponse]:
    """The guard's answers to `requests`, its BLS calls going to its own stand-ins (the tests
    load a LLaVA-OneVision and a LLaVA-1.5 guard side by side)."""
    FakeRequest.calls.clear()
    FakeRequest.models = model.stand_ins
    try:
        responses: list[FakeResponse] = asyncio.run(model.execute(requests))
    finally:
        FakeRequest.models = {}
    return responses


def test_the_guard_answers_with_the_checkpoints_answer_and_its_rating_probability(
    guard: Any,
) -> None:
    # One patch; a grid that pads; a grid whose features are scaled down; an image 3 pixels high,
    # which the processor would read as channels-first unless told.
    sizes = [(20, 20), (40, 70), (190, 180), (3, 60)]
    responses = judge(
        guard, [client_request(image(h, w, seed)) for seed, (h, w) in enumerate(sizes)]
    )
    for response in responses:
        assert not response.has_error(), response.error().message()
        assert (
            response.outputs["text_output"].as_numpy()[0, 0].decode() == tiny_llava.SCRIPTED_ANSWER
        )
        log_prob = float(response.outputs["rating_log_prob"].as_numpy()[0, 0])
        assert log_prob == pytest.approx(math.log(tiny_llava.SCRIPTED_RATING_PROBABILITY), abs=1e-4)
    called = [model for model, _, _ in FakeRequest.calls]
    assert called.count("vision_encoder") == len(sizes)
    assert called.count("tensorrt_llm") == len(sizes)


def test_the_guard_sends_the_schema_and_greedy_sampling(guard: Any) -> None:
    judge(guard, [client_request(image(20, 20))])
    [(_, llm, _)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    assert llm["guided_decoding_guide_type"].as_numpy()[0, 0] == b"json_schema"
    assert json.loads(llm["guided_decoding_guide"].as_numpy()[0, 0]) == ANSWER_SCHEMA
    assert bool(llm["return_log_probs"].as_numpy()[0, 0])
    assert "temperature" not in llm


def test_with_yes_no_logits_the_guard_asks_for_the_logits_and_llavaguard_keeps_its_log_prob(
    guard: Any,
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guard, "_settings", dataclasses.replace(guard._settings, yes_no_logits=True))
        [response] = judge(guard, [client_request(image(20, 20))])
    [(_, llm, wanted)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    assert bool(llm["return_generation_logits"].as_numpy()[0, 0])
    assert "generation_logits" in wanted
    log_prob = float(response.outputs["rating_log_prob"].as_numpy()[0, 0])
    assert log_prob == pytest.approx(math.log(tiny_llava.SCRIPTED_RATING_PROBABILITY), abs=1e-4)
    # Off (the default): neither is asked for.
    judge(guard, [client_request(image(20, 20))])
    [(_, llm, wanted)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    assert "return_generation_logits" not in llm
    assert "generation_logits" not in wanted


def test_a_yes_no_decision_is_read_from_the_logits_of_its_step(guard: Any) -> None:
    # The scripted model's rating token and its rival stand in for Yes and No: the two-way
    # probability comes from the engine's logits at the deciding step, not from output_log_probs.
    tokenizer = guard._tokenizer
    safe, unsafe = (tiny_llava.token_id(tokenizer, t) for t in ("Safe", tiny_llava.SCRIPTED_RIVAL))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guard, "_rival_of", {safe: unsafe, unsafe: safe})
        patch.setattr(guard, "_settings", dataclasses.replace(guard._settings, yes_no_logits=True))
        [with_logits] = judge(guard, [client_request(image(20, 20))])
        patch.setattr(guard, "_settings", dataclasses.replace(guard._settings, yes_no_logits=False))
        [without] = judge(guard, [client_request(image(20, 20))])
    p = tiny_llava.SCRIPTED_RATING_PROBABILITY  # Safe against Unsafe: all of the step's mass
    assert float(with_logits.outputs["rating_log_prob"].as_numpy()[0, 0]) == pytest.approx(
        math.log(p), abs=1e-4
    )
    assert math.isnan(float(without.outputs["rating_log_prob"].as_numpy()[0, 0]))


def test_the_engines_prompt_is_the_hf_models_prompt(
    guard: Any, tiny_model: Any, processor: Any, repository: Path
) -> None:
    """The embeddings TensorRT-LLM would build from what the guard sends equal the input
    embeddings the HF model builds for the same prompt and image."""
    picture = image(50, 90, seed=7)
    judge(guard, [client_request(picture, prompt="Is this safe?")])
    [(_, llm, _)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    vocab = tiny_model.config.text_config.vocab_size
    ids = torch.from_numpy(llm["input_ids"].as_numpy()[0].astype(np.int64))
    table = torch.from_numpy(llm["prompt_embedding_table"].as_numpy()[0].astype(np.float32))
    with torch.no_grad():
        ours = prompt_tuning_embeddings(ids, table, vocab, tiny_model.get_input_embeddings())

    ga = _import("guard_answer", repository / "guard" / "1")
    text = processor.apply_chat_template(
        ga.conversation("Is this safe?"), add_generation_prompt=True
    )
    inputs = processor(images=picture, text=text, return_tensors="pt")
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = tiny_model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
            )
    finally:
        hook.remove()
    theirs = captured["embeds"][0]
    assert ours.shape == theirs.shape
    image_rows = ids >= vocab
    assert int(image_rows.sum()) == int(
        (inputs["input_ids"][0] == tiny_model.config.image_token_index).sum()
    )
    # Text rows are the same lookup. Image rows went through float16 twice (the pixels the
    # engine takes, the table it returns): rounding, not a row out of place (that would differ
    # by the features' own size, ~1).
    torch.testing.assert_close(ours[~image_rows], theirs[~image_rows], rtol=0, atol=0)
    difference = (ours[image_rows] - theirs[image_rows]).abs()
    size = theirs[image_rows].abs().mean()
    assert float(size) > 0.1
    assert float(difference.max()) < 2e-2
    assert float(difference.mean() / size) < 5e-3


def test_a_conversation_reaches_the_engine_rendered_by_the_chat_template(
    guard: Any, processor: Any, repository: Path
) -> None:
    picture = image(40, 40, seed=3)
    turns = [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Yes."}]
    messages = np.array([[json.dumps(turns).encode()]], dtype=np.object_)
    [answered] = judge(guard, [client_request(picture, prompt="Why?", messages=messages)])
    assert not answered.has_error(), answered.error()
    [(_, llm, _)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    ga = _import("guard_answer", repository / "guard" / "1")
    history = [("user", "Is it safe?"), ("assistant", "Yes.")]
    text = processor.apply_chat_template(
        ga.conversation("Why?", history), add_generation_prompt=True
    )
    expected = processor(images=picture, text=text, return_tensors="np")["input_ids"][0]
    sent = llm["input_ids"].as_numpy()[0]
    # Image tokens become prompt-table ids (past the vocabulary); the text around them is the
    # conversation's, turn by turn.
    assert len(sent) == len(expected)
    text_rows = expected != processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert sent[text_rows].tolist() == expected[text_rows].tolist()
    assert (sent[~text_rows] >= len(processor.tokenizer)).all()
    assert "Is it safe?" in processor.tokenizer.decode(sent[text_rows])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"top_p": np.array([[0.0]], dtype=np.float32)}, "top_p"),
        ({"top_k": np.array([[-1]], dtype=np.int32)}, "top_k"),
        ({"temperature": np.array([[np.nan]], dtype=np.float32)}, "finite"),
        ({"max_tokens": np.array([[0]], dtype=np.int32)}, "max_tokens"),
    ],
)
def test_the_guard_refuses_bad_sampling_alone(
    guard: Any, extra: dict[str, Any], message: str
) -> None:
    good = client_request(image(20, 20))
    bad = client_request(image(20, 20))
    for name, value in extra.items():
        bad.inputs[name] = FakeTensor(name, value)
    responses = judge(guard, [bad, good])
    assert responses[0].has_error()
    assert responses[0].error().code() == "INVALID_ARG"
    assert message in responses[0].error().message()
    assert not responses[1].has_error()


def test_the_guard_refuses_images_it_cannot_take(guard: Any) -> None:
    wide = client_request(image(10, 1025))
    no_image = client_request(image(10, 10))
    del no_image.inputs["image_bytes_input"]
    two = client_request(image(10, 10))
    two.inputs["image_bytes_input"] = FakeTensor(
        "image_bytes_input", np.zeros((1, 2, 4, 4, 3), np.uint8)
    )
    responses = judge(guard, [wide, no_image, two])
    messages = [r.error().message() for r in responses]
    assert "max_image_side 1024" in messages[0]
    assert "image_bytes_input is missing" in messages[1]
    assert "expected [1, 1, H, W, 3], got [1, 2, 4, 4, 3]" in messages[2]
    assert all(r.error().code() == "INVALID_ARG" for r in responses)
    assert not FakeRequest.calls


def test_an_engine_error_fails_that_request_only(guard: Any, fake_models: StandIns) -> None:
    original = fake_models["tensorrt_llm"]

    def failing(inputs: dict[str, FakeTensor]) -> dict[str, Any]:
        if inputs["input_ids"].as_numpy().shape[1] % 2:
            raise RuntimeError("out of KV cache")
        return original(inputs)

    fake_models["tensorrt_llm"] = failing
    try:
        # Different prompt lengths: one odd, one even.
        responses = judge(
            guard, [client_request(image(20, 20), prompt=p) for p in ("policy", "policy two")]
        )
    finally:
        fake_models["tensorrt_llm"] = original
    lengths = [
        c[1]["input_ids"].as_numpy().shape[1] for c in FakeRequest.calls if c[0] == "tensorrt_llm"
    ]
    assert len({n % 2 for n in lengths}) == 2
    for response, length in zip(responses, lengths, strict=True):
        if length % 2:
            assert response.error().code() == "INTERNAL"
            assert "tensorrt_llm: RuntimeError: out of KV cache" in response.error().message()
        else:
            assert not response.has_error()


def test_the_guard_refuses_an_image_over_its_share_of_the_prompt_table(guard: Any) -> None:
    big, small = image(190, 180), image(20, 20)
    judge(guard, [client_request(big)])
    [(_, llm, _)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    tokens = llm["prompt_embedding_table"].as_numpy().shape[1]
    settings = guard._settings
    # The whole table holds the big image; its share of one batch slot does not.
    limits = dataclasses.replace(
        settings.limits, max_prompt_embedding_table_size=4 * tokens - 1, max_batch_size=4
    )
    guard._settings = dataclasses.replace(settings, limits=limits)
    try:
        responses = judge(guard, [client_request(big), client_request(small)])
    finally:
        guard._settings = settings
    assert responses[0].error().code() == "INVALID_ARG"
    assert f"the image has {tokens} tokens, over the engine's {tokens - 1} per request" in (
        responses[0].error().message()
    )
    assert not responses[1].has_error()
    # Refused before the engine: the small image alone reached it.
    assert [name for name, _, _ in FakeRequest.calls].count("tensorrt_llm") == 1


def test_the_guard_refuses_prompts_longer_than_the_engine_takes(guard: Any) -> None:
    [response] = judge(
        guard, [client_request(image(20, 20), prompt="safe " * ENGINE_MAX_INPUT_LEN)]
    )
    assert response.error().code() == "INVALID_ARG"
    assert f"over the engine's max_input_len {ENGINE_MAX_INPUT_LEN}" in response.error().message()


# --- pure functions ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tg(repository: Path) -> Any:
    return _import("trtllm_guard", repository / "guard" / "1")


def test_image_tokens_become_prompt_table_ids_in_order(tg: Any) -> None:
    ids, count = tg.prompt_table_ids(np.array([5, 9, 9, 9, 6]), image_token_id=9, vocab_size=100)
    assert ids.tolist() == [5, 100, 101, 102, 6]
    assert count == 3
    assert ids.dtype == np.int32
    with pytest.raises(tg.InvalidRequestError, match="no image token"):
        tg.prompt_table_ids(np.array([5, 6]), image_token_id=9, vocab_size=100)
    with pytest.raises(tg.InvalidRequestError, match="one run"):
        tg.prompt_table_ids(np.array([9, 5, 9]), image_token_id=9, vocab_size=100)
    with pytest.raises(tg.InvalidRequestError, match="beyond the model's vocabulary"):
        tg.prompt_table_ids(np.array([9, 100]), image_token_id=9, vocab_size=100)


LIMITS = dict(
    vocab_size=100,
    max_input_len=50,
    max_seq_len=60,
    max_prompt_embedding_table_size=40,
    max_batch_size=2,
)


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({}, {"runtime_top_k": 1}),
        ({"temperature": 0.0, "top_k": 50}, {"runtime_top_k": 1}),
        (
            {"temperature": 0.2, "top_p": 0.95, "top_k": 50},
            {"temperature": 0.2, "runtime_top_p": 0.95, "runtime_top_k": 50},
        ),
        ({"temperature": 0.7}, {"temperature": 0.7, "runtime_top_p": 1.0}),
        ({"temperature": 0.7, "top_k": 5}, {"temperature": 0.7, "runtime_top_k": 5}),
        ({"seed": 2**63 + 1}, {"runtime_top_k": 1, "seed": 2**63 + 1}),
    ],
)
def test_sampling_maps_to_the_engines_inputs(
    tg: Any, sampling: dict[str, Any], expected: dict[str, Any]
) -> None:
    tensors = tg.llm_inputs(
        np.arange(10, dtype=np.int32),
        4,
        tg.Sampling(max_tokens=500, **sampling),
        tg.EngineLimits(**LIMITS),
        end_id=7,
        pad_id=8,
        guided_json_schema="",
    )
    knobs = {"temperature", "runtime_top_p", "runtime_top_k", "seed"}
    assert {k: tensors[k][0, 0].item() for k in knobs & set(tensors)} == pytest.approx(expected)
    # max_tokens is capped by what the engine has left after the prompt.
    assert tensors["request_output_len"].tolist() == [[50]]
    assert tensors["input_lengths"].tolist() == [[10]]
    assert (tensors["end_id"].item(), tensors["pad_id"].item()) == (7, 8)
    assert "guided_decoding_guide" not in tensors


def test_the_requests_end_and_pad_ids_win(tg: Any) -> None:
    tensors = tg.llm_inputs(
        np.arange(3, dtype=np.int32),
        1,
        tg.Sampling(max_tokens=5, end_id=1, pad_id=2),
        tg.EngineLimits(**LIMITS),
        end_id=7,
        pad_id=8,
        guided_json_schema="{}",
    )
    assert (tensors["end_id"].item(), tensors["pad_id"].item()) == (1, 2)
    assert tensors["request_output_len"].item() == 5


def test_too_many_image_tokens_are_refused(tg: Any) -> None:
    # 40 rows for a batch of 2: 20 per request, though the whole table would hold 21.
    tensors = tg.llm_inputs(
        np.arange(45, dtype=np.int32),
        20,
        tg.Sampling(max_tokens=5),
        tg.EngineLimits(**LIMITS),
        end_id=7,
        pad_id=8,
        guided_json_schema="",
    )
    assert tensors["input_lengths"].item() == 45
    message = "21 tokens, over the engine's 20 per request (max_multimodal_len 40 / max_batch_size"
    with pytest.raises(tg.InvalidRequestError, match=re.escape(message)):
        tg.llm_inputs(
            np.arange(45, dtype=np.int32),
            21,
            tg.Sampling(max_tokens=5),
            tg.EngineLimits(**LIMITS),
            end_id=7,
            pad_id=8,
            guided_json_schema="",
        )


def test_generated_ids_stop_at_the_sequence_length_and_drop_end_tokens(tg: Any) -> None:
    ids = tg.generated_ids(np.array([[[4, 5, 7, 7, 7]]]), np.array([[3]]), [7, 8])
    assert ids == [4, 5]
    assert tg.generated_ids(np.array([[[7]]]), np.array([[1]]), [7]) == []


def test_the_answer_has_no_log_prob_without_a_decision(tg: Any, repository: Path) -> None:
    ga = _import("guard_answer", repository / "guard" / "1")
    pattern = ga.compile_decision_pattern(ga.DECISION_PATTERN)
    pieces = {1: '{"rating": "', 2: "Unsafe", 3: '"}', 4: "hello"}

    def decode(ids: Any) -> str:
        return "".join(pieces[i] for i in ids)

    answer = tg.read_answer([1, 2, 3], np.array([[[-0.1, -0.7, -0.2]]]), decode, pattern)
    assert answer.text == '{"rating": "Unsafe"}'
    assert answer.rating_log_prob == pytest.approx(-0.7)
    assert math.isnan(tg.read_answer([4], np.array([[[-0.1]]]), decode, pattern).rating_log_prob)
    assert math.isnan(tg.read_answer([1, 2], None, decode, pattern).rating_log_prob)


def test_a_yes_no_answer_is_scored_two_ways_from_the_logits(tg: Any, repository: Path) -> None:
    ga = _import("guard_answer", repository / "guard" / "1")
    pattern = ga.compile_decision_pattern(ga.DECISION_PATTERN)
    vocab = {"Yes": 1, "No": 2, ", because": 3, '{"rating": "': 4, "Unsafe": 5, "Maybe": 6}
    pieces = {i: token for token, i in vocab.items()}
    rival_of = ga.yes_no_rivals(vocab)

    def decode(ids: Any) -> str:
        return "".join(pieces[i] for i in ids)

    # Step 0's raw logits: P(Yes) 0.6, P(No) 0.3, "Maybe" 0.1 (ids 0..6).
    first = np.log([1e-9, 0.6, 0.3, 1e-9, 1e-9, 1e-9, 0.1]) + 7.0
    logits = np.stack([first, np.zeros(7)])[None, None].astype(np.float32)
    sampled = np.array([[[-0.05, -0.01]]])  # the sampled distribution's: not used for Yes/No
    yes = tg.read_answer([1, 3], sampled, decode, pattern, rival_of, logits)
    no = tg.read_answer([2, 3], sampled, decode, pattern, rival_of, logits)
    assert yes.text == "Yes, because"
    assert math.exp(yes.rating_log_prob) == pytest.approx(0.6 / 0.9, abs=1e-5)
    assert math.exp(no.rating_log_prob) == pytest.approx(0.3 / 0.9, abs=1e-5)
    # Without the logits there is no Yes/No confidence; a LlavaGuard answer keeps its log-prob.
    assert math.isnan(tg.read_answer([1, 3], sampled, decode, pattern, rival_of).rating_log_prob)
    rated = tg.read_answer([4, 5], np.array([[[-0.1, -0.7]]]), decode, pattern, rival_of, logits)
    assert rated.rating_log_prob == pytest.approx(-0.7)
    # Greedy: the answer's token is its row's argmax, or the rows are another step's.
    greedy = tg.read_answer([1, 3], sampled, decode, pattern, rival_of, logits, greedy=True)
    assert greedy.rating_log_prob == pytest.approx(yes.rating_log_prob)
    shifted = tg.read_answer([2, 3], sampled, decode, pattern, rival_of, logits, greedy=True)
    assert math.isnan(shifted.rating_log_prob)


def test_the_tables_row_count_must_match_the_image_tokens(tg: Any) -> None:
    tg.check_table([1, 12, 896], 12)
    with pytest.raises(ValueError, match="11 feature rows for 12 image tokens"):
        tg.check_table([1, 11, 896], 12)


def expand_to_square_with_pil(picture: np.ndarray, fill_rgb: tuple[int, int, int]) -> np.ndarray:
    """LLaVA-1.5's padding as its own code performs it, with PIL: a square canvas of the longer
    side in `fill_rgb`, the image pasted (side - shorter) // 2 along the shorter side
    (haotian-liu/LLaVA llava/mm_utils.py, expand2square)."""
    from PIL import Image

    pasted = Image.fromarray(picture)
    width, height = pasted.size
    if width == height:
        return picture
    canvas = Image.new("RGB", (max(width, height),) * 2, fill_rgb)
    canvas.paste(
        pasted, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    )
    return np.asarray(canvas)


@pytest.mark.parametrize("size", [(20, 31), (31, 20), (5, 5), (1, 7), (8, 3), (2, 1)])
def test_pad_to_square_is_llavas_padding(size: tuple[int, int]) -> None:
    picture = image(*size, seed=sum(size))
    fill_rgb = (122, 116, 104)
    padded = square_padding.pad_to_square(picture, fill_rgb)
    np.testing.assert_array_equal(padded, expand_to_square_with_pil(picture, fill_rgb))
    assert padded.dtype == np.uint8
    assert padded.shape == (max(size), max(size), 3)


def test_the_padding_colour_is_the_processors_mean_truncated() -> None:
    # CLIP's mean (openai/clip-vit-large-patch14-336's preprocessor_config.json), times 255,
    # truncated as LLaVA's tuple(int(x * 255) for x in image_mean) does.
    assert square_padding.mean_fill_rgb([0.48145466, 0.4578275, 0.40821073]) == (122, 116, 104)
    # SigLIP's, for comparison.
    assert square_padding.mean_fill_rgb([0.5, 0.5, 0.5]) == (127, 127, 127)
    with pytest.raises(ValueError, match="not RGB"):
        square_padding.mean_fill_rgb([0.5])


# --- the vision encoder's pure functions -------------------------------------------------------


@pytest.fixture(scope="module")
def vf(repository: Path) -> Any:
    return _import("vision_features", repository / "vision_encoder" / "1")


@pytest.mark.parametrize("size", [(32, 32), (20, 70), (70, 20), (64, 96), (190, 180), (192, 192)])
def test_onevision_packing_is_the_hf_models(
    vf: Any, tiny_model: Any, size: tuple[int, int]
) -> None:
    config = tiny_model.config
    newline = tiny_model.image_newline.detach()
    layout = vf.layouts(config, newline)["llava_onevision"]
    count = layout.patch_count(size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    features = torch.randn(
        count,
        side * side,
        config.text_config.hidden_size,
        generator=torch.Generator().manual_seed(1),
    )
    ours = layout.pack(features, size)
    theirs, lengths = tiny_model.pack_image_features(
        [features],
        torch.tensor([size]),
        image_newline=newline,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    assert [int(n) for n in lengths] == [ours.shape[0]]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_batched_runs_respect_the_engines_batch_and_keep_each_requests_patches(vf: Any) -> None:
    runs: list[int] = []

    def run(batch: torch.Tensor) -> torch.Tensor:
        runs.append(batch.shape[0])
        return batch * 2

    patches = [torch.full((n, 1), float(i)) for i, n in enumerate([3, 1, 5, 2])]
    outputs = vf.run_batched(patches, run, max_batch=4)
    assert runs == [4, 4, 3]
    for i, (given, got) in enumerate(zip(patches, outputs, strict=True)):
        assert got.shape == given.shape
        assert bool((got == 2 * i).all())
    with pytest.raises(ValueError, match="max_batch"):
        vf.run_batched(patches, run, max_batch=0)


def test_a_llava_one_patch_image_is_its_features(vf: Any) -> None:
    features = torch.randn(1, 576, 8)
    assert vf.LLAVA.patch_count((336, 500)) == 1
    torch.testing.assert_close(vf.LLAVA.pack(features, (336, 500)), features[0])
    with pytest.raises(ValueError, match="one patch"):
        vf.LLAVA.pack(torch.randn(2, 576, 8), (1, 1))


# --- the build tool's Python helpers -----------------------------------------------------------

DEPLOY = ROOT / "deploy" / "trtllm"
POLICY = ROOT / "service" / "policies" / "llavaguard-v1.2.toml"


@pytest.fixture(scope="module")
def smoke() -> Any:
    return _import("smoke_test", DEPLOY)


def test_the_smoke_test_judges_an_image_through_a_real_triton(
    smoke: Any, embedded_stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against the CPU guard of the embedded stack: the same HTTP requests, the same checks."""
    schema = {**ANSWER_SCHEMA, "properties": {**ANSWER_SCHEMA["properties"]}}
    schema["properties"]["category"] = {"type": "string"}
    del schema["additionalProperties"]  # the CPU guard adds "model"
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    code = smoke.main(
        [
            "--url", embedded_stack.triton_http,
            "--policy", str(POLICY),
            "--schema", str(schema_file),
            "--sequential", "2",
            "--burst", "4",
            "--concurrency", "2",
            "--max-side", "256",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert json.loads(summary["answer"])["rating"] in {"Safe", "Unsafe"}
    assert summary["image"] == [192, 256, 3]
    assert summary["latency_s"]["n"] == 2
    assert summary["throughput"]["images_per_s"] > 0
    # The CPU guard does not declare rating_log_prob, so none is asked for.
    assert summary["rating_log_prob"] is None


def test_the_smoke_test_finds_what_is_wrong_with_an_answer(smoke: Any) -> None:
    assert (
        smoke.check_answer(
            '{"rating": "Safe", "category": "NA: None applying", "rationale": ""}', ANSWER_SCHEMA
        )
        == []
    )
    assert smoke.check_answer("Safe.", ANSWER_SCHEMA)[0].startswith("not JSON")
    assert smoke.check_answer("[1]", ANSWER_SCHEMA) == ["not a JSON object"]
    assert smoke.check_answer('{"rating": "Maybe", "x": 1, "rationale": 2}', ANSWER_SCHEMA) == [
        "'category' missing",
        "'rating': 'Maybe' not one of the schema's values",
        "'x' not allowed",
        "'rationale': not a string",
    ]


def test_the_smoke_tests_request_is_the_consumers(smoke: Any) -> None:
    picture = image(3, 4)
    body, length = smoke.infer_body(
        "policy", picture, {"max_tokens": 500, "temperature": 0.2, "top_p": 0.95, "top_k": 50},
        ["text_output", "rating_log_prob"],
    )  # fmt: skip
    header = json.loads(body[:length])
    shapes = {i["name"]: (i["datatype"], i["shape"]) for i in header["inputs"]}
    assert shapes == {
        "text_input": ("BYTES", [1, 1]),
        "image_bytes_input": ("UINT8", [1, 1, 3, 4, 3]),
        "max_tokens": ("INT32", [1, 1]),
        "temperature": ("FP32", [1, 1]),
        "top_p": ("FP32", [1, 1]),
        "top_k": ("INT32", [1, 1]),
    }
    binary = body[length:]
    assert sum(i["parameters"]["binary_data_size"] for i in header["inputs"]) == len(binary)
    # BYTES: a 4-byte little-endian length, then the UTF-8 text; then the image's pixels.
    assert binary[:10] == b"\x06\x00\x00\x00policy"
    assert binary[10 : 10 + picture.size] == picture.tobytes()


ICM_POLICY = ROOT / "service" / "policies" / "icm-assistant-v1.toml"


def test_the_smoke_test_reads_answers_in_the_policys_format(smoke: Any) -> None:
    from service.core.policies import PolicyRegistry

    icm = PolicyRegistry.policy_in(ICM_POLICY)
    llavaguard = PolicyRegistry.policy_in(POLICY)
    assert smoke.unreadable("Yes. R06: the belly is exposed.", icm) == []
    assert smoke.unreadable("no", icm) == []
    json_answer = '{"rating": "Safe", "category": "NA: None applying", "rationale": "ok"}'
    assert smoke.unreadable(json_answer, llavaguard) == []
    [problem] = smoke.unreadable("Maybe.", icm)
    assert problem.startswith("unreadable as answer format icm-yes-no: answer starts with")
    [problem] = smoke.unreadable("Yes.", llavaguard)
    assert problem.startswith("unreadable as answer format llavaguard-json")
    [problem] = smoke.unreadable(json_answer, icm)
    assert "unreadable as answer format icm-yes-no" in problem


@pytest.fixture(scope="module")
def limits() -> Any:
    return _import("limits", DEPLOY)


def test_limits_bound_every_images_tokens(limits: Any, processor: Any) -> None:
    side = 96
    found = limits.compute(
        processor, "policy", max_image_side=side, max_batch_size=8, max_new_tokens=100, headroom=0
    )
    # The processor's own expansion of <image>, on images of many sizes, never exceeds the
    # bound, and reaches it.
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rng = np.random.default_rng(3)
    sizes = [found.largest_image, (side, side), (1, side), (side, 1)]
    sizes += [tuple(int(n) for n in rng.integers(1, side + 1, 2)) for _ in range(12)]
    counts = []
    for height, width in sizes:
        ids = processor(
            images=np.zeros((height, width, 3), np.uint8),
            text="<image>",
            input_data_format="channels_last",
        )["input_ids"][0]
        counts.append(sum(1 for i in ids if i == image_id))
    assert max(counts) == found.max_image_tokens == counts[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "policy"}]}],
        add_generation_prompt=True,
    )
    assert found.prompt_tokens == len(processor.tokenizer(text)["input_ids"]) - 1
    assert found.max_input_len % 64 == 0
    assert found.max_input_len >= found.prompt_tokens + found.max_image_tokens
    assert found.max_seq_len == found.max_input_len + 100
    assert found.max_multimodal_len == 8 * found.max_image_tokens
    # The tiny checkpoint's grid is LlavaGuard's (6x6 crops), 32 px for 384.
    assert found.max_patches == 10  # 96 px is 3 crops a side, as 1152 px is for the real model
    assert "MAX_INPUT_LEN=" in found.shell()


def test_limits_of_a_llava_15_processor_are_one_patch_of_its_features(
    limits: Any, icm_processor: Any
) -> None:
    import copy

    found = limits.compute(
        icm_processor, "Is it?", max_image_side=96, max_batch_size=8, max_new_tokens=100, headroom=0
    )
    image_id = icm_processor.tokenizer.convert_tokens_to_ids(icm_processor.image_token)
    for height, width in [(40, 90), (96, 96), (1, 96)]:
        ids = icm_processor(
            images=np.zeros((height, width, 3), np.uint8),
            text=icm_processor.image_token,
            input_data_format="channels_last",
        )["input_ids"][0]
        assert sum(1 for i in ids if i == image_id) == found.max_image_tokens
    assert found.max_image_tokens == tiny_llava15.IMAGE_FEATURES
    assert found.max_patches == 1
    assert found.max_multimodal_len == 8 * found.max_image_tokens
    text = icm_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it?"}]}],
        add_generation_prompt=True,
    )
    # The template and text with LLaMA's <s>, the one <image> not counted.
    assert found.prompt_tokens == len(icm_processor.tokenizer(text)["input_ids"]) - 1
    # CLIP-336's preprocessing, as ICM-LLaVA's processor has it: 576 tokens, whatever the size.
    clip = copy.deepcopy(icm_processor)
    for key, value in CLIP_336.items():
        setattr(clip.image_processor, key, value)
    assert (
        limits.compute(
            clip, "Is it?", max_image_side=1024, max_batch_size=16, max_new_tokens=1, headroom=0
        ).max_multimodal_len
        == 16 * CLIP_336_TOKENS
    )
    # A processor the llava engine would not match is refused.
    for attribute, value, message in [
        ("patch_size", None, "does not expand <image>"),
        ("vision_feature_select_strategy", "full", "drops the class token"),
    ]:
        changed = copy.deepcopy(icm_processor)
        setattr(changed, attribute, value)
        with pytest.raises(ValueError, match=message):
            limits.compute(
                changed, "p", max_image_side=96, max_batch_size=8, max_new_tokens=1, headroom=0
            )


def test_the_xgrammar_tokenizer_info_lists_the_vocabulary_in_id_order(processor: Any) -> None:
    module = _import("xgrammar_tokenizer_info", DEPLOY)
    tokenizer = processor.tokenizer
    info = module.tokenizer_info(tokenizer, ["<|im_end|>"])
    vocab = tokenizer.get_vocab()
    assert len(info["encoded_vocab"]) == len(vocab)
    assert all(info["encoded_vocab"][i] == token for token, i in vocab.items())
    assert info["stop_token_ids"] == [vocab["<|im_end|>"]]
    assert json.loads(info["tokenizer_str"])["model"]["type"] == "BPE"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        module.tokenizer_info(tokenizer, ["<|eot|>"])


# --- the checkpoint's layout for TensorRT-LLM's loader -----------------------------------------

# transformers >= 4.52's names -> the older ones TensorRT-LLM reads, for the tests' side.
NEWER_NAMES = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "image_newline": "model.image_newline",
}


@pytest.fixture(scope="module")
def layout() -> Any:
    return _import("checkpoint_layout", DEPLOY)


def copy_checkpoint(source: Path, target: Path, *, architectures: str | None) -> Path:
    import shutil

    shutil.copytree(source, target)
    if architectures is not None:
        config = json.loads((target / "config.json").read_text())
        config["text_config"]["architectures"] = [architectures]
        (target / "config.json").write_text(json.dumps(config))
    return target


def resave_with_newer_names(layout: Any, directory: Path) -> dict[str, str]:
    """What transformers >= 4.52 saves: the same tensors under the newer names, and an index."""
    [weights] = directory.glob("*.safetensors")
    names = [n for n in layout.read_header(weights) if n != "__metadata__"]
    assert all(n.startswith(tuple(NEWER_NAMES)) for n in names), "not the older layout"
    renames = {}
    for name in names:
        prefix = next(p for p in NEWER_NAMES if name.startswith(p))
        renames[name] = NEWER_NAMES[prefix] + name[len(prefix) :]
    renamed = directory / "renamed.tmp"
    layout.rename_tensors(weights, renamed, renames)
    renamed.replace(weights)
    index = {"metadata": {}, "weight_map": {new: weights.name for new in renames.values()}}
    (directory / layout.INDEX).write_text(json.dumps(index))
    return renames


def run_layout(layout: Any, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = layout.main(list(args))
    return code, capsys.readouterr().err


def test_transformers_here_saves_the_names_tensorrt_llm_reads(
    layout: Any, checkpoint: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """transformers 4.47 writes language_model.model.* (the tiny checkpoint); its text config
    has no architectures, which TensorRT-LLM's config reader needs: filled in by --fix."""
    names = layout.read_header(checkpoint / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in names
    assert "language_model.lm_head.weight" in names  # the scripted checkpoint is untied
    code, err = run_layout(layout, capsys, "--hf-dir", str(checkpoint))
    assert code == 2
    assert "text_config.architectures is missing" in err
    assert "names" not in err.split("architectures is missing")[1]  # no renaming needed
    code, err = run_layout(
        layout, capsys, "--hf-dir", str(checkpoint), "--fix", str(tmp_path / "f")
    )
    assert code == 0, err
    fixed = tmp_path / "f"
    config = json.loads((fixed / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["Qwen2ForCausalLM"]
    # The weights are the checkpoint's own files, linked.
    assert (fixed / "model.safetensors").resolve() == (checkpoint / "model.safetensors").resolve()
    assert run_layout(layout, capsys, "--hf-dir", str(fixed))[0] == 0
    # --fix writes into an empty directory only.
    code, err = run_layout(layout, capsys, "--hf-dir", str(checkpoint), "--fix", str(fixed))
    assert code == 2
    assert "--fix needs an empty directory" in err


def test_a_checkpoint_with_the_newer_names_is_named_and_renamed_back(
    layout: Any, checkpoint: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    newer = copy_checkpoint(checkpoint, tmp_path / "newer", architectures="Qwen2ForCausalLM")
    renames = resave_with_newer_names(layout, newer)
    code, err = run_layout(layout, capsys, "--hf-dir", str(newer))
    assert code == 2
    assert "transformers >= 4.52's names" in err
    assert "(lm_head.*, model.image_newline*, model.language_model.*" in err
    assert "reads language_model.model.* and language_model.lm_head.*" in err
    assert "architectures" not in err
    fixed = tmp_path / "fixed"
    code, err = run_layout(layout, capsys, "--hf-dir", str(newer), "--fix", str(fixed))
    assert code == 0, err
    assert f"{len(renames)} tensors renamed back" in err
    assert run_layout(layout, capsys, "--hf-dir", str(fixed))[0] == 0
    index = json.loads((fixed / layout.INDEX).read_text())
    assert set(index["weight_map"]) == set(renames)
    # The same tensors, byte for byte, under the original names: safetensors reads them back.
    from safetensors.numpy import load_file

    original = load_file(str(checkpoint / "model.safetensors"))
    back = load_file(str(fixed / "model.safetensors"))
    assert set(back) == set(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)
    assert not (fixed / "model.safetensors").is_symlink()


def test_missing_language_model_weights_are_named(
    layout: Any, checkpoint: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = copy_checkpoint(checkpoint, tmp_path / "broken", architectures="Qwen2ForCausalLM")
    weights = broken / "model.safetensors"
    layout.rename_tensors(weights, tmp_path / "w", {"language_model.lm_head.weight": "head"})
    (tmp_path / "w").replace(weights)
    code, err = run_layout(layout, capsys, "--hf-dir", str(broken), "--fix", str(tmp_path / "f"))
    assert code == 2
    assert "the weights lack language_model.lm_head.weight" in err
    assert not (tmp_path / "f").exists()
    code, err = run_layout(layout, capsys, "--hf-dir", str(broken), "--model-type", "llava")
    assert code == 2
    assert "model_type is 'llava_onevision', not 'llava'" in err


@pytest.fixture(scope="module")
def tiny_llava_15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5 checkpoint (CLIP + LLaMA) as transformers saves one."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llava15") / "tiny"
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


def test_a_llava_15_checkpoint_is_checked_the_same_way(
    layout: Any, tiny_llava_15: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_layout(layout, capsys, "--hf-dir", str(tiny_llava_15), "--model-type", "llava")
    assert code == 2
    assert "['LlamaForCausalLM']" in err
    newer = copy_checkpoint(tiny_llava_15, tmp_path / "newer", architectures="LlamaForCausalLM")
    renames = resave_with_newer_names(layout, newer)
    assert not any("image_newline" in name for name in renames)  # LLaVA-1.5 has none
    code, err = run_layout(layout, capsys, "--hf-dir", str(newer))
    assert code == 2
    assert "transformers >= 4.52's names" in err
    assert "llama/model.py" in err
    code, err = run_layout(layout, capsys, "--hf-dir", str(newer), "--fix", str(tmp_path / "f"))
    assert code == 0, err
    names = layout.read_header(tmp_path / "f" / "model.safetensors")
    assert names.keys() - {"__metadata__"} == set(renames)
    # A LLaMA text config is not converted as a LLaVA-OneVision one.
    config = json.loads((newer / "config.json").read_text())
    config["model_type"] = "llava_onevision"
    (newer / "config.json").write_text(json.dumps(config))
    code, err = run_layout(layout, capsys, "--hf-dir", str(newer))
    assert code == 2
    assert "text_config.model_type is 'llama'" in err


# An original-format LLaVA-1.5 config.json, as haotian-liu/LLaVA publishes its checkpoints
# (LlavaLlamaForCausalLM, the vision tower and projector named, no vision_config; its model_type
# is "llava", transformers' own, so the type alone does not tell it apart): the keys that do.
ORIGINAL_LLAVA_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava",
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_projector_type": "mlp2x_gelu",
    "image_aspect_ratio": "pad",
    "hidden_size": 4096,
}


def test_an_original_format_llava_checkpoint_is_refused_with_the_conversion_command(
    layout: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(ORIGINAL_LLAVA_CONFIG))
    for args in (["--config-only"], ["--fix", str(tmp_path / "f")], []):
        code, err = run_layout(
            layout, capsys, "--hf-dir", str(tmp_path), "--model-type", "llava", *args
        )
        assert code == 2
        assert (
            "original LLaVA format (mm_vision_tower, mm_projector_type, no vision_config, "
            "model_type 'llava')" in err
        )
        assert layout.CONVERT_COMMAND in err
        assert "openai/clip-vit-large-patch14-336" in err
    assert not (tmp_path / "f").exists()
    assert (
        "deploy/icm/convert_llava.py --original DIR --vision-tower DIR --out"
        in layout.CONVERT_COMMAND
    )


def test_config_only_reads_no_weights(
    layout: Any, checkpoint: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    # No weights at all: the full check refuses, the config check passes.
    assert run_layout(layout, capsys, "--hf-dir", str(tmp_path), "--config-only")[0] == 0
    code, err = run_layout(layout, capsys, "--hf-dir", str(tmp_path))
    assert code == 2
    assert "no *.safetensors files" in err
    code, err = run_layout(
        layout, capsys, "--hf-dir", str(tmp_path), "--model-type", "llava", "--config-only"
    )
    assert code == 2
    assert "model_type is 'llava_onevision', not 'llava'" in err


# --- build.sh, dry: every step but the GPU's ---------------------------------------------------

FAKE_TRTLLM = {
    "__init__.py": '__version__ = "1.2.1"\n',
    "mapping.py": "class Mapping:\n    def __init__(self, **kw):\n        self.kw = kw\n",
    "models/__init__.py": """
import json, pathlib

class _FromLlava:
    MODEL_TYPE = TEXT_ARCHITECTURE = None

    @classmethod
    def from_hugging_face(cls, path, dtype, mapping):
        # What the real loader needs (deploy/trtllm/checkpoint_layout.py): its model type, the
        # text model's class in text_config.architectures, the weights under
        # language_model.model.*.
        model = cls()
        config = json.loads((pathlib.Path(path) / "config.json").read_text())
        assert config["model_type"] == cls.MODEL_TYPE, config["model_type"]
        assert config["text_config"]["architectures"] == [cls.TEXT_ARCHITECTURE]
        header = (pathlib.Path(path) / "model.safetensors").read_bytes()[:1 << 20]
        assert b'"language_model.model.embed_tokens.weight"' in header
        model.config = {
            "architecture": cls.TEXT_ARCHITECTURE,
            "dtype": dtype,
            "vocab_size": config["text_config"]["vocab_size"],
        }
        return model

    def save_checkpoint(self, out, save_config):
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(out) / "config.json").write_text(json.dumps(self.config))

class QWenForCausalLM(_FromLlava):
    MODEL_TYPE, TEXT_ARCHITECTURE = "llava_onevision", "Qwen2ForCausalLM"

class LLaMAForCausalLM(_FromLlava):
    MODEL_TYPE, TEXT_ARCHITECTURE = "llava", "LlamaForCausalLM"
""",
    "tools/__init__.py": "",
    "tools/multimodal_builder.py": """
import json, pathlib

def add_multimodal_arguments(parser):
    for name in ("--model_type", "--model_path", "--output_dir"):
        parser.add_argument(name)
    parser.add_argument("--max_batch_size", type=int)
    return parser

class MultimodalEngineBuilder:
    def __init__(self, args):
        self.args = args

    def build(self):
        out = pathlib.Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.engine").write_bytes(b"engine")
        builder = {"model_type": self.args.model_type, "max_batch_size": self.args.max_batch_size}
        (out / "config.json").write_text(json.dumps({"builder_config": builder}))
""",
}
# trtllm-build: records its arguments (a flag without a value, as --gather_generation_logits, as
# true) and the checkpoint it built from, writes what the guard reads from a real engine's config.
FAKE_TRTLLM_BUILD = """#!/usr/bin/env python3
import json, pathlib, sys
args, words = {}, sys.argv[1:]
while words:
    name = words.pop(0)
    args[name] = words.pop(0) if words and not words[0].startswith("--") else True
out = pathlib.Path(args["--output_dir"])
out.mkdir(parents=True)
checkpoint = json.loads((pathlib.Path(args["--checkpoint_dir"]) / "config.json").read_text())
with open(out.parent / "trtllm-build.args", "w") as f:
    json.dump({**args, "checkpoint": checkpoint}, f)
build = {key: int(args["--" + key]) for key in (
    "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
    "max_prompt_embedding_table_size")}
build["gather_generation_logits"] = args.get("--gather_generation_logits", False)
(out / "config.json").write_text(json.dumps(
    {"pretrained_config": {"vocab_size": checkpoint["vocab_size"]}, "build_config": build}))
(out / "rank0.engine").write_bytes(b"engine")
"""


def fake_gpu_image(root: Path) -> dict[str, str]:
    """The pinned image's tools, stubbed under `root` (the fake tensorrt_llm wheel, trtllm-build,
    nvidia-smi, a tritonserver that fails): the environment build.sh runs in."""
    for name, text in FAKE_TRTLLM.items():
        (root / "py" / "tensorrt_llm" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "py" / "tensorrt_llm" / name).write_text(text)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    scripts = {
        # The test's interpreter (its virtualenv has transformers), as the image's python3.
        "python3": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
        "trtllm-build": FAKE_TRTLLM_BUILD,
        "nvidia-smi": "#!/bin/sh\necho 'Fake GPU, 81559 MiB, 0'\n",
        "tritonserver": "#!/bin/sh\nexit 1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": f"{root / 'py'}:{ROOT}",
        "HOME": str(root),
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def dry_build(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Any]:
    import subprocess

    root = tmp_path_factory.mktemp("build")
    env = fake_gpu_image(root)
    schema = root / "schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    command = [
        "bash", str(DEPLOY / "build.sh"), "--model", "0.5b", "--schema", str(schema),
        "--hf-dir", str(checkpoint), "--out", str(root / "models"), "--work", str(root / "work"),
        "--max-image-side", "96", "--max-batch-size", "4", "--skip-smoke",
    ]  # fmt: skip
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return {"root": root, "first": first, "again": again, "command": command, "env": env}


def test_build_sh_writes_a_servable_repository(
    dry_build: dict[str, Any], tg: Any, checkpoint: Path
) -> None:
    first = dry_build["first"]
    assert first.returncode == 0, first.stderr
    # The tiny checkpoint's text config has no architectures: converted from a fixed copy (the
    # fake loader insists on them).
    assert "text_config.architectures is missing" in first.stderr
    assert "checkpoint_layout: fixed into" in first.stderr
    models = dry_build["root"] / "models"
    info = json.loads((models / "build-info.json").read_text())
    # The engines and the checkpoint's processor files, not its weights.
    assert (models / "tensorrt_llm" / "1" / "rank0.engine").is_file()
    assert (models / "tensorrt_llm" / "1" / "xgrammar_tokenizer_info.json").is_file()
    assert (models / "vision_encoder" / "1" / "engine" / "model.engine").is_file()
    assert (models / "guard" / "1" / "hf" / "tokenizer.json").is_file()
    assert (models / "guard" / "1" / "hf" / "chat_template.json").is_file()
    assert not list((models / "guard" / "1" / "hf").glob("*.safetensors"))
    for path in models.rglob("config.pbtxt"):
        assert "${" not in path.read_text()
        read_config(path)
    # The guard loads with the engine it was built with, and names the served checkpoint.
    guard = parameters(read_config(models / "guard" / "config.pbtxt"))
    settings = tg.parse_settings(guard, models / "guard")
    assert settings.guard_model_name == "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
    # The HF engine's fingerprint of the same checkpoint: both engines name it alike.
    identity = _import("checkpoint_identity", ROOT / "triton_models" / "hf" / "guard" / "1")
    assert settings.guard_model_version == identity.fingerprint(checkpoint)
    assert json.loads(settings.guided_json_schema) == ANSWER_SCHEMA
    assert settings.max_image_side == 96
    assert settings.limits.max_input_len == info["max_input_len"]
    # max_multimodal_len = batch x the most tokens an image of the side becomes.
    assert settings.limits.max_prompt_embedding_table_size == 4 * info["max_image_tokens"]
    # ... so that each of the batch's requests can bring the largest image.
    assert settings.limits.max_batch_size == 4
    assert settings.limits.max_image_tokens == info["max_image_tokens"]
    # The CUDA pool holds a full batch of prompt tables per guard instance (2), in whole MiB.
    tables = 2 * info["max_multimodal_len"] * tiny_llava_hidden(checkpoint) * 2
    assert info["cuda_memory_pool_bytes"] == -(-tables // (1 << 20)) * (1 << 20)
    llm = parameters(read_config(models / "tensorrt_llm" / "config.pbtxt"))
    assert llm["gpt_model_path"] == str(models / "tensorrt_llm" / "1")
    assert Path(llm["xgrammar_tokenizer_info_path"]).is_file()
    vision = json.loads((models / "vision_encoder" / "1" / "engine" / "config.json").read_text())
    assert vision["builder_config"] == {
        "model_type": "llava_onevision",
        "max_batch_size": 2 * info["max_patches"],
    }
    args = json.loads(
        (dry_build["root"] / "work" / "0.5b" / "engine" / "trtllm-build.args").read_text()
    )
    assert args["--kv_cache_type"] == "paged"
    assert args["--use_paged_context_fmha"] == "enable"
    assert args["--remove_input_padding"] == "enable"
    assert args["--gemm_plugin"] == "float16"
    # LlavaGuard: Qwen2, a JSON answer whose log-prob needs no logits, the processor's own images.
    assert args["checkpoint"]["architecture"] == "Qwen2ForCausalLM"
    assert "--gather_generation_logits" not in args
    assert not settings.yes_no_logits
    assert not settings.pad_to_square
    assert (settings.end_token, settings.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert llm["guided_decoding_backend"] == "xgrammar"


def tiny_llava_hidden(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["text_config"]["hidden_size"])


def test_build_sh_skips_what_is_done_and_keeps_a_full_repository(dry_build: dict[str, Any]) -> None:
    again = dry_build["again"]
    assert again.returncode == 2
    assert "checkpoint layout already checked" in again.stderr
    assert "already converted" in again.stderr
    assert "LLM engine already built" in again.stderr
    assert "vision engine already built" in again.stderr
    assert "is not empty (--force replaces its contents)" in again.stderr


def test_build_sh_refuses_another_tensorrt_llm(dry_build: dict[str, Any]) -> None:
    import subprocess

    fake = dry_build["root"] / "py" / "tensorrt_llm" / "__init__.py"
    original = fake.read_text()
    fake.write_text('__version__ = "1.3.0rc20"\n')
    try:
        result = subprocess.run(
            dry_build["command"], env=dry_build["env"], capture_output=True, text=True, timeout=60
        )
    finally:
        fake.write_text(original)
    assert result.returncode == 2
    assert "TensorRT-LLM 1.3.0rc20, the build is pinned to 1.2.1" in result.stderr


def test_build_sh_refuses_a_checkpoint_tensorrt_llm_cannot_load(
    dry_build: dict[str, Any], layout: Any, checkpoint: Path, tmp_path: Path
) -> None:
    import subprocess

    broken = copy_checkpoint(checkpoint, tmp_path / "broken", architectures=None)
    weights = broken / "model.safetensors"
    layout.rename_tensors(weights, tmp_path / "w", {"language_model.model.norm.weight": "norm"})
    (tmp_path / "w").replace(weights)
    command = list(dry_build["command"])
    command[command.index("--hf-dir") + 1] = str(broken)
    command[command.index("--work") + 1] = str(tmp_path / "work")
    result = subprocess.run(
        command, env=dry_build["env"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "the weights lack language_model.model.norm.weight" in result.stderr
    assert "TensorRT-LLM cannot convert" in result.stderr
    assert "2/8" not in result.stderr


# --- ICM-LLaVA-v1.5-7B (LLaVA-1.5): build.sh, then the BLS on what it wrote --------------------

# openai/clip-vit-large-patch14-336's preprocessing, which ICM-LLaVA's converted processor keeps:
# the tiny checkpoint's processor at this size expands <image> as the real one does.
CLIP_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
CLIP_336_TOKENS = (336 // 14) ** 2  # 576
ICM_NAME = "zhaoyuzhi/ICM-LLaVA-v1.5-7B"


@pytest.fixture(scope="module")
def icm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA-1.5 (CLIP 28 px, patch 14: 4 image features; LLaMA) scripted to answer
    Yes or No, in transformers' llava format (what deploy/icm/convert_llava.py writes)."""
    return tiny_llava15.build(tmp_path_factory.mktemp("tiny15") / "yes-no", "yes-no")


@pytest.fixture(scope="module")
def icm_model(icm_checkpoint: Path) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(icm_checkpoint).eval()


@pytest.fixture(scope="module")
def icm_processor(icm_checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(icm_checkpoint)


def with_image_processor(checkpoint: Path, target: Path, **changes: Any) -> Path:
    """A copy of `checkpoint` whose preprocessor_config.json has `changes`."""
    import shutil

    shutil.copytree(checkpoint, target)
    config = json.loads((target / "preprocessor_config.json").read_text())
    (target / "preprocessor_config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.fixture(scope="module")
def icm_dry_build(tmp_path_factory: pytest.TempPathFactory, icm_checkpoint: Path) -> dict[str, Any]:
    """build.sh --model icm-7b, default batch (16), GPU tools stubbed, on the tiny checkpoint
    with CLIP-336's preprocessing, so the limits are ICM-LLaVA's own (the model is not run)."""
    import subprocess

    root = tmp_path_factory.mktemp("icm-build")
    env = fake_gpu_image(root)
    hf_dir = with_image_processor(icm_checkpoint, root / "icm-hf", **CLIP_336)
    command = [
        "bash", str(DEPLOY / "build.sh"), "--model", "icm-7b", "--hf-dir", str(hf_dir),
        "--out", str(root / "models"), "--work", str(root / "work"), "--skip-smoke",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return {"root": root, "result": result, "command": command, "env": env, "hf_dir": hf_dir}


def test_build_sh_builds_icm_llava_as_llama_with_logits_and_no_grammar(
    icm_dry_build: dict[str, Any], tg: Any
) -> None:
    result = icm_dry_build["result"]
    assert result.returncode == 0, result.stderr
    assert "converting the language model (LLaMA)" in result.stderr
    assert "6/8 no guided decoding (the answer is prose)" in result.stderr
    root = icm_dry_build["root"]
    models = root / "models"
    configs = {path.parent.name: read_config(path) for path in models.glob("*/config.pbtxt")}
    assert set(configs) == {"guard", "vision_encoder", "tensorrt_llm"}
    info = json.loads((models / "build-info.json").read_text())
    assert info["max_image_tokens"] == CLIP_336_TOKENS
    assert info["max_patches"] == 1
    args = json.loads((root / "work" / "icm-7b" / "engine" / "trtllm-build.args").read_text())
    # The fake wheel's LLaMA loader converted it (it insists on a llava config, LlamaForCausalLM
    # in text_config.architectures, the language_model.model.* names).
    assert args["checkpoint"]["architecture"] == "LlamaForCausalLM"
    assert args["--gather_generation_logits"] is True
    assert args["--max_prompt_embedding_table_size"] == str(16 * 576)
    vision = json.loads((models / "vision_encoder" / "1" / "engine" / "config.json").read_text())
    # One 336-px crop per image: the engine's batch is the images per run (--vision-images 2).
    assert vision["builder_config"] == {"model_type": "llava", "max_batch_size": 2}
    assert not (models / "tensorrt_llm" / "1" / "xgrammar_tokenizer_info.json").exists()
    llm = parameters(configs["tensorrt_llm"])
    assert llm["guided_decoding_backend"] == llm["xgrammar_tokenizer_info_path"] == ""
    settings = tg.parse_settings(parameters(configs["guard"]), models / "guard")
    assert settings.guard_model_name == ICM_NAME
    assert settings.guided_json_schema == ""
    assert settings.yes_no_logits
    assert settings.pad_to_square
    assert (settings.end_token, settings.pad_token) == ("</s>", "</s>")
    assert settings.limits.max_image_tokens == CLIP_336_TOKENS
    assert settings.limits.max_batch_size == 16
    assert (info["yes_no_logits"], info["pad_to_square"], info["guided_json_schema"]) == (
        True,
        True,
        False,
    )


def test_build_sh_refuses_an_original_llava_checkpoint_before_reading_it(
    icm_dry_build: dict[str, Any], tmp_path: Path
) -> None:
    import subprocess

    original = tiny_llava15.build_original(tmp_path / "original")
    command = list(icm_dry_build["command"])
    command[command.index("--hf-dir") + 1] = str(original)
    command[command.index("--work") + 1] = str(tmp_path / "work")
    env = icm_dry_build["env"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "config.json is the original LLaVA format" in result.stderr
    assert "python deploy/icm/convert_llava.py --original DIR --vision-tower DIR" in result.stderr
    assert "version sha256:" not in result.stderr  # refused before the fingerprint
    # Without --hf-dir (the hub has the original only), and with a schema (prose answers).
    for change, message in [
        (["--hf-dir"], "--model icm-7b needs --hf-dir"),
        (["--schema", "x.json"], "answers in prose"),
    ]:
        if change == ["--hf-dir"]:
            at = command.index("--hf-dir")
            changed = command[:at] + command[at + 2 :]
        else:
            changed = command + change
        result = subprocess.run(changed, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert message in result.stderr


@pytest.fixture(scope="module")
def icm_repository(
    icm_dry_build: dict[str, Any], icm_checkpoint: Path, tmp_path_factory: Any
) -> Path:
    """The repository build.sh wrote for icm-7b, its processor files the tiny checkpoint's own
    again (28 px, which its vision tower takes), its engine config build.sh's."""
    import shutil

    assert icm_dry_build["result"].returncode == 0, icm_dry_build["result"].stderr
    out = tmp_path_factory.mktemp("icm-served") / "models"
    shutil.copytree(icm_dry_build["root"] / "models", out)
    for name in ("preprocessor_config.json", "processor_config.json"):
        shutil.copy(icm_checkpoint / name, out / "guard" / "1" / "hf" / name)
    return out


@pytest.fixture(scope="module")
def icm_guard(icm_repository: Path, icm_model: Any) -> Iterator[Any]:
    configs = {p.parent.name: read_config(p) for p in icm_repository.glob("*/config.pbtxt")}
    features = _import("vision_features", icm_repository / "vision_encoder" / "1")
    config = icm_model.config

    @torch.no_grad()
    def llava_engine(patches: torch.Tensor) -> torch.Tensor:
        """What TensorRT-LLM's llava vision engine computes (multimodal_builder,
        build_llava_engine): the selected layer's features without the class token, projected."""
        hidden = icm_model.vision_tower(patches.float(), output_hidden_states=True).hidden_states
        return icm_model.multi_modal_projector(hidden[config.vision_feature_layer][:, 1:])

    layout = features.layouts(config, None)["llava"]
    models = stand_ins(configs, features, layout, llava_engine, icm_model)
    yield from loaded_guard(icm_repository, configs, models)


ICM_SIZES = [(28, 28), (20, 50), (50, 20), (3, 60), (90, 40)]


def test_the_icm_guard_answers_yes_with_icms_two_way_confidence(icm_guard: Any) -> None:
    responses = judge(
        icm_guard,
        [
            client_request(image(h, w, seed), prompt="Is it?")
            for seed, (h, w) in enumerate(ICM_SIZES)
        ],
    )
    p = tiny_llava.YES_NO_PROBABILITIES
    for response in responses:
        assert not response.has_error(), response.error().message()
        assert response.outputs["text_output"].as_numpy()[0, 0].decode() == "".join(
            tiny_llava.YES_NO_ANSWERS["Yes"]
        )
        # ICM's score of the Yes it gave, P(Yes) / (P(Yes) + P(No)), not the 0.6 of the whole
        # vocabulary: from the deciding step's logits.
        log_prob = float(response.outputs["rating_log_prob"].as_numpy()[0, 0])
        assert log_prob == pytest.approx(math.log(p["Yes"] / (p["Yes"] + p["No"])), abs=1e-4)


def test_the_icm_guard_sends_one_square_patch_no_grammar_and_asks_for_logits(
    icm_guard: Any, icm_processor: Any
) -> None:
    judge(icm_guard, [client_request(image(20, 50), prompt="Is it?")])
    [(_, encoder, _)] = [call for call in FakeRequest.calls if call[0] == "vision_encoder"]
    [(_, llm, wanted)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    crop = icm_processor.image_processor.crop_size
    assert encoder["pixel_values"].shape() == [1, 1, 3, crop["height"], crop["width"]]
    assert encoder["image_sizes"].as_numpy().tolist() == [[50, 50]]  # the padded image's size
    assert "guided_decoding_guide" not in llm
    assert "guided_decoding_guide_type" not in llm
    assert bool(llm["return_generation_logits"].as_numpy()[0, 0])
    assert "generation_logits" in wanted
    end = icm_processor.tokenizer.convert_tokens_to_ids("</s>")
    assert end == 2  # LLaMA's
    assert int(llm["end_id"].as_numpy()[0, 0]) == int(llm["pad_id"].as_numpy()[0, 0]) == end
    assert llm["prompt_embedding_table"].shape()[1] == tiny_llava15.IMAGE_FEATURES


@pytest.mark.parametrize("size", [(20, 50), (50, 20), (28, 28)])
def test_the_icm_engines_prompt_is_the_hf_models_prompt_for_the_padded_image(
    icm_guard: Any, icm_model: Any, icm_processor: Any, icm_repository: Path, size: tuple[int, int]
) -> None:
    """The embeddings TensorRT-LLM would build from what the guard sends equal the input
    embeddings transformers' LLaVA builds for the same prompt and the image padded as LLaVA-1.5
    pads it (PIL, the processor's mean colour); for a non-square image, not those of the image
    the processor would crop."""
    picture = image(*size, seed=11)
    judge(icm_guard, [client_request(picture, prompt="Is it?")])
    [(_, llm, _)] = [call for call in FakeRequest.calls if call[0] == "tensorrt_llm"]
    vocab = icm_model.config.text_config.vocab_size
    ids = torch.from_numpy(llm["input_ids"].as_numpy()[0].astype(np.int64))
    table = torch.from_numpy(llm["prompt_embedding_table"].as_numpy()[0].astype(np.float32))
    with torch.no_grad():
        ours = prompt_tuning_embeddings(ids, table, vocab, icm_model.get_input_embeddings())

    ga = _import("guard_answer", icm_repository / "guard" / "1")
    text = icm_processor.apply_chat_template(ga.conversation("Is it?"), add_generation_prompt=True)
    fill_rgb = tuple(int(x * 255) for x in icm_processor.image_processor.image_mean)
    padded = expand_to_square_with_pil(picture, fill_rgb)

    def hf_embeddings(pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = icm_processor(images=pixels, text=text, return_tensors="pt")
        with torch.no_grad():
            embeds = icm_model.get_input_embeddings()(inputs["input_ids"])
            features = icm_model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=icm_model.config.vision_feature_layer,
                vision_feature_select_strategy=icm_model.config.vision_feature_select_strategy,
            )
        at = inputs["input_ids"][0] == icm_model.config.image_token_index
        embeds[0, at] = features.reshape(-1, features.shape[-1])
        return embeds[0], at

    theirs, image_rows = hf_embeddings(padded)
    assert ours.shape == theirs.shape
    assert bool(((ids >= vocab) == image_rows).all())
    assert int(image_rows.sum()) == tiny_llava15.IMAGE_FEATURES
    torch.testing.assert_close(ours[~image_rows], theirs[~image_rows], rtol=0, atol=0)
    # The image rows went through float16 twice (the pixels the engine takes, the table it
    # returns): rounding, not another image.
    difference = (ours[image_rows] - theirs[image_rows]).abs()
    assert float(difference.max()) < 2e-2
    if size[0] != size[1]:
        cropped, _ = hf_embeddings(picture)
        assert float((ours[image_rows] - cropped[image_rows]).abs().max()) > 10 * float(
            difference.max()
        )


def test_the_build_scripts_pass_shellcheck() -> None:
    import shutil
    import subprocess

    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = sorted(DEPLOY.glob("*.sh"))
    assert scripts
    result = subprocess.run(
        [shellcheck, "--severity=style", "--external-sources", *map(str, scripts)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
