"""Triton Python-backend model for benchmarks only: the guard's contract, no inference.

Every request whose image tensor has the contract's shape gets the same fixed LlavaGuard answer,
which names this model and says that nothing was judged; any other request gets its own error,
as from the real guard. See ../config.pbtxt for why it exists and where it must not be used.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

IMAGE_INPUT = "image_bytes_input"
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
        # Built once: each response only wraps the same array in a new tensor.
        self._answer = np.array([[ANSWER.encode("utf-8")]], dtype=np.object_)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            problem = _image_problem(pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT))
            if problem is None:
                tensor = pb_utils.Tensor(TEXT_OUTPUT, self._answer)
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            else:
                # INVALID_ARG as from the real guard: the client must not retry this request.
                error = pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses


def _image_problem(tensor: Any) -> str | None:
    """Why a request's image breaks the contract ([1, 1, H, W, 3] UINT8, not empty), or None."""
    if tensor is None:
        return f"{IMAGE_INPUT} is missing"
    image = tensor.as_numpy()
    shape = list(image.shape)
    if image.ndim != 5 or shape[4] != 3:
        return f"{IMAGE_INPUT}: expected shape [1, 1, H, W, 3], got {shape}"
    if image.dtype != np.uint8:
        return f"{IMAGE_INPUT}: expected UINT8, got {image.dtype}"
    if shape[0] * shape[1] != 1:
        return f"{IMAGE_INPUT}: expected one image, got {shape[0] * shape[1]}"
    if shape[2] == 0 or shape[3] == 0:
        return f"{IMAGE_INPUT}: empty image of {shape[3]}x{shape[2]} pixels"
    return None
