"""Render a template model repository into a Triton model repository.

    python triton_models/fill.py triton_models/hf OUT checkpoint=/models/llavaguard device=cpu
    python triton_models/fill.py triton_models/trtllm OUT engine_dir=/engines/llm schema=@s.json
    python triton_models/fill.py triton_models/hf --list

A template repository is an ordinary model repository in which files named `*.tmpl` carry
`${name}` or `${name=default}` placeholders; they are written without the suffix, everything
else is copied as it is. `key=@path` takes the value from a file. Values are escaped for a
protobuf text-format string (quotes, backslashes, newlines), because every placeholder sits
inside a string literal or is a plain number, where the escaping changes nothing.

`triton_models/common/*.py` is copied next to every `model.py`: the Python models of different
repositories share that code, and Triton imports a model's siblings, not a shared directory. So
every repository is served rendered, the plain ones (cpu, bench: no templates) too: the embedded
stack renders them into its state directory (service/dev/stack.py) and the CPU guard's image in a
build stage (deploy/triton-cpu.Dockerfile). Copies, not committed symbolic links: Docker's `COPY`
keeps a link a link, which would dangle in an image that holds the repository alone.

It refuses, naming them, placeholders left without a value and values no placeholder uses: a
typo must not leave a default in production. Standard library only, so it runs in the NGC image.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_SUFFIX = ".tmpl"
COMMON = Path(__file__).resolve().parent / "common"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:=([^}]*))?\}")
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "'": "\\'", "\n": "\\n", "\r": "\\r"})


class FillError(ValueError):
    pass


@dataclass(frozen=True)
class Placeholder:
    name: str
    default: str | None
    file: Path


def placeholders(template: Path) -> list[Placeholder]:
    """Every placeholder of the template repository, in file order.

    A name used in several places must have the same default (or none) everywhere: otherwise
    one value left out would fill them differently.
    """
    if not template.is_dir():
        raise FillError(f"{template} is not a directory")
    found = []
    for path in sorted(template.rglob("*" + TEMPLATE_SUFFIX)):
        for match in _PLACEHOLDER.finditer(path.read_text()):
            found.append(Placeholder(match[1], match[2], path.relative_to(template)))
    first: dict[str, Placeholder] = {}
    for placeholder in found:
        seen = first.setdefault(placeholder.name, placeholder)
        if seen.default != placeholder.default:
            raise FillError(
                f"placeholder {placeholder.name} has default {_shown(seen.default)} in "
                f"{seen.file} but {_shown(placeholder.default)} in {placeholder.file}"
            )
    return found


def _shown(default: str | None) -> str:
    return "none" if default is None else repr(default)


def escape(value: str) -> str:
    return value.translate(_ESCAPES)


def render(text: str, values: Mapping[str, str]) -> tuple[str, set[str]]:
    """The text with its placeholders filled, and the names that had no value."""
    missing: set[str] = set()

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name in values:
            return escape(values[name])
        if default is None:
            missing.add(name)
            return match[0]
        return escape(default)

    return _PLACEHOLDER.sub(substitute, text), missing


def fill(template: Path, out: Path, values: Mapping[str, str], *, force: bool = False) -> None:
    """Write the filled repository to `out` (which must not exist unless `force`)."""
    unused = set(values) - {p.name for p in placeholders(template)}
    if unused:
        raise FillError(f"no placeholder named {', '.join(sorted(unused))} in {template}")
    rendered: dict[Path, str] = {}
    missing: set[str] = set()
    for path in sorted(template.rglob("*" + TEMPLATE_SUFFIX)):
        text, left = render(path.read_text(), values)
        rendered[path.relative_to(template).with_suffix("")] = text
        missing |= left
    if missing:
        raise FillError(f"no value for {', '.join(sorted(missing))} (give them as name=value)")
    if out.exists():
        if not force:
            raise FillError(f"{out} exists (use --force to replace it)")
        shutil.rmtree(out)
    shutil.copytree(
        template,
        out,
        ignore=shutil.ignore_patterns("*" + TEMPLATE_SUFFIX, "__pycache__", "*.pyc"),
    )
    for relative, text in rendered.items():
        (out / relative).write_text(text)
    for model_py in out.rglob("model.py"):
        for shared in sorted(COMMON.glob("*.py")):
            shutil.copy2(shared, model_py.parent / shared.name)


def parse_values(items: Sequence[str]) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise FillError(f"expected name=value or name=@file, got {item!r}")
        values[name] = Path(value[1:]).read_text() if value.startswith("@") else value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path, help="template model repository")
    parser.add_argument("out", type=Path, nargs="?", help="model repository to write")
    parser.add_argument("values", nargs="*", help="name=value or name=@file")
    parser.add_argument("--force", action="store_true", help="replace `out` if it exists")
    parser.add_argument("--list", action="store_true", help="print the placeholders and exit")
    args = parser.parse_args(argv)
    if args.out is None and not args.list:
        parser.error("give the output directory (or --list)")
    try:
        if args.list:
            for p in placeholders(args.template):
                default = "(required)" if p.default is None else f"default {p.default!r}"
                print(f"{p.name:28} {default:32} {p.file}")
            return 0
        fill(args.template, args.out, parse_values(args.values), force=args.force)
    except (FillError, OSError) as exc:
        print(f"fill: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
