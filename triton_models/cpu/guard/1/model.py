"""Triton Python-backend glue for the CPU guard: request tensors in, `nudenet_rules`, answers out.

Each request of a batch gets its own response. A request whose image cannot be judged gets an
error response and the others are still judged; the images that can be judged go through the
detector in one onnxruntime run. Nothing raises out of `execute`.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils
from guard_request import (
    IMAGE_INPUT,
    MESSAGES_INPUT,
    InvalidRequestError,
    history_from_tensor,
    image_from_tensor,
)
from model_parameters import string_values
from nudenet_rules import (
    Detector,
    RGBImage,
    answer_json,
    exempt_categories,
    follow_up_answer,
    judge,
    model_version,
    parse_settings,
)

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # An InvalidSettingsError here fails the model load with its message, which is the
        # point: a guard with misread rules must not answer.
        settings = parse_settings(string_values(args["model_config"]))
        self._policy = settings.policy
        self._max_image_side = settings.max_image_side
        self._version = model_version(settings.policy, version("nudenet"))
        self._detector = Detector(settings.intra_op_num_threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: list[RGBImage] = []
        asked: list[_Asked] = []
        judged: list[int] = []
        for index, request in enumerate(requests):
            try:
                image, question = self._image(request), _asked(request)
            except InvalidRequestError as exc:
                # INVALID_ARG, not the default INTERNAL: the client must not retry this one.
                responses[index] = _error_response(str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            images.append(image)
            asked.append(question)
            judged.append(index)
        for index, response in zip(judged, self._judge(images, asked), strict=True):
            responses[index] = response
        return responses

    def finalize(self) -> None:
        # Frees the onnxruntime session (weights and arenas) when Triton unloads the model.
        del self._detector

    def _image(self, request: Any) -> RGBImage:
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        if tensor is None:
            raise InvalidRequestError(f"{IMAGE_INPUT} is missing")
        return image_from_tensor(tensor.as_numpy(), self._max_image_side)

    def _judge(self, images: list[RGBImage], asked: list[_Asked]) -> list[Any]:
        """One response per image, from one detector run over all of them."""
        try:
            detections = self._detector.detect(images)
        # Broad on purpose: whatever onnxruntime raises becomes each request's error, and
        # never escapes execute.
        except Exception as exc:
            pb_utils.Logger.log_error(f"guard: detector failed on {len(images)} images: {exc!r}")
            return [
                _error_response(f"detector failed: {exc}", pb_utils.TritonError.INTERNAL)
                for _ in images
            ]
        responses = []
        for found, (text, first_turn) in zip(detections, asked, strict=True):
            # A follow-up is answered with the judgement of the conversation's first turn (the
            # policy prompt, whose exceptions count), not of the question.
            answer = judge(found, self._policy, exempt_categories(first_turn or text))
            if first_turn is None:
                responses.append(_text_response(answer_json(answer, self._version)))
            else:
                responses.append(_text_response(follow_up_answer(answer, text)))
        return responses


class _Asked(NamedTuple):
    text: str
    """text_input: the policy prompt, or the newest question of a conversation."""
    first_turn: str | None
    """The conversation's first user turn when this is a follow-up, else None."""


def _asked(request: Any) -> _Asked:
    tensor = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT)
    if tensor is None:
        raise InvalidRequestError(f"{TEXT_INPUT} is missing")
    prompt = tensor.as_numpy().reshape(-1)[0]
    text = prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else str(prompt)
    messages = pb_utils.get_input_tensor_by_name(request, MESSAGES_INPUT)
    history = history_from_tensor(None if messages is None else messages.as_numpy())
    return _Asked(text, history[0].text if history else None)


def _text_response(text: str) -> Any:
    answer = np.array([[text.encode("utf-8")]], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(TEXT_OUTPUT, answer)])


def _error_response(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
