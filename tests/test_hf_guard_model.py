"""The HF guard (triton_models/hf): LlavaGuard's -hf checkpoints under transformers, in Triton.

No real weights can be had here, so the template is filled for tiny checkpoints of the same
architecture, files and chat template, built at test time (tests/support/tiny_llava.py), and
loaded by the same code that loads AIML-TUDA/LlavaGuard-v1.2-{0.5B,7B}-OV-hf. The model logic runs
in-process (`hf_guard`, imported from the filled repository as Triton's stub imports it); the
contract runs through a real tritonserver and the consumer's own client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format
from tritonclient.grpc import InferInput, model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.adapters.triton import GuardClient, Sampling, read_rating_log_prob
from service.core.errors import GuardError
from service.core.policies import PolicyRegistry, parse_answer
from tests.support import tiny_llava, tiny_llava15
from tests.support.lazy import lazy
from triton_models.common.guard_answer import DECISION_PATTERN
from triton_models.common.square_padding import mean_fill_rgb, pad_to_square

torch = lazy("torch")  # imported by the first test that uses it, not by collection

MODELS = Path(__file__).resolve().parents[1] / "triton_models"
CPU_GUARD = MODELS / "cpu" / "guard"
LOG_SAFE = math.log(tiny_llava.SCRIPTED_RATING_PROBABILITY)
LOG_UNSAFE = math.log(1 - tiny_llava.SCRIPTED_RATING_PROBABILITY)
MAX_IMAGE_SIDE = 512  # filled into the served repository, to test the limit cheaply


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def string_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tensors(pixels: np.ndarray | None = None, **inputs: Any) -> dict[str, np.ndarray]:
    """One request's tensors as Triton hands them to the model: [1, 1] scalars, [1, 1, H, W, 3]."""
    values: dict[str, Any] = {"text_input": b"Provide a safety assessment.", "max_tokens": 16}
    values.update(inputs)
    dtypes = {"temperature": np.float32, "top_p": np.float32, "seed": np.uint64}
    found = {
        name: np.array(
            [[value]], dtype=np.object_ if isinstance(value, bytes) else dtypes.get(name, np.int32)
        )
        for name, value in values.items()
        if value is not None
    }
    found["image_bytes_input"] = (image(24, 40) if pixels is None else pixels)[None, None]
    return found


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-llava")
    return {
        variant: tiny_llava.build(root / variant, variant)
        for variant in ("random", "scripted", "yes-no")
    }


