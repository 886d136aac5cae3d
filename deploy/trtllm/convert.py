"""Convert a LLaVA -hf checkpoint for TensorRT-LLM: the language model's checkpoint for
trtllm-build, and the vision engine. Runs in the pinned Triton TensorRT-LLM image, on a GPU.

    python deploy/trtllm/convert.py llm    --hf-dir HF --out CKPT [--model-type T] [--dtype float16]
    python deploy/trtllm/convert.py vision --hf-dir HF --out ENGINE --max-batch-size N \
        [--model-type T]

T is the checkpoint's model type: `llava_onevision` (LlavaGuard-v1.2-OV, the default) or `llava`
(LLaVA-1.5: ICM-LLaVA-v1.5-7B). Both steps use the tensorrt_llm wheel's own API, as
TensorRT-LLM's examples do:

- llm: `<class>.from_hugging_face` reads the HF LLaVA checkpoint as its text tower and
  `save_checkpoint` writes the unified checkpoint; tensor parallelism 1.
  - llava_onevision: `QWenForCausalLM` (model type `qwen2_llava_onevision`,
    tensorrt_llm/models/qwen/config.py; what examples/models/core/qwen/convert_checkpoint.py does).
  - llava: `LLaMAForCausalLM`; `LLaMAConfig.from_hugging_face` takes a `llava` config's
    text_config (tensorrt_llm/models/llama/config.py, read at commit 04100fd); what
    examples/models/core/llama/convert_checkpoint.py does for LLaVA in the multimodal README
    (examples/models/core/multimodal/README.md, "LLaVA, LLaVa-NeXT, LLaVA-OneVision and VILA",
    read at commit 000a01d).
- vision: `tensorrt_llm.tools.multimodal_builder` (what examples/models/core/multimodal/
  build_multimodal_engine.py wraps) with `--model_type T`: the vision tower and projector to ONNX
  to a TensorRT engine taking up to N patches per run.
  - llava_onevision: SigLIP on 384x384 patches, plus the model's image_newline in
    image_newlines.safetensors.
  - llava: CLIP on one 336x336 crop per image, the selected layer without the class token,
    then the projector: [N, 576, hidden] (build_llava_engine, read at commit 000a01d).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

MODEL_TYPES = ("llava_onevision", "llava")


def convert_llm(hf_dir: Path, out: Path, dtype: str, model_type: str) -> None:
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM, QWenForCausalLM

    model_class = {"llava_onevision": QWenForCausalLM, "llava": LLaMAForCausalLM}[model_type]
    model = model_class.from_hugging_face(
        str(hf_dir), dtype, mapping=Mapping(world_size=1, rank=0, tp_size=1, pp_size=1)
    )
    model.save_checkpoint(str(out), save_config=True)


def build_vision(hf_dir: Path, out: Path, max_batch_size: int, model_type: str) -> None:
    from tensorrt_llm.tools.multimodal_builder import (
        MultimodalEngineBuilder,
        add_multimodal_arguments,
    )

    args = add_multimodal_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--model_type",
            model_type,
            "--model_path",
            str(hf_dir),
            "--output_dir",
            str(out),
            "--max_batch_size",
            str(max_batch_size),
        ]
    )
    MultimodalEngineBuilder(args).build()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    llm = steps.add_parser("llm", help="the language model's TensorRT-LLM checkpoint")
    llm.add_argument("--hf-dir", type=Path, required=True)
    llm.add_argument("--out", type=Path, required=True)
    # float16 only: the prompt table the vision engine writes is FP16 (config.pbtxt).
    llm.add_argument("--dtype", default="float16", choices=["float16"])
    vision = steps.add_parser("vision", help="the vision engine")
    vision.add_argument("--hf-dir", type=Path, required=True)
    vision.add_argument("--out", type=Path, required=True)
    vision.add_argument("--max-batch-size", type=int, required=True, help="patches per run")
    for step in (llm, vision):
        step.add_argument("--model-type", default="llava_onevision", choices=MODEL_TYPES)
    args = parser.parse_args(argv)
    if args.step == "llm":
        convert_llm(args.hf_dir, args.out, args.dtype, args.model_type)
    else:
        build_vision(args.hf_dir, args.out, args.max_batch_size, args.model_type)
    return 0


# The tensorrt_llm wheel may re-run this file in MPI worker processes: keep the guard.
if __name__ == "__main__":
    sys.exit(main())
