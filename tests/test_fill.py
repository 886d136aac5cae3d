"""triton_models/fill.py: template model repositories rendered into Triton model repositories.

Small templates made in tmp_path pin each rule; the CLI runs as a subprocess, as a build script
runs it, so its exit codes are the real ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_models import fill as fill_module
from triton_models.fill import COMMON, FillError, Placeholder, fill, placeholders

FILL = Path(fill_module.__file__)

CONFIG_TMPL = """\
name: "guard"
backend: "python"
max_batch_size: ${max_batch_size=8}
parameters [
  { key: "checkpoint", value: { string_value: "${checkpoint}" } },
  { key: "device", value: { string_value: '${device=cpu}' } }
]
"""


def make_template(root: Path, *, models: tuple[str, ...] = ("guard",)) -> Path:
    """A template repository: one config.pbtxt.tmpl and model.py per model, plus extra files."""
    template = root / "template"
    for name in models:
        model = template / name
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt.tmpl").write_text(CONFIG_TMPL.replace('"guard"', f'"{name}"'))
        (model / "1" / "model.py").write_text("# the model\n")
    (template / models[0] / "README.txt").write_text("copied as is: ${not_a_placeholder}\n")
    return template


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def string_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FILL), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_placeholders_are_listed_in_file_order_with_their_defaults(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    config = Path("guard/config.pbtxt.tmpl")
    assert placeholders(template) == [
        Placeholder("max_batch_size", "8", config),
        Placeholder("checkpoint", None, config),
        Placeholder("device", "cpu", config),
    ]


def test_fill_renders_values_and_defaults_into_a_parseable_config(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    out = tmp_path / "out"
    fill(template, out, {"checkpoint": "/models/llavaguard", "max_batch_size": "4"})
    config = parse_config(out / "guard" / "config.pbtxt")
    assert config.max_batch_size == 4
    assert string_parameters(config) == {"checkpoint": "/models/llavaguard", "device": "cpu"}
    assert not (out / "guard" / "config.pbtxt.tmpl").exists()


@pytest.mark.parametrize(
    "value",
    [
        "quotes \" and ' and a backslash \\ and \\n as text",
        "two\nlines\r\nand a tab\t",
        '{"type": "object", "properties": {"rating": {"enum": ["Safe", "Unsafe"]}}}\n',
        "non-ASCII: é, 日本, \u2013",
        "",
    ],
)
def test_values_are_escaped_so_either_quote_style_reads_them_back_exactly(
    tmp_path: Path, value: str
) -> None:
    # checkpoint sits in a double-quoted string, device in a single-quoted one.
    template = make_template(tmp_path)
    fill(template, tmp_path / "out", {"checkpoint": value, "device": value})
    parameters = string_parameters(parse_config(tmp_path / "out" / "guard" / "config.pbtxt"))
    assert parameters == {"checkpoint": value, "device": value}


def test_a_value_is_not_rendered_again(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    fill(template, tmp_path / "out", {"checkpoint": "${device}"})
    parameters = string_parameters(parse_config(tmp_path / "out" / "guard" / "config.pbtxt"))
    assert parameters["checkpoint"] == "${device}"


def test_files_without_the_suffix_are_copied_unrendered_and_caches_are_left_out(
    tmp_path: Path,
) -> None:
    template = make_template(tmp_path)
    cache = template / "guard" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"\0")
    (template / "guard" / "1" / "stale.pyc").write_bytes(b"\0")
    out = tmp_path / "out"
    fill(template, out, {"checkpoint": "c"})
    assert (out / "guard" / "README.txt").read_text() == "copied as is: ${not_a_placeholder}\n"
    assert (out / "guard" / "1" / "model.py").read_text() == "# the model\n"
    assert not (out / "guard" / "1" / "__pycache__").exists()
    assert not (out / "guard" / "1" / "stale.pyc").exists()


def test_common_modules_are_copied_next_to_every_model_py(tmp_path: Path) -> None:
    template = make_template(tmp_path, models=("guard", "postprocessing"))
    (template / "ensemble").mkdir()
    (template / "ensemble" / "config.pbtxt").write_text('name: "ensemble"\n')
    out = tmp_path / "out"
    fill(template, out, {"checkpoint": "c"})
    shared = sorted(COMMON.glob("*.py"))
    assert "guard_answer.py" in [path.name for path in shared]
    for model in ("guard", "postprocessing"):
        for module in shared:
            assert (out / model / "1" / module.name).read_bytes() == module.read_bytes()
    # No model.py, no Python: the ensemble gets nothing.
    assert sorted(path.name for path in (out / "ensemble").iterdir()) == ["config.pbtxt"]


def test_a_missing_value_is_refused_by_name_and_nothing_is_written(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    (template / "guard" / "extra.txt.tmpl").write_text("${zeta} ${alpha}\n")
    out = tmp_path / "out"
    with pytest.raises(FillError, match=r"no value for alpha, checkpoint, zeta"):
        fill(template, out, {})
    assert not out.exists()


def test_a_value_no_placeholder_uses_is_refused_by_name(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FillError, match=r"no placeholder named chekpoint, devices in "):
        fill(template, out, {"checkpoint": "c", "chekpoint": "c", "devices": "cuda"})
    assert not out.exists()


def test_one_name_with_two_different_defaults_is_refused(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    (template / "guard" / "other.txt.tmpl").write_text("${device=cuda}\n")
    with pytest.raises(FillError, match=r"device has default 'cpu' in .* but 'cuda' in "):
        fill(template, tmp_path / "out", {"checkpoint": "c"})
    (template / "guard" / "other.txt.tmpl").write_text("${max_batch_size}\n")
    with pytest.raises(FillError, match=r"max_batch_size has default '8' in .* but none in "):
        placeholders(template)


def test_an_existing_output_is_replaced_only_when_forced(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-model").mkdir()
    with pytest.raises(FillError, match="exists"):
        fill(template, out, {"checkpoint": "c"})
    assert (out / "old-model").exists()
    fill(template, out, {"checkpoint": "c"}, force=True)
    assert sorted(path.name for path in out.iterdir()) == ["guard"]


def test_a_template_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FillError, match="is not a directory"):
        fill(tmp_path / "nowhere", tmp_path / "out", {})
    with pytest.raises(FillError, match="is not a directory"):
        placeholders(tmp_path / "nowhere")


def test_cli_fills_with_values_from_arguments_and_files(tmp_path: Path) -> None:
    template = make_template(tmp_path)
    schema = tmp_path / "schema.json"
    schema.write_text('{"a": "b"}\n')
    out = tmp_path / "out"
    done = run_cli(template, out, f"checkpoint=@{schema}", "device=cuda:1")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"wrote {out}\n", "")
    parameters = string_parameters(parse_config(out / "guard" / "config.pbtxt"))
    assert parameters == {"checkpoint": '{"a": "b"}\n', "device": "cuda:1"}
    # A value may hold "=" after the first one.
    done = run_cli(template, out, "checkpoint=a=b", "--force")
    assert done.returncode == 0
    assert string_parameters(parse_config(out / "guard" / "config.pbtxt"))["checkpoint"] == "a=b"


def test_cli_lists_the_placeholders(tmp_path: Path) -> None:
    done = run_cli(make_template(tmp_path), "--list")
    assert done.returncode == 0
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines == [
        ["max_batch_size", "default", "'8'", "guard/config.pbtxt.tmpl"],
        ["checkpoint", "(required)", "guard/config.pbtxt.tmpl"],
        ["device", "default", "'cpu'", "guard/config.pbtxt.tmpl"],
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{out}",), "fill: no value for checkpoint"),
        (("{out}", "checkpoint"), "fill: expected name=value or name=@file, got 'checkpoint'"),
        (("{out}", "=c"), "fill: expected name=value or name=@file, got '=c'"),
        (("{out}", "checkpoint=@{tmp}/missing.json"), "fill: [Errno 2] No such file"),
        (("{out}", "checkpoint=c", "typo=1"), "fill: no placeholder named typo"),
        ((), "give the output directory (or --list)"),
        (("--list",), "is not a directory"),
    ],
)
def test_cli_exits_2_saying_why(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    template = make_template(tmp_path) if args != ("--list",) else tmp_path / "nowhere"
    out = tmp_path / "out"
    done = run_cli(template, *(arg.format(out=out, tmp=tmp_path) for arg in args))
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""
    assert not out.exists()
