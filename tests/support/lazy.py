"""Heavy modules imported on first use, so that collecting a test module costs nothing.

`pytest --co` and `make check` import every test module; `import torch` at the top of one costs
seconds (per xdist worker) even when none of its tests is selected. `torch = lazy("torch")`
instead imports torch when a test first reads a public attribute of it (`torch.cat`); private
ones (`torch._C`) are not forwarded: read them from `torch.module()`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for a module until an attribute is read, then forwards to the real one."""

    def __init__(self, name: str) -> None:
        self._name = name

    def module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attribute: str) -> Any:
        # Only public names: pytest's collection probes every module-level object for
        # `__test__`, `__wrapped__`, `_mock_name`... and must not import torch by asking.
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.module(), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    """`name`, imported when one of its attributes is first read (typed Any, as a module is to
    the tests)."""
    return LazyModule(name)
