"""Triton glue for the TensorRT-LLM guard (BLS): requests in, `trtllm_guard`, calls out, answers.

A batch's requests are preprocessed one after the other (CPU), then their `vision_encoder` and
`tensorrt_llm` calls are issued together (async BLS), so the in-flight batcher sees them at once.
Each request gets its own response: one that cannot be judged gets an error (INVALID_ARG when
the request is at fault) and the others are still judged. Nothing raises out of `execute`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from guard_answer import yes_no_rivals
from guard_request import InvalidRequestError
from model_parameters import string_values
from square_padding import mean_fill_rgb, pad_to_square
from trtllm_guard import (
    GuardRequest,
    Settings,
    check_table,
    generated_ids,
    llm_inputs,
    parse_settings,
    preprocess,
    prompt_table_ids,
    read_answer,
    read_request,
    token_id,
)

TEXT_OUTPUT = "text_output"
RATING_LOG_PROB = "rating_log_prob"
ENCODER_OUTPUT = "prompt_embedding_table"
LLM_OUTPUTS = ["output_ids", "sequence_length", "output_log_probs"]
GENERATION_LOGITS = "generation_logits"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Imported here: the Triton image has transformers; the module's tests need only numpy.
        from transformers import AutoProcessor

        model_dir = Path(args["model_repository"])
        # An InvalidSettingsError fails the model load with its message: a guard that would
        # answer with the wrong template, limits or schema must not answer at all.
        self._settings: Settings = parse_settings(string_values(args["model_config"]), model_dir)
        self._processor = AutoProcessor.from_pretrained(str(self._settings.processor_dir))
        tokenizer = self._processor.tokenizer
        vocab = tokenizer.get_vocab()
        self._end_id = token_id(vocab, self._settings.end_token, "end_token")
        self._pad_id = token_id(vocab, self._settings.pad_token, "pad_token")
        self._image_token_id = token_id(vocab, self._processor.image_token, "processor image_token")
        self._tokenizer = tokenizer
        self._rival_of = yes_no_rivals(vocab)
        self._pad_fill = (
            mean_fill_rgb(self._processor.image_processor.image_mean)
            if self._settings.pad_to_square
            else None
        )

    def _decode(self, ids: Any) -> str:
        text: str = self._tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._judge(request) for request in requests)))

    async def _judge(self, request: Any) -> Any:
        settings = self._settings
        try:
            guard_request = read_request(
                lambda name: _numpy_input(request, name), settings.max_image_side
            )
            return await self._generate(self._squared(guard_request))
        except InvalidRequestError as exc:
            return _error_response(str(exc), pb_utils.TritonError.INVALID_ARG)
        # Broad on purpose: whatever the processor, the encoder or the engine raise becomes this
        # request's error, and never escapes execute.
        except Exception as exc:
            pb_utils.Logger.log_error(f"guard: request failed: {exc!r}")
            return _error_response(f"guard failed: {exc}", pb_utils.TritonError.INTERNAL)

    def _squared(self, guard_request: GuardRequest) -> GuardRequest:
        """The request with its image padded to a square (`pad_to_square`, LLaVA-1.5), which
        the processor then sees as LLaVA-1.5's own preprocessing would give it."""
        if self._pad_fill is None:
            return guard_request
        return dataclasses.replace(
            guard_request, image=pad_to_square(guard_request.image, self._pad_fill)
        )

    async def _generate(self, guard_request: GuardRequest) -> Any:
        settings = self._settings
        pre = preprocess(
            self._processor, guard_request.prompt, guard_request.image, guard_request.history
        )
        ids, image_tokens = prompt_table_ids(
            pre.input_ids, self._image_token_id, settings.limits.vocab_size
        )
        tensors = llm_inputs(
            ids,
            image_tokens,
            guard_request.sampling,
            settings.limits,
            end_id=self._end_id,
            pad_id=self._pad_id,
            guided_json_schema=settings.guided_json_schema,
            generation_logits=settings.yes_no_logits,
        )
        encoded = await _call(
            settings.vision_encoder_model,
            [
                pb_utils.Tensor("pixel_values", pre.pixel_values),
                pb_utils.Tensor("image_sizes", pre.image_sizes),
            ],
            [ENCODER_OUTPUT],
        )
        table = pb_utils.get_output_tensor_by_name(encoded, ENCODER_OUTPUT)
        check_table(table.shape(), image_tokens)
        # Passed on as it is: it stays where the encoder left it (GPU memory), and the engine
        # reads it there.
        inputs = [pb_utils.Tensor(name, value) for name, value in tensors.items()]
        inputs.append(table)
        wanted = LLM_OUTPUTS + ([GENERATION_LOGITS] if settings.yes_no_logits else [])
        generated = await _call(settings.llm_model, inputs, wanted)
        outputs = {name: _numpy_output(generated, name) for name in wanted}
        stop_ids = {int(tensors["end_id"][0, 0]), int(tensors["pad_id"][0, 0])}
        ids_out = generated_ids(outputs["output_ids"], outputs["sequence_length"], list(stop_ids))
        answer = read_answer(
            ids_out,
            outputs["output_log_probs"],
            self._decode,
            settings.decision_pattern,
            self._rival_of,
            outputs.get(GENERATION_LOGITS),
            greedy=int(tensors.get("runtime_top_k", np.zeros((1, 1)))[0, 0]) == 1,
        )
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(
                    TEXT_OUTPUT, np.array([[answer.text.encode("utf-8")]], dtype=np.object_)
                ),
                pb_utils.Tensor(
                    RATING_LOG_PROB, np.array([[answer.rating_log_prob]], dtype=np.float32)
                ),
            ]
        )

    def finalize(self) -> None:
        self._processor = None


async def _call(model: str, inputs: list[Any], outputs: list[str]) -> Any:
    """One BLS call; its error becomes ours."""
    response = await pb_utils.InferenceRequest(
        model_name=model, inputs=inputs, requested_output_names=outputs
    ).async_exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return response


def _numpy_input(request: Any, name: str) -> Any:
    # The client's inputs arrive in CPU memory (FORCE_CPU_ONLY_INPUT_TENSORS is not set).
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _numpy_output(response: Any, name: str) -> Any:
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    if tensor is None:
        return None
    if tensor.is_cpu():
        return tensor.as_numpy()
    # torch is in the Triton image; a GPU output is copied to the host.
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def _error_response(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
