"""Ask the guard model in Triton about one image, over gRPC (asyncio).

The tensor contract is the one of TensorRT-LLM's multimodal ensemble, so this client talks to
the CPU guard of `triton_models/cpu` and to a GPU TensorRT-LLM deployment unchanged:

    text_input         BYTES  [1, 1]           the policy prompt
    image_bytes_input  UINT8  [1, 1, H, W, 3]  one decoded RGB image
    max_tokens         INT32  [1, 1]
    temperature, top_p FP32   [1, 1]
    top_k              INT32  [1, 1]
    end_id, pad_id     INT32  [1, 1]           only when configured
    seed               UINT64 [1, 1]           only when configured
    messages           BYTES  [1, 1]           only in a conversation (`ask`): the earlier
                                               turns as JSON, text_input the newest question
    → text_output      BYTES  [1, 1] (or [1])  the model's answer
    → rating_log_prob  FP32   [1, 1]           only from models that declare it: the log-prob
                                               of the answer given at the token that decided
                                               it (a Yes/No: over Yes and No only)

What the served model is (`guard_model_name`, `guard_model_version`) and whether it declares
`rating_log_prob` is read from Triton once the model is ready, and again after an outage: a
restarted Triton may serve another model behind the same name.

Readiness, the served model's description and inference all go over ONE gRPC channel, through
Triton's generated service definitions (tritonclient's `service_pb2`, `service_pb2_grpc`), not
through tritonclient's client, which would open a channel of its own: the breaker's probe must
see the channel inference uses, its connection state and backoff included. A failed call is a
`grpc.aio.AioRpcError`; `classify_rpc_error` turns it, by its `grpc.StatusCode` alone
(`_FAILURES`), into a retriable `GuardUnavailable` or a final `GuardError`.

The inference request itself is serialized here (`serialize_request`), not by tritonclient:
its path copies an image four times on the event loop (numpy to InferInput, into the protobuf
message, into the serialized message, into gRPC), which cost more CPU than anything else the
service does per event but decoding. Here the pixels are copied once, into the message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import orjson
from tritonclient.grpc import InferResult, model_config_pb2, service_pb2, service_pb2_grpc

from service.core.errors import GuardError, GuardFailed, GuardUnavailable
from service.core.guard import GuardReply, ServedModel, Turn

log = logging.getLogger(__name__)

TEXT_OUTPUT = "text_output"
RATING_LOG_PROB = "rating_log_prob"
MESSAGES = "messages"
_NAME_PARAMETER, _VERSION_PARAMETER = "guard_model_name", "guard_model_version"
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
# raw_input_contents (repeated bytes): its field number with wire type 2, length-delimited.
_RAW_CONTENTS_TAG = bytes(
    [service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2]
)

# What each gRPC status a call can end with means for the request. Retriable: the server or its
# queue is the problem, not the request, so the same request can succeed later. Final: the
# request, the model or the deployment is the problem, and asking again gets the same answer.
_FAILURES: Mapping[grpc.StatusCode, type[GuardFailed]] = {
    grpc.StatusCode.UNAVAILABLE: GuardUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: GuardUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: GuardUnavailable,
    grpc.StatusCode.ABORTED: GuardUnavailable,
    grpc.StatusCode.CANCELLED: GuardUnavailable,
    grpc.StatusCode.INVALID_ARGUMENT: GuardError,
    grpc.StatusCode.NOT_FOUND: GuardError,
    grpc.StatusCode.ALREADY_EXISTS: GuardError,
    grpc.StatusCode.PERMISSION_DENIED: GuardError,
    grpc.StatusCode.UNAUTHENTICATED: GuardError,
    grpc.StatusCode.FAILED_PRECONDITION: GuardError,
    grpc.StatusCode.OUT_OF_RANGE: GuardError,
    grpc.StatusCode.UNIMPLEMENTED: GuardError,
    grpc.StatusCode.INTERNAL: GuardError,
    grpc.StatusCode.UNKNOWN: GuardError,
    grpc.StatusCode.DATA_LOSS: GuardError,
}


# tritonclient's own channel defaults (unbounded messages), plus a short reconnect backoff:
# gRPC's default grows to two minutes, and the breaker's probe should see a restarted Triton
# within seconds, not minutes.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None


def describe_served_model(
    metadata: service_pb2.ModelMetadataResponse,
    config: model_config_pb2.ModelConfig,
    version: str = "",
) -> ServedModel:
    """Read the model's metadata (its outputs, its versions) and its configuration (the name
    parameters); `version` is the version asked for ("": Triton answers with the newest)."""

    def parameter(key: str) -> str | None:
        # .get, not [key]: indexing a protobuf message map adds the key it looks up.
        value = config.parameters.get(key)
        return str(value.string_value) if value is not None and value.string_value else None

    return ServedModel(
        outputs=tuple(str(output.name) for output in metadata.outputs),
        name=parameter(_NAME_PARAMETER),
        version=parameter(_VERSION_PARAMETER),
        inputs=tuple(str(tensor.name) for tensor in metadata.inputs),
        triton_version=version or max(metadata.versions, key=_version_order, default=None),
    )


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def read_rating_log_prob(values: npt.NDArray[np.float32] | None) -> float | None:
    """The first value, or None when absent or NaN (the model found no deciding token)."""
    if values is None or values.size == 0:
        return None
    value = float(values.reshape(-1)[0])
    return None if math.isnan(value) or value > 0 else value


class Tensor(NamedTuple):
    name: str
    datatype: str
    array: npt.NDArray[np.generic]


def request_tensors(
    prompt: str,
    pixels: npt.NDArray[np.uint8],
    sampling: Sampling,
    history: Sequence[Turn] = (),
) -> list[Tensor]:
    """The request tensors for one prompt and one (H, W, 3) RGB image, after `history`."""
    arrays: list[tuple[str, npt.NDArray[np.generic]]] = [
        ("text_input", np.array([[prompt.encode()]], dtype=np.object_)),
        ("image_bytes_input", pixels.reshape((1, 1, *pixels.shape))),
        ("max_tokens", np.array([[sampling.max_tokens]], dtype=np.int32)),
        ("temperature", np.array([[sampling.temperature]], dtype=np.float32)),
        ("top_p", np.array([[sampling.top_p]], dtype=np.float32)),
        ("top_k", np.array([[sampling.top_k]], dtype=np.int32)),
    ]
    optional: list[tuple[str, int | None, type[np.generic]]] = [
        ("end_id", sampling.end_id, np.int32),
        ("pad_id", sampling.pad_id, np.int32),
        ("seed", sampling.seed, np.uint64),
    ]
    arrays += [(name, np.array([[v]], dtype=t)) for name, v, t in optional if v is not None]
    if history:
        turns = [{"role": turn.role, "content": turn.text} for turn in history]
        arrays.append((MESSAGES, np.array([[orjson.dumps(turns)]], dtype=np.object_)))
    return [Tensor(name, _triton_dtype(array), array) for name, array in arrays]


def serialize_request(model: str, version: str, tensors: list[Tensor], outputs: list[str]) -> bytes:
    """A ModelInferRequest in protobuf's wire format, each tensor's data copied once.

    The message without the tensors' data is small and made by protobuf; the data follows as
    one `raw_input_contents` field per tensor, in the inputs' order: a repeated field may be
    written after the others, and protobuf parsers append its values in the order they come.
    """
    message = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for tensor in tensors:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape)
    for output in outputs:
        message.outputs.add(name=output)
    parts: list[bytes | memoryview] = [message.SerializeToString()]
    for tensor in tensors:
        data = _raw(tensor)
        parts += [_RAW_CONTENTS_TAG, _varint(memoryview(data).nbytes), data]
    return b"".join(parts)


def _raw(tensor: Tensor) -> bytes | memoryview:
    """Triton's raw form of a tensor: BYTES elements each after its 4-byte little-endian
    length; anything else its little-endian values, row-major (a view, not a copy)."""
    if tensor.datatype == "BYTES":
        return b"".join(len(item).to_bytes(4, "little") + item for item in tensor.array.reshape(-1))
    array = np.ascontiguousarray(tensor.array, dtype=tensor.array.dtype.newbyteorder("<"))
    return array.reshape(-1).data.cast("B")


def _triton_dtype(array: npt.NDArray[np.generic]) -> str:
    return {
        np.dtype(np.object_): "BYTES",
        np.dtype(np.uint8): "UINT8",
        np.dtype(np.int32): "INT32",
        np.dtype(np.uint64): "UINT64",
        np.dtype(np.float32): "FP32",
    }[array.dtype]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def classify_rpc_error(exc: grpc.aio.AioRpcError, model: str) -> GuardFailed:
    """Our error for a failed call, by its gRPC status (`_FAILURES`); a status gRPC adds later
    is final until it is classified."""
    failure = _FAILURES.get(exc.code(), GuardError)
    return failure(f"Triton model {model!r}: {exc.code()}: {exc.details()}")


def read_text_output(values: npt.NDArray[np.object_] | None, model: str) -> str:
    if values is None or values.size == 0:
        raise GuardError(f"Triton model {model!r} returned no {TEXT_OUTPUT}")
    first = values.reshape(-1)[0]
    return first.decode("utf-8", errors="replace") if isinstance(first, bytes) else str(first)


class GuardClient:
    """One gRPC channel to Triton, shared by every in-flight event and by the readiness probes."""

    def __init__(
        self,
        url: str,
        model: str,
        sampling: Sampling,
        *,
        version: str = "",
        timeout_s: float = 60.0,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # The stub's ModelInfer would serialize a message; this one takes it already serialized.
        self._model_infer = self._channel.unary_unary(
            _MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        self.url = url
        self.model = model
        self.version = version
        self._sampling = sampling
        self._timeout_s = timeout_s
        self._served: ServedModel | None = None
        self._describing = asyncio.Lock()

    async def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Return once the server and the model are ready; GuardUnavailable after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (problem := await self.not_ready(poll_s * 4)) is not None:
            if time.monotonic() >= deadline:
                raise GuardUnavailable(
                    f"Triton at {self.url} not ready after {timeout_s:.0f}s: {problem}"
                )
            log.info("waiting for Triton at %s: %s", self.url, problem)
            await asyncio.sleep(poll_s)

    async def not_ready(self, timeout_s: float) -> str | None:
        """Why the model cannot take requests now, or None when it can."""
        try:
            server = await self._stub.ServerReady(
                service_pb2.ServerReadyRequest(), timeout=timeout_s
            )
            if not server.ready:
                return "server is not ready"
            model = await self._stub.ModelReady(
                service_pb2.ModelReadyRequest(name=self.model, version=self.version),
                timeout=timeout_s,
            )
            if not model.ready:
                return f"model {self.model!r} is not ready (is it in the model repository?)"
            await self._served_model(timeout_s)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code()}: {exc.details()}"
        return None

    async def _served_model(self, timeout_s: float) -> ServedModel:
        if self._served is not None:  # every request asks: no lock once it is known
            return self._served
        # One reading for all the requests that find it missing, not one each.
        async with self._describing:
            if self._served is None:
                self._served = await self._describe(timeout_s)
            return self._served

    async def _describe(self, timeout_s: float) -> ServedModel:
        metadata = await self._stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=self.model, version=self.version),
            timeout=timeout_s,
        )
        config = await self._stub.ModelConfig(
            service_pb2.ModelConfigRequest(name=self.model, version=self.version),
            timeout=timeout_s,
        )
        served = describe_served_model(metadata, config.config, self.version)
        log.info(
            "Triton model %r serves %s %s (outputs: %s)",
            self.model,
            served.name or "an unnamed model",
            served.version or "",
            ", ".join(served.outputs),
        )
        return served

    async def identity(self) -> tuple[str, str]:
        """(name, version) of the model behind the Triton name, as verdicts name it when the
        answer does not: the config's name parameters, else the Triton name and version."""
        served = await self._served_model(self._timeout_s)
        if served.name is not None:
            return served.name, served.version or served.triton_version or self.version
        return self.model, served.triton_version or self.version

    async def ask(
        self,
        prompt: str,
        pixels: npt.NDArray[np.uint8],
        headers: Mapping[str, str] | None = None,
        history: Sequence[Turn] = (),
    ) -> GuardReply:
        """One inference; `headers` carry the trace context as gRPC metadata to Triton.

        `history`: the earlier turns of a conversation about this image (`service.ask`);
        `prompt` is then the newest question. A model that does not declare `messages` cannot
        hold one: GuardError, before anything is sent.
        """
        tensors = request_tensors(prompt, pixels, self._sampling, history)
        try:
            served = await self._served_model(self._timeout_s)
            if history and MESSAGES not in served.inputs:
                raise GuardError(
                    f"Triton model {self.model!r} takes no {MESSAGES} input: it answers single "
                    "questions only (update its model repository to hold a conversation)"
                )
            wanted = [TEXT_OUTPUT]
            if RATING_LOG_PROB in served.outputs:
                wanted.append(RATING_LOG_PROB)
            response = await self._model_infer(
                serialize_request(self.model, self.version, tensors, wanted),
                metadata=tuple((headers or {}).items()),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            failure = classify_rpc_error(exc, self.model)
            if isinstance(failure, GuardUnavailable):
                self._served = None  # read it again once Triton is back: it may have changed
            raise failure from exc
        # tritonclient's reading of the response's tensors (it reads, it does not call).
        result = InferResult(response)
        return GuardReply(
            text=read_text_output(result.as_numpy(TEXT_OUTPUT), self.model),
            model_name=response.model_name,
            model_version=response.model_version,
            rating_log_prob=read_rating_log_prob(result.as_numpy(RATING_LOG_PROB))
            if RATING_LOG_PROB in wanted
            else None,
            served=served,
        )

    async def close(self) -> None:
        await self._channel.close()
