"""deploy/'s Python scripts as modules: deploy/ is not a package (it holds manifests and
Dockerfiles), so tests load a script by its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy"


def load(relative: str) -> ModuleType:
    """`deploy/<relative>` as a module named after its file, loaded once per process."""
    path = DEPLOY / relative
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
