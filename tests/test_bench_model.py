"""The benchmark guard (triton_models/bench) must keep the real guard's tensor contract.

A benchmark that sent requests the real guard would refuse, or skipped inputs it requires,
would measure a different service; so the two configs are compared declaration by declaration,
and the model is served by a real Triton to check that its fixed answer is a valid verdict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.adapters.triton import GuardClient, Sampling
from service.core.errors import GuardError
from service.core.policies import ModelIdentity, PolicyRegistry, parse_answer
from service.dev import stack
from tests.support.stack import free_port

MODELS = Path(__file__).resolve().parents[1] / "triton_models"
CPU_GUARD = MODELS / "cpu" / "guard"
BENCH_GUARD = MODELS / "bench" / "guard"
SAMPLING = Sampling(max_tokens=500, temperature=0.2, top_p=0.95, top_k=50)


def _config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )


def test_bench_guard_has_the_cpu_guards_inputs_and_outputs() -> None:
    cpu, bench = _config(CPU_GUARD), _config(BENCH_GUARD)
    # Whole messages: names, data types, dims, optional and ragged flags, and any field a
    # later edit adds to one side only.
    assert list(bench.input) == list(cpu.input)
    assert list(bench.output) == list(cpu.output)
    # Spot checks, so a failure of the comparison above cannot come from two empty lists.
    assert [i.name for i in bench.input][:3] == ["text_input", "image_bytes_input", "max_tokens"]
    assert [o.name for o in bench.output] == ["text_output"]


def test_bench_guard_is_served_and_batched_like_the_cpu_guard() -> None:
    cpu, bench = _config(CPU_GUARD), _config(BENCH_GUARD)
    # The service asks for the model by name: the benchmark must answer to the same one.
    assert bench.name == cpu.name == "guard"
    assert bench.backend == cpu.backend == "python"
    assert bench.max_batch_size == cpu.max_batch_size == 8
    # Images the real guard refuses as too large, the benchmark refuses too.
    side = "max_image_side"
    assert bench.parameters[side].string_value == cpu.parameters[side].string_value == "8192"
    assert bench.HasField("dynamic_batching")
    assert (BENCH_GUARD / "1" / "model.py").is_file()


@pytest.fixture(scope="module")
def bench_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tritonserver of its own serving triton_models/bench; its gRPC address."""
    config = stack.StackConfig(
        state_dir=tmp_path_factory.mktemp("bench-triton"),
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        model_repository=MODELS / "bench",
    )
    triton = stack.start_triton(config, time.monotonic() + config.startup_timeout_s)
    try:
        yield f"{config.host}:{config.triton_grpc_port}"
    finally:
        # start_new_session made it a group leader: the group holds the Python-backend stub.
        os.killpg(triton.pid, signal.SIGTERM)
        try:
            triton.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(triton.pid, signal.SIGKILL)
            triton.wait()


@pytest.mark.stack
async def test_bench_guard_answers_a_valid_safe_verdict_that_names_itself(
    bench_triton: str,
) -> None:
    guard = GuardClient(bench_triton, "guard", SAMPLING)
    try:
        await guard.wait_ready(timeout_s=30)
        reply = await guard.ask("policy", np.full((32, 48, 3), 127, np.uint8))
    finally:
        await guard.close()
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    assessment = parse_answer(reply.text, policy)
    assert assessment.rating == "Safe"
    assert assessment.category == policy.safe_category
    assert assessment.model == ModelIdentity("fixed-answer-benchmark", "1")
    assert assessment.rationale.startswith("Benchmark model: no inference was run")


@pytest.mark.stack
async def test_bench_guard_refuses_an_empty_image_like_the_real_guard(bench_triton: str) -> None:
    guard = GuardClient(bench_triton, "guard", SAMPLING)
    try:
        with pytest.raises(GuardError, match=r"INVALID_ARGUMENT.*empty image"):
            await guard.ask("policy", np.zeros((0, 8, 3), np.uint8))
    finally:
        await guard.close()
