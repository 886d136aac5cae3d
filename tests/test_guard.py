"""The Triton client: the tensor contract, error mapping, and calls to the real server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from service.adapters.triton import (
    GuardClient,
    Sampling,
    Tensor,
    classify_triton_error,
    describe_served_model,
    read_rating_log_prob,
    request_tensors,
    serialize_request,
)
from service.adapters.triton import read_text_output as read_text
from service.core.errors import GuardError, GuardUnavailable
from service.core.guard import ServedModel
from service.dev import stack
from tests.support.stack import free_port

SAMPLING = Sampling(max_tokens=500, temperature=0.2, top_p=0.95, top_k=50)


def described(tensors: list[Tensor]) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.datatype, list(t.array.shape)) for t in tensors}


def test_the_request_has_the_multimodal_ensemble_contract() -> None:
    pixels = np.zeros((48, 64, 3), np.uint8)
    assert described(request_tensors("policy", pixels, SAMPLING)) == {
        "text_input": ("BYTES", [1, 1]),
        "image_bytes_input": ("UINT8", [1, 1, 48, 64, 3]),
        "max_tokens": ("INT32", [1, 1]),
        "temperature": ("FP32", [1, 1]),
        "top_p": ("FP32", [1, 1]),
        "top_k": ("INT32", [1, 1]),
    }


def test_token_ids_and_seed_are_sent_only_when_configured() -> None:
    sampling = Sampling(500, 0.2, 0.95, 50, seed=7, end_id=151645, pad_id=151643)
    inputs = described(request_tensors("p", np.zeros((2, 2, 3), np.uint8), sampling))
    assert inputs["seed"] == ("UINT64", [1, 1])
    assert inputs["end_id"] == inputs["pad_id"] == ("INT32", [1, 1])


def test_the_serialized_request_is_the_message_tritonclient_would_send() -> None:
    sampling = Sampling(500, 0.2, 0.95, 50, seed=2**40 + 7, end_id=151645, pad_id=151643)
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    tensors = request_tensors("Assess the image: \u00e9t\u00e9", pixels, sampling)
    sent = serialize_request("guard", "1", tensors, ["text_output"])
    # Built the way tritonclient builds it: protobuf, raw contents in the inputs' order,
    # BYTES with tritonclient's own serializer.
    expected = service_pb2.ModelInferRequest(model_name="guard", model_version="1")
    for tensor in tensors:
        expected.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape)
        expected.raw_input_contents.append(
            serialize_byte_tensor(tensor.array).item()
            if tensor.datatype == "BYTES"
            else tensor.array.tobytes()
        )
    expected.outputs.add(name="text_output")
    assert service_pb2.ModelInferRequest.FromString(sent) == expected
    assert sent == expected.SerializeToString()


def test_a_large_image_is_one_length_prefixed_field() -> None:
    pixels = np.full((600, 700, 3), 7, np.uint8)  # 1.26 MB: a length of three varint bytes
    request = service_pb2.ModelInferRequest.FromString(
        serialize_request("guard", "", request_tensors("p", pixels, SAMPLING), [])
    )
    assert request.raw_input_contents[1] == pixels.tobytes()
    assert list(request.inputs[1].shape) == [1, 1, 600, 700, 3]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("StatusCode.UNAVAILABLE", GuardUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", GuardUnavailable),
        ("StatusCode.RESOURCE_EXHAUSTED", GuardUnavailable),
        ("StatusCode.INVALID_ARGUMENT", GuardError),
        ("StatusCode.NOT_FOUND", GuardError),
        ("StatusCode.INTERNAL", GuardError),
        (None, GuardError),
    ],
)
def test_triton_statuses_map_to_retriable_or_final_errors(
    status: str | None, expected: type[Exception]
) -> None:
    error = classify_triton_error(InferenceServerException("it failed", status=status), "guard")
    assert type(error) is expected
    assert "guard" in error.message
    assert "it failed" in error.message


def test_text_output_is_read_from_either_shape_and_missing_output_is_an_error() -> None:
    assert read_text(np.array([[b"{}"]], dtype=np.object_), "guard") == "{}"
    assert read_text(np.array([b"\xff ok"], dtype=np.object_), "guard") == "\ufffd ok"
    with pytest.raises(GuardError, match="no text_output"):
        read_text(None, "guard")


async def test_waiting_for_an_absent_server_fails_with_a_clear_message() -> None:
    port = free_port()
    guard = GuardClient(f"127.0.0.1:{port}", "guard", SAMPLING)
    try:
        with pytest.raises(GuardUnavailable, match=f"127.0.0.1:{port} not ready after 1s"):
            await guard.wait_ready(timeout_s=1, poll_s=0.2)
    finally:
        await guard.close()


def test_the_served_model_is_described_by_its_outputs_and_name_parameters() -> None:
    metadata = {"outputs": [{"name": "text_output"}, {"name": "rating_log_prob"}]}
    config = {
        "config": {
            "parameters": {
                "guard_model_name": {"string_value": "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"},
                "guard_model_version": {"string_value": "rev-1"},
                "other": {"string_value": "x"},
            }
        }
    }
    assert describe_served_model(metadata, config) == ServedModel(
        outputs=("text_output", "rating_log_prob"),
        name="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        version="rev-1",
    )
    # Blank or missing parameters name nothing.
    blank = {"config": {"parameters": {"guard_model_name": {"string_value": ""}}}}
    assert describe_served_model({"outputs": []}, blank) == ServedModel(outputs=())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[-0.25]], np.float32), -0.25),
        (np.array([0.0], np.float32), 0.0),
        (np.array([[np.nan]], np.float32), None),  # the model found no deciding token
        (np.array([[0.5]], np.float32), None),  # not a log-probability
        (np.array([], np.float32), None),
        (None, None),
    ],
)
def test_the_rating_log_prob_is_read_only_when_it_is_one(
    values: np.ndarray | None, expected: float | None
) -> None:
    assert read_rating_log_prob(values) == expected


@pytest.mark.stack
async def test_the_cpu_guard_answers_in_llavaguard_json(embedded_stack: stack.StackState) -> None:
    guard = GuardClient(embedded_stack.triton_grpc, "guard", SAMPLING)
    try:
        await guard.wait_ready(timeout_s=30)
        reply = await guard.ask("policy", np.full((32, 48, 3), 127, np.uint8))
    finally:
        await guard.close()
    answer = json.loads(reply.text)
    assert (answer["rating"], answer["category"]) == ("Safe", "NA: None applying")
    assert (reply.model_name, reply.model_version) == ("guard", "1")
    # It declares no rating_log_prob, so none is asked for and the verdict has no confidence.
    assert reply.served == ServedModel(outputs=("text_output",))
    assert reply.rating_log_prob is None


@pytest.mark.stack
async def test_a_request_the_model_refuses_is_a_final_guard_error(
    embedded_stack: stack.StackState,
) -> None:
    guard = GuardClient(embedded_stack.triton_grpc, "guard", SAMPLING)
    try:
        with pytest.raises(GuardError, match="INVALID_ARGUMENT"):
            await guard.ask("policy", np.zeros((0, 8, 3), np.uint8))
    finally:
        await guard.close()


@pytest.mark.stack
async def test_an_unknown_model_is_never_ready(embedded_stack: stack.StackState) -> None:
    guard = GuardClient(embedded_stack.triton_grpc, "no-such-model", SAMPLING)
    try:
        with pytest.raises(GuardUnavailable, match="'no-such-model' is not ready"):
            await guard.wait_ready(timeout_s=1, poll_s=0.2)
    finally:
        await guard.close()
