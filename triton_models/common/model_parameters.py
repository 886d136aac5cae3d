"""A Python model's config.pbtxt `parameters`, read as typed settings with one kind of error.

Every Python model of triton_models is configured by `parameters { key: "..." value {
string_value: "..." } }`, which Triton hands to `initialize` as JSON in `args["model_config"]`.
This module is their one reading: `string_values` takes them out of that JSON, and
`ModelParameters` turns them into str, int, float, bool, a choice or a JSON object, each
required or with a default. What cannot be read raises `InvalidSettingsError`, naming the
parameter and what it must be; raised from `initialize`, it fails the model's load with that
message, which is the point: a guard with misread settings must not answer.

Standard library only: fill.py copies it next to every model.py, the TensorRT-LLM image's too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class InvalidSettingsError(ValueError):
    """A parameter, or what it names, that the model cannot run with: it must not load."""


def string_values(model_config: str) -> dict[str, str]:
    """The `parameters` of `args["model_config"]` by key, each its `string_value`."""
    parameters = json.loads(model_config).get("parameters", {})
    return {name: value.get("string_value", "") for name, value in parameters.items()}


class ModelParameters:
    """Typed reads of a model's parameters. A getter without a default requires its parameter;
    its default, when the parameter is absent, is returned as it is."""

    def __init__(self, values: Mapping[str, str], required: Iterable[str] = ()) -> None:
        """`required` are named all at once when missing, rather than one per load attempt."""
        self._values = dict(values)
        missing = [name for name in required if name not in self._values]
        if missing:
            raise InvalidSettingsError(f"config.pbtxt parameters missing: {', '.join(missing)}")

    def string(self, name: str, default: str | None = None, *, blank: bool = True) -> str:
        """The value as written; `blank=False` refuses one that is empty or only whitespace."""
        text = self._values.get(name)
        if text is None:
            return _default(name, default)
        if not blank and not text.strip():
            raise InvalidSettingsError(f"{name}: must not be empty")
        return text

    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
        text = self._values.get(name)
        if text is None:
            return _default(name, default)
        expected = "an integer" if minimum is None else f"an integer of at least {minimum}"
        try:
            value = int(text)
        except ValueError:
            raise InvalidSettingsError(f"{name}: must be {expected}, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise InvalidSettingsError(f"{name}: must be {expected}, got {text!r}")
        return value

    def number(
        self,
        name: str,
        default: float | None = None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        """A finite float: NaN and infinities are never a setting, whatever the bounds."""
        text = self._values.get(name)
        if text is None:
            return _default(name, default)
        message = f"{name}: must be {_number_range(minimum, maximum)}, got {text!r}"
        try:
            value = float(text)
        except ValueError:
            raise InvalidSettingsError(message) from None
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            raise InvalidSettingsError(message)
        return value

    def boolean(self, name: str, default: bool | None = None) -> bool:
        """`true` or `false`, as config.pbtxt writes booleans; nothing else, so that a typo is
        refused rather than read as one of them."""
        text = self._values.get(name)
        if text is None:
            return _default(name, default)
        if text not in ("true", "false"):
            raise InvalidSettingsError(f"{name}: must be true or false, got {text!r}")
        return text == "true"

    def choice(self, name: str, choices: Sequence[str], default: str | None = None) -> str:
        text = self._values.get(name)
        if text is None:
            return _default(name, default)
        if text not in choices:
            raise InvalidSettingsError(f"{name}: must be one of {', '.join(choices)}, got {text!r}")
        return text

    def json_object(self, name: str) -> dict[str, Any]:
        text = self.string(name)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidSettingsError(f"{name}: not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise InvalidSettingsError(f"{name}: must be a JSON object, got {type(value).__name__}")
        return value


def _default(name: str, default: T | None) -> T:
    if default is None:
        raise InvalidSettingsError(f"config.pbtxt parameters missing: {name}")
    return default


def _number_range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"a number in {minimum:g}..{maximum:g}"
    if minimum is not None:
        return f"a number of at least {minimum:g}"
    if maximum is not None:
        return f"a number of at most {maximum:g}"
    return "a number"
