"""Triton Python-backend model for benchmarks only: the guard's contract, no inference.

Every request whose image tensor passes the real guards' check (`guard_request`) gets the same
fixed LlavaGuard answer, which names this model and says that nothing was judged; any other
request gets the error the real guard would give it. See ../config.pbtxt for why it exists and
where it must not be used.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from guard_request import IMAGE_INPUT, InvalidRequestError, image_from_tensor
from model_parameters import ModelParameters, string_values

TEXT_OUTPUT = "text_output"

ANSWER = json.dumps(
    {
        "rating": "Safe",
        "category": "NA: None applying",
        "rationale": "Benchmark model: no inference was run; this answer is fixed so that only "
        "the service is measured.",
        "model": {"name": "fixed-answer-benchmark", "version": "1"},
    }
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = ModelParameters(string_values(args["model_config"]))
        self._max_image_side = parameters.integer("max_image_side", minimum=1)
        # Built once: each response only wraps the same array in a new tensor.
        self._answer = np.array([[ANSWER.encode("utf-8")]], dtype=np.object_)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                self._check(request)
            except InvalidRequestError as exc:
                # INVALID_ARG as from the real guard: the client must not retry this request.
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            answer = pb_utils.Tensor(TEXT_OUTPUT, self._answer)
            responses.append(pb_utils.InferenceResponse(output_tensors=[answer]))
        return responses

    def _check(self, request: Any) -> None:
        """The real guard's check of the request's image, the image itself unused."""
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        if tensor is None:
            raise InvalidRequestError(f"{IMAGE_INPUT} is missing")
        image_from_tensor(tensor.as_numpy(), self._max_image_side)