@pytest.fixture(scope="module")
def repository(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template filled for the scripted checkpoint, as a deployment fills it."""
    out = tmp_path_factory.mktemp("hf") / "models"
    return tiny_llava.fill_hf_repository(
        checkpoints["scripted"], out, max_image_side=str(MAX_IMAGE_SIDE)
    )


@pytest.fixture(scope="module")
def hg(repository: Path) -> ModuleType:
    """hf_guard, imported from the filled model directory as Triton's stub imports it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(repository / "guard" / "1"))
        return importlib.import_module("hf_guard")


@pytest.fixture(scope="module")
def parameters(repository: Path) -> dict[str, str]:
    return string_parameters(parse_config(repository / "guard" / "config.pbtxt"))


@pytest.fixture(scope="module")
def settings(hg: ModuleType, parameters: dict[str, str]) -> Any:
    return hg.parse_settings(parameters)


@pytest.fixture(scope="module")
def engines(hg: ModuleType, settings: Any, checkpoints: dict[str, Path]) -> dict[str, Any]:
    return {
        variant: hg.Engine(
            dataclasses.replace(settings, checkpoint=path, verify_checkpoint=False),
            torch.device("cpu"),
        )
        for variant, path in checkpoints.items()
    }


def ask(hg: ModuleType, engine: Any, pixels: np.ndarray | None = None, **inputs: Any) -> Any:
    """One request through parse_request, prepare and a generate() call of its own."""
    request = hg.parse_request(tensors(pixels, **inputs).get, engine.settings, engine.vocab_size)
    [answer] = engine.answer([engine.prepare(request)])
    if isinstance(answer, Exception):
        raise answer
    return answer


# --- the template and its settings ---------------------------------------------------------


def test_hf_guard_has_the_cpu_guards_inputs_and_adds_rating_log_prob(repository: Path) -> None:
    cpu, hf = (
        parse_config(CPU_GUARD / "config.pbtxt"),
        parse_config(repository / "guard" / "config.pbtxt"),
    )
    # Whole messages: names, data types, dims, optional and ragged flags.
    assert list(hf.input) == list(cpu.input)
    assert [i.name for i in hf.input][:3] == ["text_input", "image_bytes_input", "max_tokens"]
    assert hf.output[0] == cpu.output[0]
    rating = hf.output[1]
    assert (rating.name, rating.data_type, list(rating.dims)) == (
        "rating_log_prob",
        model_config_pb2.TYPE_FP32,
        [1],
    )
    assert len(hf.output) == 2
    assert (hf.name, hf.backend, hf.max_batch_size) == ("guard", "python", 8)
    assert hf.dynamic_batching.max_queue_delay_microseconds == 5000


def test_the_template_holds_every_parameter_the_model_reads(
    hg: ModuleType, parameters: dict[str, str]
) -> None:
    assert set(parameters) == set(hg.PARAMETERS)
    listed = subprocess.run(
        [sys.executable, str(MODELS / "fill.py"), str(MODELS / "hf"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    required = {line.split()[0] for line in listed.splitlines() if "(required)" in line}
    assert required == {"checkpoint", "guard_model_name", "guard_model_version"}


def test_the_defaults_are_a_cpu_deployment(settings: Any, checkpoints: dict[str, Path]) -> None:
    assert (settings.device, settings.dtype, settings.attn_implementation) == (
        "cpu",
        "float32",
        "sdpa",
    )
    assert (settings.max_new_tokens, settings.max_input_tokens) == (1024, 16384)
    assert settings.decision_pattern.pattern == DECISION_PATTERN
    assert settings.verify_checkpoint is True
    assert settings.checkpoint == checkpoints["scripted"]
    assert settings.model_name == "scripted"
    assert settings.model_version.startswith("sha256:")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("device", "gpu", "device: must be cpu, cuda or cuda:N"),
        ("dtype", "float64", "dtype: must be one of float32, bfloat16, float16"),
        ("dtype", "float16", "float16 is for CUDA"),
        ("attn_implementation", "flash", "attn_implementation: must be one of"),
        ("max_new_tokens", "0", "max_new_tokens: must be an integer of at least 1"),
        ("max_input_tokens", "many", "max_input_tokens: must be an integer"),
        ("torch_num_threads", "-1", "torch_num_threads: must be an integer of at least 0"),
        ("verify_checkpoint", "yes", "verify_checkpoint: must be true or false"),
        ("decision_pattern", "rating(", "not a valid regular expression"),
        ("decision_pattern", "rating", "needs at least one group"),
        ("guard_model_name", " ", "guard_model_name: must not be empty"),
    ],
)
def test_invalid_settings_stop_the_load_saying_why(
    hg: ModuleType, parameters: dict[str, str], name: str, value: str, message: str
) -> None:
    with pytest.raises(hg.InvalidSettingsError, match=message):
        hg.parse_settings({**parameters, name: value})
    without = {key: value for key, value in parameters.items() if key != name}
    with pytest.raises(hg.InvalidSettingsError, match=f"parameters missing: {name}"):
        hg.parse_settings(without)


def test_a_checkpoint_other_than_the_one_the_version_names_is_refused(
    hg: ModuleType, settings: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    other = dataclasses.replace(settings, checkpoint=checkpoints["random"])
    with pytest.raises(hg.InvalidSettingsError, match=r"fingerprints as sha256:\w+, but"):
        hg.Engine(other, torch.device("cpu"))
    missing = dataclasses.replace(settings, checkpoint=tmp_path / "absent")
    with pytest.raises(hg.InvalidSettingsError, match="is not a directory"):
        hg.Engine(missing, torch.device("cpu"))
    with pytest.raises(hg.InvalidSettingsError, match="KIND_GPU but device is cpu"):
        hg.resolve_device("cpu", "GPU", "0")


def test_checkpoint_identity_names_hub_snapshots_and_fingerprints_contents(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints["scripted"]
    tool = tiny_llava.HF_MODEL_DIR / "checkpoint_identity.py"
    printed = subprocess.run(
        [sys.executable, str(tool), str(source)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    name, version = (line.split("=", 1)[1] for line in printed)
    assert name == "scripted"
    assert version.startswith("sha256:")
    # The hub cache's layout: files are symlinks into blobs; the model card does not count.
    snapshot = tmp_path / "models--AIML-TUDA--LlavaGuard-v1.2-0.5B-OV-hf" / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot, symlinks=False)
    (snapshot / "README.md").write_text("model card")
    (snapshot / ".cache").mkdir()
    (snapshot / ".cache" / "lock").write_text("x")
    identity = tiny_llava._identify(snapshot)
    assert (identity.name, identity.version, identity.hub_commit) == (
        "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        version,
        "a" * 40,
    )
    (snapshot / "generation_config.json").write_text('{"eos_token_id": 1}')
    assert tiny_llava._identify(snapshot).version != version
    usage = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2


# --- prompt and image processing -----------------------------------------------------------


def test_the_prompt_is_the_checkpoints_chat_template_with_the_image_first(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    processor = engines["scripted"].processor
    # Loaded from the checkpoint's chat_template.json: LlavaGuard-v1.2-OV-hf's own template.
    assert processor.chat_template == tiny_llava.CHAT_TEMPLATE
    policy = PolicyRegistry.load().get("llavaguard-v1.2").prompt
    request = hg.Request(policy, image(30, 20), hg.Sampling(4))
    ids = engines["scripted"].prepare(request).features["input_ids"][0].tolist()
    text = processor.tokenizer.decode(ids)
    image_token = processor.image_token
    count = text.count(image_token)
    assert count > 0
    assert text == (
        f"<|im_start|>user\n{image_token * count}\n{policy}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_conversation_renders_every_turn_and_the_image_once(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    processor = engines["scripted"].processor
    history = (hg.Turn("user", "Is it safe?"), hg.Turn("assistant", "Yes, it is."))
    request = hg.Request("Which rule?", image(30, 20), hg.Sampling(4), history)
    ids = engines["scripted"].prepare(request).features["input_ids"][0].tolist()
    text = processor.tokenizer.decode(ids)
    image_token = processor.image_token
    count = text.count(image_token)
    assert text == (
        f"<|im_start|>user\n{image_token * count}\nIs it safe?<|im_end|>\n"
        "<|im_start|>assistant\nYes, it is.<|im_end|>\n"
        "<|im_start|>user\nWhich rule?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_history_arrives_in_the_messages_input(hg: ModuleType, settings: Any) -> None:
    turns = [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "No."}]
    sent = tensors(messages=json.dumps(turns).encode())
    parsed = hg.parse_request(sent.get, settings, 1000)
    assert parsed.history == (hg.Turn("user", "Is it safe?"), hg.Turn("assistant", "No."))
    assert hg.parse_request(tensors().get, settings, 1000).history == ()


def test_a_thin_image_is_read_as_height_width_channels(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    # Without input_data_format the processor takes a 3-pixel-high image for channels-first.
    request = hg.Request("policy", image(3, 5), hg.Sampling(4))
    assert engines["random"].prepare(request).features["image_sizes"].tolist() == [[3, 5]]


def test_collated_requests_equal_the_processors_own_batch(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["random"]
    images = [image(40, 90, seed=1), image(200, 120, seed=2)]
    prepared = [engine.prepare(hg.Request("policy", pixels, hg.Sampling(4))) for pixels in images]
    ours = hg.collate([p.features for p in prepared], engine.tokenizer.pad_token_id)
    prompt = engine.processor.apply_chat_template(
        hg.conversation("policy"), add_generation_prompt=True
    )
    theirs = engine.processor(
        images=images,
        text=[prompt, prompt],
        padding=True,
        return_tensors="pt",
        input_data_format="channels_last",
    )
    assert ours["input_ids"].shape[1] > min(p.features["input_ids"].shape[1] for p in prepared)
    for name in engine.architecture.model_inputs:
        assert torch.equal(ours[name], theirs[name]), name


def test_a_prompt_over_max_input_tokens_is_refused(hg: ModuleType, engines: dict[str, Any]) -> None:
    engine = engines["random"]
    small = dataclasses.replace(engine.settings, max_input_tokens=40)
    request = hg.Request("policy " * 50, image(10, 10), hg.Sampling(4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "settings", small)
        with pytest.raises(hg.InvalidRequestError, match=r"\d+ tokens, over max_input_tokens 40"):
            engine.prepare(request)


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixels", "inputs", "message"),
    [
        (np.zeros((0, 4, 3), np.uint8), {}, "empty image of 4x0 pixels"),
        (
            np.zeros((4, 600, 3), np.uint8),
            {},
            "600x4 pixels; the longer side exceeds max_image_side 512",
        ),
        (np.zeros((4, 4, 3), np.float32), {}, "expected UINT8"),
        (None, {"text_input": None}, "text_input: missing"),
        (None, {"text_input": b"\xff\xfe"}, "text_input: not UTF-8"),
        (None, {"text_input": b"  \n"}, "text_input: empty"),
        (None, {"max_tokens": None}, "max_tokens: missing"),
        (None, {"max_tokens": 0}, "max_tokens: must be at least 1"),
        (None, {"temperature": -0.5}, "temperature: must be a number >= 0"),
        (None, {"temperature": float("nan")}, "temperature: must be a number >= 0"),
        (None, {"top_p": 1.5}, "top_p: must be in 0..1"),
        (None, {"top_k": -1}, "top_k: must be >= 0"),
        (None, {"end_id": 100_000}, r"end_id: 100000 is not a token id \(0\.\.\d+\)"),
        (None, {"pad_id": -1}, "pad_id: -1 is not a token id"),
    ],
)
def test_a_request_that_breaks_the_contract_is_refused_saying_why(
    hg: ModuleType,
    settings: Any,
    pixels: np.ndarray | None,
    inputs: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(hg.InvalidRequestError, match=message):
        hg.parse_request(tensors(pixels, **inputs).get, settings, 1000)


def test_image_and_scalar_shapes_are_checked(hg: ModuleType, settings: Any) -> None:
    two_images = tensors()
    two_images["image_bytes_input"] = np.zeros((1, 2, 4, 4, 3), np.uint8)
    with pytest.raises(
        hg.InvalidRequestError, match=r"expected \[1, 1, H, W, 3\], got \[1, 2, 4, 4, 3\]"
    ):
        hg.parse_request(two_images.get, settings, 1000)
    two_values = tensors()
    two_values["max_tokens"] = np.array([[4, 5]], np.int32)
    with pytest.raises(
        hg.InvalidRequestError, match=r"max_tokens: expected one value, got shape \[1, 2\]"
    ):
        hg.parse_request(two_values.get, settings, 1000)


def test_sampling_is_normalised_so_equal_settings_batch_together(
    hg: ModuleType, settings: Any
) -> None:
    def sampling(**inputs: Any) -> Any:
        return hg.parse_request(tensors(**inputs).get, settings, 1000).sampling

    greedy = sampling(temperature=0.0, top_p=0.5, top_k=3, seed=9)
    assert greedy == sampling() == hg.Sampling(16)
    assert sampling(max_tokens=5000).max_new_tokens == 1024  # the max_new_tokens cap
    # TensorRT-LLM's 0 = off becomes transformers' off.
    assert sampling(temperature=0.5, top_p=0.0, top_k=0) == hg.Sampling(16, 0.5, 1.0, 0)
    seeded = sampling(temperature=0.5, seed=1)
    batches = hg.plan_batches([greedy, seeded, sampling(temperature=0.5), greedy, seeded])
    assert batches == [[0, 3], [2], [1], [4]]


# --- generation ----------------------------------------------------------------------------


def test_random_weights_write_text_within_max_tokens_the_same_each_time(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["random"]
    first = ask(hg, engine, max_tokens=12)
    assert isinstance(first.text, str)
    assert 1 <= first.token_count <= 12
    assert math.isnan(first.rating_log_prob) or first.rating_log_prob <= 0
    again = ask(hg, engine, max_tokens=12)
    assert (again.text, again.token_count) == (first.text, first.token_count)
    assert again.rating_log_prob == pytest.approx(first.rating_log_prob, nan_ok=True)


def test_a_batch_answers_each_request_as_it_would_be_answered_alone(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["random"]
    requests = [
        hg.parse_request(tensors(image(h, w, seed=h)).get, engine.settings, engine.vocab_size)
        for h, w in ((20, 30), (90, 40), (3, 5))
    ]
    prepared = [engine.prepare(request) for request in requests]
    batched = engine.answer(prepared)
    alone = [engine.answer([p])[0] for p in prepared]
    for together, single in zip(batched, alone, strict=True):
        assert together.text == single.text
        assert together.token_count == single.token_count
        assert together.rating_log_prob == pytest.approx(
            single.rating_log_prob, abs=1e-4, nan_ok=True
        )


def test_a_seed_makes_a_sampled_answer_reproducible(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["random"]
    answers = {seed: ask(hg, engine, temperature=1.0, seed=seed).text for seed in (1, 2, 3)}
    assert ask(hg, engine, temperature=1.0, seed=2).text == answers[2]
    assert len(set(answers.values())) > 1


def test_the_scripted_model_answers_and_its_rating_token_has_the_probability_it_was_given(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    answer = ask(hg, engines["scripted"], max_tokens=500)
    assert answer.text == tiny_llava.SCRIPTED_ANSWER
    assert answer.token_count == len(tiny_llava.SCRIPTED_PIECES) + 1  # and <|im_end|>
    assert answer.rating_log_prob == pytest.approx(LOG_SAFE, abs=1e-4)


def test_the_log_prob_is_that_of_the_rating_the_model_chose(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    # Sampling at temperature 1, the scripted model rates Unsafe one time in five.
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    found = {}
    for seed in range(40):
        answer = ask(hg, engines["scripted"], temperature=1.0, seed=seed, max_tokens=100)
        found.setdefault(parse_answer(answer.text, policy).rating, answer.rating_log_prob)
        if len(found) == 2:
            break
    assert found == {
        "Safe": pytest.approx(LOG_SAFE, abs=1e-4),
        "Unsafe": pytest.approx(LOG_UNSAFE, abs=1e-4),
    }


def test_a_cut_answer_keeps_its_rating_log_prob_only_if_the_rating_was_written(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["scripted"]
    pieces = tiny_llava.SCRIPTED_PIECES
    cut = ask(hg, engine, max_tokens=1)
    assert (cut.text, math.isnan(cut.rating_log_prob)) == (pieces[0], True)
    rated = ask(hg, engine, max_tokens=3)
    assert rated.text == "".join(pieces[:3])
    assert rated.rating_log_prob == pytest.approx(LOG_SAFE, abs=1e-4)
    # end_id ends the answer at that token, and it is kept when it is not a special token.
    stopped = ask(hg, engine, end_id=tiny_llava.token_id(engine.tokenizer, pieces[2]))
    assert stopped.text == "".join(pieces[:3])


def test_decision_pattern_chooses_the_deciding_token(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    # The category's first token, which the scripted model writes with probability ~1.
    engine = engines["scripted"]
    pattern = hg.compile_decision_pattern(r'"category": "(N)')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            engine, "settings", dataclasses.replace(engine.settings, decision_pattern=pattern)
        )
        answer = ask(hg, engine)
    assert answer.text == tiny_llava.SCRIPTED_ANSWER
    assert -1e-6 < answer.rating_log_prob <= 0


def test_a_yes_no_answers_log_prob_is_icms_two_way_probability_from_the_logits(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["yes-no"]
    request = hg.parse_request(tensors(max_tokens=50).get, engine.settings, engine.vocab_size)
    prepared = engine.prepare(request)
    [answer] = engine.answer([prepared])
    assert answer.text == "".join(tiny_llava.YES_NO_ANSWERS["Yes"])
    # By hand: the raw logits at the first answer token, Yes against No.
    with torch.inference_mode():
        logits = engine.model(**prepared.features).logits[0, -1].double()
    yes, no = (tiny_llava.token_id(engine.tokenizer, word) for word in ("Yes", "No"))
    by_hand = float(torch.softmax(logits[[yes, no]], dim=0)[0])
    assert math.exp(answer.rating_log_prob) == pytest.approx(by_hand, abs=1e-4)
    p = tiny_llava.YES_NO_PROBABILITIES
    assert by_hand == pytest.approx(p["Yes"] / (p["Yes"] + p["No"]), abs=1e-4)
    # Not the whole vocabulary's, which a third token shares.
    assert math.exp(answer.rating_log_prob) > p["Yes"] + 0.05


def test_yes_and_no_answers_have_complementary_confidences(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    # Sampling at temperature 1, the yes-no model answers No three times in ten.
    policy = PolicyRegistry.load().get("icm-assistant")
    rating = {"Yes": "Unsafe", "No": "Safe"}
    found: dict[str, float] = {}
    for seed in range(40):
        answer = ask(hg, engines["yes-no"], temperature=1.0, seed=seed, max_tokens=50)
        first = answer.text.split(",")[0]
        if first in tiny_llava.YES_NO_ANSWERS:
            assert parse_answer(answer.text, policy).rating == rating[first]
            found.setdefault(first, math.exp(answer.rating_log_prob))
        if len(found) == 2:
            break
    p = tiny_llava.YES_NO_PROBABILITIES
    assert found == {
        "Yes": pytest.approx(p["Yes"] / (p["Yes"] + p["No"]), abs=1e-4),
        "No": pytest.approx(p["No"] / (p["Yes"] + p["No"]), abs=1e-4),
    }
    assert found["Yes"] + found["No"] == pytest.approx(1.0, abs=1e-4)


def test_a_request_the_model_fails_on_fails_alone_in_its_batch(
    hg: ModuleType, engines: dict[str, Any]
) -> None:
    engine = engines["random"]
    good = engine.prepare(hg.Request("policy", image(20, 20), hg.Sampling(4)))
    # Two image placeholders for one image: the model refuses the features it is given.
    ids = good.features["input_ids"]
    extra = torch.full_like(ids[:, -1:], engine.model.config.image_token_index)
    doubled = torch.cat([ids, extra], dim=1)
    broken = hg.Prepared(
        {**good.features, "input_ids": doubled, "attention_mask": torch.ones_like(doubled)},
        good.sampling,
    )
    results = engine.answer([good, broken, good])
    assert isinstance(results[1], Exception)
    assert [r.text for r in (results[0], results[2])] == [engine.answer([good])[0].text] * 2


# --- LLaVA-1.5 (ICM-Assistant's architecture) ------------------------------------------------

YES_NO = tiny_llava.YES_NO_PROBABILITIES
ICM_TWO_WAY_YES = YES_NO["Yes"] / (YES_NO["Yes"] + YES_NO["No"])


@pytest.fixture(scope="module")
def llava15_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny LLaVA-1.5 checkpoints: built in transformers' format, and one in LLaVA's original
    format with its tower, converted by deploy/icm/convert_llava.py."""
    root = tmp_path_factory.mktemp("tiny-llava15")
    found = {
        variant: tiny_llava15.build(root / variant, variant) for variant in ("random", "yes-no")
    }
    found["original"] = tiny_llava15.build_original(root / "original")
    tower = tiny_llava15.build_vision_tower(root / "tower")
    found["converted"] = tiny_llava15.converter().convert(
        found["original"], tower, root / "converted"
    )
    return found


@pytest.fixture(scope="module")
def llava15(hg: ModuleType, settings: Any, llava15_checkpoints: dict[str, Path]) -> dict[str, Any]:
    return {
        variant: hg.Engine(
            dataclasses.replace(
                settings, checkpoint=llava15_checkpoints[variant], verify_checkpoint=False
            ),
            torch.device("cpu"),
        )
        for variant in ("random", "yes-no", "converted")
    }


def test_a_llava_15_checkpoint_loads_as_llava_with_the_llava_v1_conversation(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    engine = llava15["yes-no"]
    assert type(engine.model).__name__ == "LlavaForConditionalGeneration"
    assert engine.architecture.model_type == "llava"
    convert = tiny_llava15.converter()
    assert engine.processor.chat_template == convert.CHAT_TEMPLATE
    policy = PolicyRegistry.load().get("icm-assistant").prompt
    features = engine.prepare(hg.Request(policy, image(30, 50), hg.Sampling(4))).features
    assert set(features) == {"input_ids", "attention_mask", "pixel_values"}
    size = tiny_llava15.IMAGE_SIZE
    assert features["pixel_values"].shape == (1, 3, size, size)
    image_tokens = "<image>" * tiny_llava15.IMAGE_FEATURES
    expected = f"{convert.LLAVA_V1_SYSTEM} USER: {image_tokens}\n{policy} ASSISTANT:"
    assert features["input_ids"][0].tolist() == engine.tokenizer(expected)["input_ids"]
    assert features["input_ids"][0, 0] == 1  # LLaMA's <s>


def test_the_llava_15_yes_no_answer_has_icms_two_way_confidence(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    engine = llava15["yes-no"]
    request = hg.parse_request(tensors(max_tokens=50).get, engine.settings, engine.vocab_size)
    prepared = engine.prepare(request)
    [answer] = engine.answer([prepared])
    assert answer.text == "".join(tiny_llava.YES_NO_ANSWERS["Yes"])
    assert answer.token_count == 3  # ▁Yes, the explanation, </s>
    assert answer.rating_log_prob == pytest.approx(math.log(ICM_TWO_WAY_YES), abs=1e-4)
    # The deciding token is LLaMA's `▁Yes`, its rival the vocabulary's `▁No`.
    yes, no = (tiny_llava15.token_id(engine.tokenizer, word) for word in ("Yes", "No"))
    assert engine.tokenizer.convert_ids_to_tokens([yes, no]) == ["▁Yes", "▁No"]
    assert engine._rival_of[yes] == no
    with torch.inference_mode():
        logits = engine.model(**prepared.features).logits[0, -1].double()
    by_hand = float(torch.softmax(logits[[yes, no]], dim=0)[0])
    assert math.exp(answer.rating_log_prob) == pytest.approx(by_hand, abs=1e-4)
    assert float(torch.softmax(logits, dim=0)[yes]) == pytest.approx(YES_NO["Yes"], abs=1e-4)


def test_a_llava_15_batch_answers_each_request_as_it_would_be_answered_alone(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    # Different image sizes and prompt lengths: the shorter prompt is left-padded, with a pad
    # token whose embedding is not zero (hf_architectures' image_seq_length override).
    engine = llava15["random"]
    requests = [
        hg.parse_request(
            tensors(image(h, w, seed=h), text_input=text).get, engine.settings, engine.vocab_size
        )
        for h, w, text in ((20, 30, b"policy"), (90, 40, b"a longer policy, to pad the other"))
    ]
    prepared = [engine.prepare(request) for request in requests]
    lengths = {p.features["input_ids"].shape[1] for p in prepared}
    assert len(lengths) == 2
    batched = engine.answer(prepared)
    alone = [engine.answer([p])[0] for p in prepared]
    for together, single in zip(batched, alone, strict=True):
        assert (together.text, together.token_count) == (single.text, single.token_count)
        assert together.rating_log_prob == pytest.approx(
            single.rating_log_prob, abs=1e-4, nan_ok=True
        )
    collated = hg.collate([p.features for p in prepared], engine.tokenizer.pad_token_id)
    assert collated["pixel_values"].shape[0] == 2
    assert torch.equal(
        collated["pixel_values"], torch.cat([p.features["pixel_values"] for p in prepared])
    )


def test_an_image_is_padded_to_a_square_of_the_mean_colour_as_llava_15_pads_it() -> None:
    wide = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    background = [7, 8, 9]
    # By hand: 4x4, the image on rows 1 and 2 ((4 - 2) // 2 = 1 above, 1 below).
    assert pad_to_square(wide, (7, 8, 9)).tolist() == [
        [background] * 4,
        wide[0].tolist(),
        wide[1].tolist(),
        [background] * 4,
    ]
    tall = np.full((3, 2, 3), 200, dtype=np.uint8)
    # 3x3, the image on columns 0 and 1: the odd pixel of the margin goes after it.
    assert pad_to_square(tall, (7, 8, 9)).tolist() == [[[200] * 3, [200] * 3, background]] * 3
    square = np.zeros((5, 5, 3), dtype=np.uint8)
    assert pad_to_square(square, (7, 8, 9)) is square
    # LLaVA's pad colour for CLIP's mean (0.48145466, 0.4578275, 0.40821073).
    assert mean_fill_rgb([0.48145466, 0.4578275, 0.40821073]) == (122, 116, 104)


def test_a_llava_15_conversation_renders_the_llava_v1_template(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    engine = llava15["yes-no"]
    history = (hg.Turn("user", "Is it sexy?"), hg.Turn("assistant", "Yes, R01."))
    request = hg.Request("Why?", image(30, 20), hg.Sampling(4), history)
    ids = engine.prepare(request).features["input_ids"][0].tolist()
    text = engine.tokenizer.decode(ids)
    image_token = engine.processor.image_token
    count = text.count(image_token)
    assert count > 0
    # LLaVA's conv_llava_v1 (sep " ", sep2 "</s>"): the image in the first user turn only.
    assert text == (
        "<s> A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human's questions. USER: "
        f"{image_token * count}\nIs it sexy? ASSISTANT: Yes, R01.</s>USER: Why? ASSISTANT:"
    )


def test_llava_15_sees_the_whole_padded_image_not_the_processors_centre_crop(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    engine = llava15["random"]
    wide = image(20, 60, seed=5)
    pixels = engine.prepare(hg.Request("policy", wide, hg.Sampling(4))).features["pixel_values"]

    def processed(picture: np.ndarray) -> Any:
        return engine.processor.image_processor(
            [picture], return_tensors="pt", input_data_format="channels_last"
        )["pixel_values"]

    assert torch.equal(pixels, processed(pad_to_square(wide, (122, 116, 104))))
    assert not torch.allclose(pixels, processed(wide))


def test_a_converted_original_llava_checkpoint_loads_and_answers(
    hg: ModuleType, llava15: dict[str, Any]
) -> None:
    engine = llava15["converted"]
    assert engine.architecture.model_type == "llava"
    answer = ask(hg, engine, max_tokens=6)
    assert isinstance(answer.text, str)
    assert 1 <= answer.token_count <= 6
    assert ask(hg, engine, max_tokens=6).text == answer.text


def test_checkpoints_the_engine_does_not_serve_are_refused_saying_why(
    hg: ModuleType, settings: Any, llava15_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    def load(checkpoint: Path) -> Any:
        changed = dataclasses.replace(settings, checkpoint=checkpoint, verify_checkpoint=False)
        return hg.Engine(changed, torch.device("cpu"))

    other = shutil.copytree(llava15_checkpoints["random"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(
        hg.InvalidSettingsError,
        match=r"has model_type 'qwen2_vl'; the HF guard serves llava_onevision "
        r"\(LlavaOnevisionForConditionalGeneration\), llava \(LlavaForConditionalGeneration\)",
    ):
        load(other)
    with pytest.raises(
        hg.InvalidSettingsError,
        match=r"original format \(LlavaLlamaForCausalLM\); convert it with "
        r"deploy/icm/convert_llava\.py",
    ):
        load(llava15_checkpoints["original"])
    unexpanded = shutil.copytree(llava15_checkpoints["random"], tmp_path / "unexpanded")
    (unexpanded / "processor_config.json").unlink()
    with pytest.raises(
        hg.InvalidSettingsError,
        match=r"patch_size and vision_feature_select_strategy are \(None, None\), the model's "
        r"\(14, 'default'\)",
    ):
        load(unexpanded)


# --- through Triton --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_llava.served(repository, tmp_path_factory.mktemp("hf-triton")) as url:
        yield url


@pytest.fixture
async def client(triton: str) -> Any:
    client = triton_aio.InferenceServerClient(triton)
    yield client
    await client.close()


async def infer(client: Any, pixels: np.ndarray | None = None, **inputs: Any) -> Any:
    request = []
    for name, array in tensors(pixels, **inputs).items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    return await client.infer("guard", request)


@pytest.mark.stack
async def test_the_served_guard_answers_the_consumers_client_with_its_identity(
    triton: str, parameters: dict[str, str]
) -> None:
    guard = GuardClient(
        triton, "guard", Sampling(max_tokens=500, temperature=0.2, top_p=0.95, top_k=50)
    )
    try:
        await guard.wait_ready(timeout_s=60)
        reply = await guard.ask("policy", image(48, 64))
    finally:
        await guard.close()
    assert reply.text == tiny_llava.SCRIPTED_ANSWER
    assert reply.rating_log_prob == pytest.approx(LOG_SAFE, abs=1e-4)
    assert reply.served is not None
    assert (reply.served.name, reply.served.version) == (
        parameters["guard_model_name"],
        parameters["guard_model_version"],
    )
    assert reply.served.outputs == ("text_output", "rating_log_prob")
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    assert parse_answer(reply.text, policy).rating == "Safe"


@pytest.mark.stack
async def test_no_deciding_token_comes_back_as_nan_which_the_consumer_reads_as_none(
    client: Any,
) -> None:
    result = await infer(client, max_tokens=1)
    assert result.as_numpy("text_output").tolist() == [[tiny_llava.SCRIPTED_PIECES[0].encode()]]
    values = result.as_numpy("rating_log_prob")
    assert values.shape == (1, 1)
    assert math.isnan(values[0, 0])
    assert read_rating_log_prob(values) is None


@pytest.mark.stack
async def test_one_batch_answers_good_requests_and_refuses_bad_ones_each_on_its_own(
    client: Any,
) -> None:
    before = await client.get_inference_statistics("guard", as_json=True)
    sizes = [(30, 40), (0, 8), (50, 20), (9, MAX_IMAGE_SIDE + 1), (64, 64), (8, 8)]
    results = await asyncio.gather(
        *(infer(client, np.zeros((h, w, 3), np.uint8)) for h, w in sizes), return_exceptions=True
    )
    for (height, width), result in zip(sizes, results, strict=True):
        if 0 in (height, width) or max(height, width) > MAX_IMAGE_SIDE:
            assert isinstance(result, InferenceServerException)
            assert result.status() == "StatusCode.INVALID_ARGUMENT"
            assert "image_bytes_input" in result.message()
        else:
            assert result.as_numpy("text_output")[0, 0].decode() == tiny_llava.SCRIPTED_ANSWER
    after = await client.get_inference_statistics("guard", as_json=True)
    counts = [
        {key: int(stats.get(key, 0)) for key in ("inference_count", "execution_count")}
        for stats in (before["model_stats"][0], after["model_stats"][0])
    ]
    inferred = counts[1]["inference_count"] - counts[0]["inference_count"]
    executed = counts[1]["execution_count"] - counts[0]["execution_count"]
    # Dynamic batching put several requests into one execute(): fewer executions than requests.
    assert executed < inferred == len(sizes)


@pytest.mark.stack
@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"text_input": b"\xff"}, "text_input: not UTF-8"),
        ({"max_tokens": 0}, "max_tokens: must be at least 1"),
        ({"end_id": 10**6}, "end_id: 1000000 is not a token id"),
    ],
)
async def test_a_bad_request_is_an_invalid_argument(
    client: Any, inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InferenceServerException, match=message) as caught:
        await infer(client, **inputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.stack
async def test_the_consumer_takes_an_invalid_argument_as_final(triton: str) -> None:
    guard = GuardClient(triton, "guard", Sampling(max_tokens=0, temperature=0, top_p=1, top_k=0))
    try:
        with pytest.raises(GuardError, match=r"INVALID_ARGUMENT.*max_tokens"):
            await guard.ask("policy", image(8, 8))
    finally:
        await guard.close()
