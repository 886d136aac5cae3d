"""Check that TensorRT-LLM's weight loader will find a LLaVA checkpoint's language model, and fix
what can be fixed, before build.sh converts it. Reads only config.json and the safetensors
headers (the JSON before the tensors): no torch, no transformers.

    python deploy/trtllm/checkpoint_layout.py --hf-dir HF [--model-type llava_onevision] [--fix OUT]
    python deploy/trtllm/checkpoint_layout.py --hf-dir HF --model-type llava --config-only

Why: TensorRT-LLM's loaders read the language model's weights under the names transformers
wrote before 4.52, and look under no other names:

- LLaVA-OneVision (Qwen2): `QWenForCausalLM.from_hugging_face`, `tensorrt_llm/models/qwen/
  model.py`, maps the model type `qwen2_llava_onevision` to `language_model.model.*` (the
  decoder) and `language_model.lm_head.*`; `QWenConfig.from_hugging_face` (`qwen/config.py`)
  takes `text_config` and reads `text_config.architectures[0]`, so a config without it fails.
- LLaVA-1.5 (LLaMA): `LLaMAForCausalLM.from_hugging_face`, `tensorrt_llm/models/llama/
  model.py`, maps a `llava` checkpoint to the same `language_model.model.*` /
  `language_model.lm_head.*`; `LLaMAConfig.from_hugging_face` (`llama/config.py`) takes
  `text_config` and reads `architectures[0]` too.

(Read in NVIDIA/TensorRT-LLM through the code search here, which stores files at assorted
commits: every stored version of qwen/model.py that knows `qwen2_llava_onevision` has this
mapping, recent ones (that also know Qwen3) included. The v1.2.1 tag itself could not be
fetched, the repository being over the fetch limit.) transformers 4.52 moved these models'
weights to `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*` (`model.image_newline`): the loader would find none of the
language model's weights in a checkpoint saved that way.

`--fix OUT` writes a checkpoint TensorRT-LLM reads into OUT: symbolic links to HF's files, except
config.json when `text_config.architectures` is missing (filled with the text model's class) and
the safetensors files and their index when the weights have the newer names (renamed back to
the older ones: a new header, the same tensor bytes). Exit status 0: fine, or fixed into OUT;
2: something no renaming fixes (printed).

A checkpoint in the original LLaVA format (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`, as
ICM-LLaVA-v1.5-7B is published: `mm_vision_tower` / `mm_projector_type` in config.json, no
`vision_config`; its model type may read "llava" all the same) is refused with the command that
converts it to transformers' llava format (`CONVERT_COMMAND`). `--config-only` reads config.json
alone (that and the model type), so build.sh can refuse such a checkpoint before it reads
gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
# A safetensors header is a few hundred KiB even for 7B models; this bounds a corrupt length.
MAX_HEADER_BYTES = 64 << 20


@dataclass(frozen=True)
class Layout:
    """What TensorRT-LLM's loader expects of one model type's -hf checkpoint."""

    model_type: str  # config.json `model_type`
    text_model_types: tuple[str, ...]  # text_config.model_type it converts
    text_architecture: str  # the class written into text_config.architectures when missing
    loader: str  # where the expected names come from
    # transformers >= 4.52's prefix -> the prefix TensorRT-LLM reads (transformers' own
    # `_checkpoint_conversion_mapping` of the model, reversed).
    renames: tuple[tuple[str, str], ...] = field(default=())

    # The language model, as the loader names it.
    decoder: str = "language_model.model."
    lm_head: str = "language_model.lm_head."


_LLAVA_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

LAYOUTS = {
    "llava_onevision": Layout(
        model_type="llava_onevision",
        text_model_types=("qwen2",),
        text_architecture="Qwen2ForCausalLM",
        loader="tensorrt_llm/models/qwen/model.py (qwen2_llava_onevision)",
        renames=(*_LLAVA_RENAMES, ("model.image_newline", "image_newline")),
    ),
    "llava": Layout(
        model_type="llava",
        text_model_types=("llama",),
        text_architecture="LlamaForCausalLM",
        loader="tensorrt_llm/models/llama/model.py (llava)",
        renames=_LLAVA_RENAMES,
    ),
}


@dataclass
class Report:
    """What is wrong; `renames` and `config` are the fixes, `fatal` what has none."""

    fatal: list[str] = field(default_factory=list)
    fixable: list[str] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the fixed config.json, when it needs one

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.fixable


# The conversion of an original-format LLaVA-1.5 checkpoint (deploy/icm, another branch of issue
# 13); --vision-tower is a local copy of the CLIP tower it names in `mm_vision_tower`.
CONVERT_COMMAND = "python deploy/icm/convert_llava.py --original DIR --vision-tower DIR --out DIR"


def original_llava_problem(config: Mapping[str, Any]) -> str | None:
    """Why `config` is no transformers checkpoint but an original LLaVA one, or None."""
    original = [key for key in ("mm_vision_tower", "mm_projector_type") if key in config]
    if not original or "vision_config" in config:
        return None
    tower = config.get("mm_vision_tower")
    named = f" (its vision tower: {tower})" if isinstance(tower, str) else ""
    return (
        f"config.json is the original LLaVA format ({', '.join(original)}, no vision_config, "
        f"model_type {config.get('model_type')!r}){named}, which TensorRT-LLM and transformers do "
        f"not load as LLaVA: convert it to transformers' llava format first, {CONVERT_COMMAND}, "
        "then give the converted directory"
    )


# --- reading -----------------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> dtype, shape, data_offsets."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: header length {length} is not plausible")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    return header


def weight_files(hf_dir: Path) -> dict[str, list[str]]:
    """Each safetensors file of the checkpoint -> the tensor names in its header."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{hf_dir}: no *.safetensors files (.bin checkpoints are not read here)")
    return {p.name: [k for k in read_header(p) if k != "__metadata__"] for p in files}


