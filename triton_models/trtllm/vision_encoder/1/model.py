"""Triton glue for the vision encoder: patches in, the TensorRT vision engine, table rows out.

The requests of a batch share engine runs (`vision_features.run_batched`); each request gets
its own response, an error one when its tensors are wrong. Nothing raises out of `execute`.
Needs a GPU, torch and tensorrt_llm (the TensorRT-LLM Triton image has both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils
from model_parameters import ModelParameters, string_values
from vision_features import Layout, layouts, run_batched

OUTPUT = "prompt_embedding_table"
ENGINE_INPUT = "input"
ENGINE_OUTPUT = "encoder_output"


class VisionEngine:
    """The TensorRT vision engine (tensorrt_llm's runtime Session) on one GPU."""

    def __init__(self, engine_file: Path, device: Any) -> None:
        import torch
        from tensorrt_llm.runtime import Session

        self._torch = torch
        self._device = device
        with torch.cuda.device(device):
            self._session = Session.from_serialized_engine(engine_file.read_bytes())
            self._stream = torch.cuda.Stream(device)

    def run(self, patches: Any) -> Any:
        """[n, 3, H, W] patches -> [n, tokens, hidden] features, on the GPU."""
        from tensorrt_llm._utils import torch_dtype_to_trt, trt_dtype_to_torch
        from tensorrt_llm.runtime import TensorInfo

        torch = self._torch
        patches = patches.to(self._device, torch.float16).contiguous()
        shapes = self._session.infer_shapes(
            [TensorInfo(ENGINE_INPUT, torch_dtype_to_trt(patches.dtype), tuple(patches.shape))]
        )
        outputs = {
            info.name: torch.empty(
                tuple(info.shape), dtype=trt_dtype_to_torch(info.dtype), device=self._device
            )
            for info in shapes
        }
        with torch.cuda.stream(self._stream):
            if not self._session.run({ENGINE_INPUT: patches}, outputs, self._stream.cuda_stream):
                raise RuntimeError("the vision engine failed to run")
        self._stream.synchronize()
        return outputs[ENGINE_OUTPUT]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig

        parameters = ModelParameters(string_values(args["model_config"]))
        model_dir = Path(args["model_repository"])
        engine_dir = model_dir / parameters.string("engine_dir", blank=False)
        builder = json.loads((engine_dir / "config.json").read_text())["builder_config"]
        model_type = builder["model_type"]
        self._max_batch = int(builder["max_batch_size"])
        self._device = torch.device(f"cuda:{args['model_instance_device_id']}")
        newline_file = engine_dir / "image_newlines.safetensors"
        newline = load_file(str(newline_file))["image_newline"] if newline_file.exists() else None
        hf_config = AutoConfig.from_pretrained(
            str(model_dir / parameters.string("hf_dir", blank=False))
        )
        known = layouts(hf_config, newline)
        if model_type not in known:
            raise ValueError(
                f"vision engine of model type {model_type!r}: this model knows "
                f"{', '.join(sorted(known))}"
            )
        self._layout: Layout = known[model_type]
        self._engine = VisionEngine(engine_dir / "model.engine", self._device)
        self._torch = torch

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        patches, sizes, valid = [], [], []
        for index, request in enumerate(requests):
            try:
                request_patches, size = self._read(request)
            except ValueError as exc:
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            patches.append(request_patches)
            sizes.append(size)
            valid.append(index)
        try:
            features = run_batched(patches, self._engine.run, self._max_batch)
            tables = [self._layout.pack(f, size) for f, size in zip(features, sizes, strict=True)]
        # Broad on purpose: the engine's or torch's error becomes each request's error.
        except Exception as exc:
            pb_utils.Logger.log_error(f"vision_encoder: {len(valid)} images failed: {exc!r}")
            for index in valid:
                responses[index] = _error(
                    f"vision encoder failed: {exc}", pb_utils.TritonError.INTERNAL
                )
            return responses
        from torch.utils.dlpack import to_dlpack

        for index, table in zip(valid, tables, strict=True):
            tensor = pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(table[None].contiguous()))
            responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def _read(self, request: Any) -> tuple[Any, tuple[int, int]]:
        torch = self._torch
        pixel_values = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
        image_sizes = pb_utils.get_input_tensor_by_name(request, "image_sizes").as_numpy()
        if pixel_values.ndim != 5 or pixel_values.shape[0] != 1 or image_sizes.shape != (1, 2):
            raise ValueError(
                f"expected pixel_values [1, patches, 3, H, W] and image_sizes [1, 2], got "
                f"{list(pixel_values.shape)} and {list(image_sizes.shape)}"
            )
        size = (int(image_sizes[0, 0]), int(image_sizes[0, 1]))
        count = self._layout.patch_count(size)
        if count > pixel_values.shape[1]:
            raise ValueError(
                f"an image of {size} needs {count} patches, got {pixel_values.shape[1]}"
            )
        return torch.from_numpy(pixel_values[0, :count]), size

    def finalize(self) -> None:
        self._engine = None


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
