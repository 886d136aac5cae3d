"""The package's folders are its architecture: the core stays free of I/O adapters, modules
stay small enough to read, and the README's Layout section names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
README = SERVICE.parent / "README.md"
MAX_MODULE_LINES = 450


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


@pytest.mark.parametrize(
    "path", modules(SERVICE / "core"), ids=lambda p: str(p.relative_to(SERVICE))
)
def test_the_core_imports_no_adapter_and_no_wiring(path: Path) -> None:
    forbidden = ("service.adapters", "service.dev", "service.app", "service.__main__", "redis")
    assert [m for m in imported_modules(path) if m.startswith(forbidden)] == []


@pytest.mark.parametrize("path", modules(SERVICE), ids=lambda p: str(p.relative_to(SERVICE)))
def test_no_module_is_too_long_to_read(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by concern"


def test_the_readme_layout_names_every_module_and_package() -> None:
    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"[\w.]+\.py|\w+/", section))
    missing = [
        str(path.relative_to(SERVICE))
        for path in [*modules(SERVICE), *(p for p in SERVICE.rglob("*") if p.is_dir())]
        if "__pycache__" not in path.parts
        and path.name != "__init__.py"
        and (path.name if path.suffix == ".py" else f"{path.name}/") not in named
    ]
    assert missing == []