# --- checking ----------------------------------------------------------------------------------


def _renamed(name: str, renames: Sequence[tuple[str, str]]) -> str:
    for new, old in renames:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def check(config: Mapping[str, Any], names: Sequence[str], layout: Layout) -> Report:
    """Compare a checkpoint's config and tensor names with what the loader reads."""
    report = Report()
    text = config.get("text_config")
    if not isinstance(text, dict):
        report.fatal.append("config.json has no text_config: not a LLaVA -hf checkpoint")
        return report
    if text.get("model_type") not in layout.text_model_types:
        report.fatal.append(
            f"config.json text_config.model_type is {text.get('model_type')!r}; "
            f"{layout.loader} converts {' or '.join(layout.text_model_types)}"
        )
    architectures = text.get("architectures")
    if not (isinstance(architectures, list) and architectures):
        report.fixable.append(
            "config.json text_config.architectures is missing: TensorRT-LLM's config reader "
            f"takes the text model's class from its first entry (fixed: "
            f"[{layout.text_architecture!r}])"
        )
        report.config = {
            **config,
            "text_config": {**text, "architectures": [layout.text_architecture]},
        }

    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    present = set(names)
    renamed = {_renamed(n, layout.renames) for n in present}
    required = [f"{layout.decoder}embed_tokens.weight", f"{layout.decoder}norm.weight"]
    required += [f"{layout.decoder}layers.{i}." for i in range(_layer_count(text))]
    if not tied:
        required.append(f"{layout.lm_head}weight")

    def has(names: set[str], wanted: str) -> bool:
        return (
            wanted in names
            if not wanted.endswith(".")
            else any(n.startswith(wanted) for n in names)
        )

    missing = [w for w in required if not has(present, w)]
    if not missing:
        return report
    still_missing = [w for w in required if not has(renamed, w)]
    if still_missing:
        shown = ", ".join(w + ("*" if w.endswith(".") else "") for w in still_missing[:6])
        more = f" and {len(still_missing) - 6} more" if len(still_missing) > 6 else ""
        report.fatal.append(
            f"the weights lack {shown}{more}, which {layout.loader} reads (under these names, "
            "or transformers >= 4.52's)"
        )
        return report
    report.renames = {
        n: _renamed(n, layout.renames) for n in names if _renamed(n, layout.renames) != n
    }
    newer = sorted({new for new, _ in layout.renames if any(n.startswith(new) for n in present)})
    report.fixable.append(
        f"the weights have transformers >= 4.52's names ({', '.join(p + '*' for p in newer)}); "
        f"{layout.loader} reads {layout.decoder}* and {layout.lm_head}* and would load none of "
        f"the language model (fixed: {len(report.renames)} tensors renamed back)"
    )
    return report


