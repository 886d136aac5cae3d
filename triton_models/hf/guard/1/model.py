"""Triton Python-backend glue for the HF guard: request tensors in, `hf_guard`, answers out.

Each request of a batch gets its own response. A request that breaks the contract gets an
INVALID_ARG error response (the consumer does not retry those), one the model fails on gets
INTERNAL, and the others are still answered; nothing raises out of `execute`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from guard_request import InvalidRequestError
from hf_guard import (
    Answer,
    Engine,
    Prepared,
    parse_request,
    parse_settings,
    plan_batches,
    resolve_device,
)
from model_parameters import string_values

TEXT_OUTPUT = "text_output"
RATING_LOG_PROB = "rating_log_prob"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # InvalidSettingsError fails the load with its message: a guard that cannot say which
        # model it is, or runs another one, must not answer.
        self._settings = parse_settings(string_values(args["model_config"]))
        device = resolve_device(
            self._settings.device,
            args.get("model_instance_kind", "CPU"),
            args.get("model_instance_device_id", "0"),
        )
        self._engine = Engine(self._settings, device)
        pb_utils.Logger.log_info(
            f"guard: {self._settings.model_name} {self._settings.model_version} from "
            f"{self._settings.checkpoint} on {device} as {self._settings.dtype}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        prepared: dict[int, Prepared] = {}
        for index, request in enumerate(requests):
            try:
                parsed = parse_request(
                    lambda name, request=request: _input(request, name),
                    self._settings,
                    self._engine.vocab_size,
                )
                prepared[index] = self._engine.prepare(parsed)
            except InvalidRequestError as exc:
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
            # Broad on purpose: whatever the processor raises fails this request only.
            except Exception as exc:
                responses[index] = _failure(exc, "preparing")
        indices = list(prepared)
        for group in plan_batches([prepared[index].sampling for index in indices]):
            members = [indices[position] for position in group]
            results = self._engine.answer([prepared[index] for index in members])
            for index, result in zip(members, results, strict=True):
                responses[index] = (
                    _answer_response(result)
                    if isinstance(result, Answer)
                    else _failure(result, "generating")
                )
        return responses

    def finalize(self) -> None:
        # Frees the weights (and the CUDA memory they hold) when Triton unloads the model.
        del self._engine


def _input(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _answer_response(answer: Answer) -> Any:
    text = np.array([[answer.text.encode("utf-8")]], dtype=np.object_)
    rating = np.array([[answer.rating_log_prob]], dtype=np.float32)
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor(TEXT_OUTPUT, text),
            pb_utils.Tensor(RATING_LOG_PROB, rating),
        ]
    )


def _failure(exc: BaseException, stage: str) -> Any:
    pb_utils.Logger.log_error(f"guard: {stage} failed: {exc!r}")
    return _error(f"{stage} failed: {exc}", pb_utils.TritonError.INTERNAL)


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
