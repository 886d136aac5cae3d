"""Every model repository in triton_models, as Triton is given it: configurations that parse as
Triton's ModelConfig protobuf, and Python models that find the modules of ours they import.

Every repository is read as triton_models/fill.py renders it (the embedded stack and the images
serve it so): the template repositories (every folder with `*.tmpl` files: hf, trtllm) with a
value for each placeholder that has no default (a number, which text format also reads as a
string or a boolean), the plain ones (cpu, bench) as they are, and every one with
triton_models/common's modules beside each model.py. tritonclient ships the ModelConfig
definitions; text_format.Parse refuses unknown fields, wrong types and malformed text, as
tritonserver does when it loads a model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_models import fill

MODELS = Path(__file__).resolve().parents[1] / "triton_models"
# common/ is shared code, and __pycache__ appears wherever Python imported fill.py.
REPOSITORIES = sorted(
    p for p in MODELS.iterdir() if p.is_dir() and p.name not in {"common", "__pycache__"}
)
TEMPLATES = [p for p in REPOSITORIES if any(p.rglob("*" + fill.TEMPLATE_SUFFIX))]


def rendered(repository: Path, tmp_path: Path) -> Path:
    values = {p.name: "1" for p in fill.placeholders(repository) if p.default is None}
    out = tmp_path / repository.name
    fill.fill(repository, out, values)
    return out


def test_the_repositories_are_found() -> None:
    names = {p.name for p in REPOSITORIES}
    assert {"cpu", "bench", "trtllm"} <= names
    assert MODELS / "trtllm" in TEMPLATES
    assert MODELS / "cpu" not in TEMPLATES


@pytest.mark.parametrize("repository", REPOSITORIES, ids=lambda p: p.name)
def test_every_model_config_parses_as_tritons_model_config(
    repository: Path, tmp_path: Path
) -> None:
    root = rendered(repository, tmp_path)
    models = [p for p in root.iterdir() if p.is_dir()]
    assert models, f"{repository.name} has no model"
    for model in models:
        path = model / "config.pbtxt"
        assert path.is_file(), f"{model} has no config.pbtxt"
        text = path.read_text()
        assert "${" not in text, f"{path} has a placeholder left"
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        # Triton requires the name to be the directory's, and a backend to run it.
        assert config.name == model.name, path
        assert config.backend, path
        # A model needs a version directory; a Python model needs its model.py there.
        versions = [v for v in model.iterdir() if v.is_dir() and v.name.isdigit()]
        assert versions, f"{model} has no version directory"
        if config.backend == "python":
            assert all((v / "model.py").is_file() for v in versions), model


def imported(source: Path) -> set[str]:
    """The top-level names of the modules a Python file imports, wherever in the file."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("repository", REPOSITORIES, ids=lambda p: p.name)
def test_every_python_model_has_the_modules_of_ours_it_imports_beside_it(
    repository: Path, tmp_path: Path
) -> None:
    # The Python backend puts a model's version directory on sys.path and nothing else of ours.
    ours = {p.stem for p in MODELS.rglob("*.py")}
    root = rendered(repository, tmp_path)
    model_files = list(root.rglob("model.py"))
    assert model_files, f"{repository.name} has no Python model"
    for model_file in model_files:
        directory = model_file.parent
        beside = {p.stem for p in directory.glob("*.py")}
        for source in directory.glob("*.py"):
            missing = (imported(source) & ours) - beside
            assert not missing, f"{source.relative_to(root)} imports {sorted(missing)}"


def test_a_typo_in_a_config_is_caught() -> None:
    # The check has teeth: an unknown field and a wrong type are refused.
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "g"\nmax_batch_sise: 8', model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "g"\nmax_batch_size: "8"', model_config_pb2.ModelConfig())


# What deploy/trtllm/build.sh fills for `--model icm-7b` besides the engine's paths and limits
# (tests/test_trtllm_repository.py runs build.sh itself): ICM-LLaVA answers in prose, so no
# schema and no guided decoding; its confidence needs the Yes/No logits; LLaVA-1.5 pads images to
# a square; LLaMA's </s> ends and pads.
ICM_FILL = {
    "engine_dir": "/models/tensorrt_llm/1",
    "guard_model_name": "zhaoyuzhi/ICM-LLaVA-v1.5-7B",
    "guard_model_version": "sha256:0123456789abcdef",
    "guided_json_schema": "",
    "xgrammar_tokenizer_info_path": "",
    "guided_decoding_backend": "",
    "yes_no_logits": "true",
    "pad_to_square": "true",
    "end_token": "</s>",
    "pad_token": "</s>",
    "max_batch_size": "16",
    "llm_max_batch_size": "16",
}


def test_the_trtllm_repository_filled_for_icm_llava_parses(tmp_path: Path) -> None:
    out = tmp_path / "icm"
    fill.fill(MODELS / "trtllm", out, ICM_FILL)
    configs = {
        path.parent.name: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        for path in out.glob("*/config.pbtxt")
    }
    assert set(configs) == {"guard", "vision_encoder", "tensorrt_llm"}

    def parameters(name: str) -> dict[str, str]:
        return {k: v.string_value for k, v in configs[name].parameters.items()}

    guard = parameters("guard")
    assert {k: guard[k] for k in ("yes_no_logits", "pad_to_square", "end_token", "pad_token")} == {
        "yes_no_logits": "true",
        "pad_to_square": "true",
        "end_token": "</s>",
        "pad_token": "</s>",
    }
    assert guard["guided_json_schema"] == ""
    # The tensorrtllm backend configures no guided decoding when either of these is empty, and
    # still finds both keys (it reads them without a fallback).
    llm = parameters("tensorrt_llm")
    assert llm["guided_decoding_backend"] == llm["xgrammar_tokenizer_info_path"] == ""
    assert configs["tensorrt_llm"].max_batch_size == configs["guard"].max_batch_size == 16