def _layer_count(text: Mapping[str, Any]) -> int:
    count = text.get("num_hidden_layers")
    return count if isinstance(count, int) and count > 0 else 1


# --- fixing ------------------------------------------------------------------------------------


def rename_tensors(source: Path, target: Path, renames: Mapping[str, str]) -> None:
    """Copy a safetensors file with tensors renamed: a new header, the same bytes after it."""
    header = read_header(source)
    renamed = {renames.get(k, k): v for k, v in header.items()}
    if len(renamed) != len(header):
        raise ValueError(f"{source.name}: renaming would merge two tensors")
    encoded = json.dumps(renamed, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
    with source.open("rb") as f, target.open("wb") as out:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length)
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        shutil.copyfileobj(f, out, 16 << 20)


def fix(hf_dir: Path, out: Path, report: Report) -> None:
    """Write into `out` the checkpoint with the report's fixes; links to everything else."""
    if report.fatal:
        raise ValueError("not fixable: " + "; ".join(report.fatal))
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(hf_dir.iterdir()):
        target = out / path.name
        if target.exists() or target.is_symlink():
            raise ValueError(f"{target} exists: --fix needs an empty directory")
        if path.name == "config.json" and report.config is not None:
            target.write_text(json.dumps(report.config, indent=2) + "\n")
        elif path.suffix == ".safetensors" and report.renames:
            rename_tensors(path, target, report.renames)
        elif path.name == INDEX and report.renames:
            index = json.loads(path.read_text())
            index["weight_map"] = {
                report.renames.get(k, k): v for k, v in index.get("weight_map", {}).items()
            }
            target.write_text(json.dumps(index, indent=2) + "\n")
        else:
            os.symlink(path.resolve(), target)


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, required=True)
    parser.add_argument(
        "--model-type", choices=sorted(LAYOUTS), help="expected config.json model_type"
    )
    parser.add_argument("--fix", type=Path, metavar="OUT", help="write the fixed checkpoint here")
    parser.add_argument(
        "--config-only", action="store_true", help="check config.json's format and type only"
    )
    args = parser.parse_args(argv)
    try:
        config = json.loads((args.hf_dir / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("config.json is not a JSON object")
        original = original_llava_problem(config)
        if original is not None:
            raise ValueError(original)
        model_type = config.get("model_type")
        if args.model_type and model_type != args.model_type:
            raise ValueError(f"config.json model_type is {model_type!r}, not {args.model_type!r}")
        if model_type not in LAYOUTS:
            raise ValueError(f"config.json model_type {model_type!r}: not one of {sorted(LAYOUTS)}")
        if args.config_only:
            return 0
        names = [n for names in weight_files(args.hf_dir).values() for n in names]
        report = check(config, names, LAYOUTS[model_type])
    except (OSError, ValueError) as exc:
        print(f"checkpoint_layout: {args.hf_dir}: {exc}", file=sys.stderr)
        return 2
    for problem in report.fatal + report.fixable:
        print(f"checkpoint_layout: {args.hf_dir}: {problem}", file=sys.stderr)
    if report.fatal:
        return 2
    if args.fix is not None:
        try:
            fix(args.hf_dir, args.fix, report)
        except (OSError, ValueError) as exc:
            print(f"checkpoint_layout: {args.fix}: {exc}", file=sys.stderr)
            return 2
        print(
            f"checkpoint_layout: {'fixed into' if not report.ok else 'linked as'} {args.fix}",
            file=sys.stderr,
        )
    elif not report.ok:
        print(
            "checkpoint_layout: --fix OUT writes a checkpoint TensorRT-LLM reads", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
