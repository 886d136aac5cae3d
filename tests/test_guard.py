"""The Triton client: the tensor contract, error mapping, one channel, and the real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from service.adapters.triton import (
    GuardClient,
    Sampling,
    Tensor,
    classify_rpc_error,
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


RETRIABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


def rpc_error(code: grpc.StatusCode, details: str = "it failed") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_grpc_statuses_map_to_retriable_or_final_errors(code: grpc.StatusCode) -> None:
    error = classify_rpc_error(rpc_error(code), "guard")
    assert type(error) is (GuardUnavailable if code in RETRIABLE else GuardError)
    assert error.message == f"Triton model 'guard': StatusCode.{code.name}: it failed"


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


def model_config(**parameters: str) -> model_config_pb2.ModelConfig:
    return model_config_pb2.ModelConfig(
        name="guard",
        parameters={
            key: model_config_pb2.ModelParameter(string_value=value)
            for key, value in parameters.items()
        },
    )


def model_metadata(
    *outputs: str, inputs: tuple[str, ...] = ()
) -> service_pb2.ModelMetadataResponse:
    tensor = service_pb2.ModelMetadataResponse.TensorMetadata
    return service_pb2.ModelMetadataResponse(
        name="guard",
        inputs=[tensor(name=name) for name in inputs],
        outputs=[tensor(name=name) for name in outputs],
    )


def test_the_served_model_is_described_by_its_tensors_and_name_parameters() -> None:
    config = model_config(
        guard_model_name="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        guard_model_version="rev-1",
        other="x",
    )
    metadata = model_metadata("text_output", "rating_log_prob", inputs=("text_input", "messages"))
    assert describe_served_model(metadata, config) == ServedModel(
        outputs=("text_output", "rating_log_prob"),
        name="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        version="rev-1",
        inputs=("text_input", "messages"),
    )
    # Blank or missing parameters name nothing, and reading them adds none to the config.
    blank = model_config(guard_model_name="")
    assert describe_served_model(model_metadata(), blank) == ServedModel(outputs=())
    assert list(blank.parameters) == ["guard_model_name"]


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's gRPC service as far as GuardClient uses it, noting each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.infer_failure: grpc.StatusCode | None = None

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append("ServerReady")
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append("ModelReady")
        return service_pb2.ModelReadyResponse(ready=request.name == "guard")

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append("ModelMetadata")
        return model_metadata("text_output", "rating_log_prob")

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append("ModelConfig")
        config = model_config(guard_model_name="fake-guard", guard_model_version="7")
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append("ModelInfer")
        if self.infer_failure is not None:
            await context.abort(self.infer_failure, "scripted failure")
        output = service_pb2.ModelInferResponse.InferOutputTensor
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            outputs=[
                output(name="text_output", datatype="BYTES", shape=[1, 1]),
                output(name="rating_log_prob", datatype="FP32", shape=[1, 1]),
            ],
            raw_output_contents=[
                serialize_byte_tensor(np.array([[b"{}"]], dtype=np.object_)).item(),
                np.array([[-0.5]], np.float32).tobytes(),
            ],
        )


@pytest.fixture
async def fake_triton() -> AsyncIterator[tuple[FakeTriton, str]]:
    """A FakeTriton served on a free port; it and its address."""
    servicer = FakeTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def test_probes_and_inference_go_over_one_channel(
    fake_triton: tuple[FakeTriton, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, url = fake_triton
    opened: list[str] = []
    open_channel = grpc.aio.insecure_channel

    def counted(target: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(target)
        return open_channel(target, *args, **kwargs)

    monkeypatch.setattr(grpc.aio, "insecure_channel", counted)
    guard = GuardClient(url, "guard", SAMPLING)
    try:
        await guard.wait_ready(timeout_s=5)
        reply = await guard.ask("policy", np.zeros((4, 4, 3), np.uint8))
        assert await guard.not_ready(timeout_s=5) is None
    finally:
        await guard.close()
    # What the breaker's probe sees of the channel (its state, its reconnect backoff) is what
    # inference gets.
    assert opened == [url]
    assert set(servicer.calls) == {
        "ServerReady",
        "ModelReady",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
    }
    assert (reply.text, reply.model_name, reply.rating_log_prob) == ("{}", "guard", -0.5)
    assert reply.served == ServedModel(("text_output", "rating_log_prob"), "fake-guard", "7")


@pytest.mark.parametrize(
    ("status", "expected", "read_again"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, GuardUnavailable, True),
        (grpc.StatusCode.INVALID_ARGUMENT, GuardError, False),
    ],
)
async def test_a_failed_inference_is_translated_where_it_fails(
    fake_triton: tuple[FakeTriton, str],
    status: grpc.StatusCode,
    expected: type[Exception],
    read_again: bool,
) -> None:
    servicer, url = fake_triton
    guard = GuardClient(url, "guard", SAMPLING)
    try:
        servicer.infer_failure = status
        with pytest.raises(expected, match=f"StatusCode.{status.name}: scripted failure") as caught:
            await guard.ask("policy", np.zeros((4, 4, 3), np.uint8))
        assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
        assert caught.value.__cause__.code() is status
        servicer.infer_failure = None
        await guard.ask("policy", np.zeros((4, 4, 3), np.uint8))
    finally:
        await guard.close()
    # After a retriable failure the served model is read again: Triton may have changed it.
    assert servicer.calls.count("ModelConfig") == (2 if read_again else 1)


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
    assert reply.served is not None
    assert reply.served.outputs == ("text_output",)
    # It can be sent a conversation (`ask`): the inputs are read from its metadata.
    assert "messages" in reply.served.inputs
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
