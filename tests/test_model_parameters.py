"""triton_models/common/model_parameters.py: config.pbtxt parameters read as typed settings.

The module is imported from triton_models/common, where fill.py copies it from; every Python
model of every repository reads its parameters through it (test_triton_configs.py checks that
each finds it beside its model.py).
"""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from typing import Any

import pytest

from triton_models.common import model_parameters as mp


def read(**values: str) -> mp.ModelParameters:
    return mp.ModelParameters(values)


def refused(message: str) -> AbstractContextManager[Any]:
    """Expect InvalidSettingsError saying exactly `message`."""
    return pytest.raises(mp.InvalidSettingsError, match=f"^{re.escape(message)}$")


def test_string_values_are_read_from_tritons_json_model_config() -> None:
    config = {
        "name": "guard",
        "parameters": {
            "rules": {"string_value": '{"a": 1}'},
            "unset": {},  # a parameter declared with no string_value reads as empty
        },
    }
    assert mp.string_values(json.dumps(config)) == {"rules": '{"a": 1}', "unset": ""}
    assert mp.string_values(json.dumps({"name": "guard"})) == {}


def test_required_parameters_are_named_all_at_once() -> None:
    with refused("config.pbtxt parameters missing: b, c"):
        mp.ModelParameters({"a": "1"}, required=("a", "b", "c"))


@pytest.mark.parametrize(
    "get",
    [
        lambda p: p.string("absent"),
        lambda p: p.integer("absent"),
        lambda p: p.number("absent"),
        lambda p: p.boolean("absent"),
        lambda p: p.choice("absent", ("a", "b")),
        lambda p: p.json_object("absent"),
    ],
)
def test_a_getter_without_a_default_requires_its_parameter(get: Any) -> None:
    with refused("config.pbtxt parameters missing: absent"):
        get(read())


def test_a_default_stands_for_an_absent_parameter_even_when_falsy() -> None:
    parameters = read()
    assert parameters.string("s", "") == ""
    assert parameters.integer("i", 0) == 0
    assert parameters.number("n", 0.0) == 0.0
    assert parameters.boolean("b", False) is False
    assert parameters.choice("c", ("x", "y"), "y") == "y"


def test_a_present_parameter_is_checked_whatever_the_default() -> None:
    with refused("i: must be an integer, got 'x'"):
        read(i="x").integer("i", 3)


def test_strings_are_returned_as_written_and_blank_ones_refused_on_request() -> None:
    assert read(s=" x ").string("s") == " x "
    assert read(s="").string("s") == ""
    with refused("s: must not be empty"):
        read(s=" \n").string("s", blank=False)


@pytest.mark.parametrize(
    ("text", "minimum", "expected"),
    [("7", None, 7), ("-3", None, -3), ("0", 0, 0), ("8192", 1, 8192)],
)
def test_integers(text: str, minimum: int | None, expected: int) -> None:
    assert read(i=text).integer("i", minimum=minimum) == expected


@pytest.mark.parametrize(
    ("text", "minimum", "message"),
    [
        ("many", None, "i: must be an integer, got 'many'"),
        ("1.5", None, "i: must be an integer, got '1.5'"),
        ("", None, "i: must be an integer, got ''"),
        ("0", 1, "i: must be an integer of at least 1, got '0'"),
        ("big", 1, "i: must be an integer of at least 1, got 'big'"),
    ],
)
def test_what_is_not_an_integer_in_range_is_refused(
    text: str, minimum: int | None, message: str
) -> None:
    with refused(message):
        read(i=text).integer("i", minimum=minimum)


def test_numbers() -> None:
    assert read(n="0.25").number("n", minimum=0, maximum=1) == 0.25
    assert read(n="1e-3").number("n") == 0.001
    assert read(n="-2").number("n", maximum=0) == -2.0


@pytest.mark.parametrize(
    ("text", "bounds", "message"),
    [
        ("high", {"minimum": 0, "maximum": 1}, "n: must be a number in 0..1, got 'high'"),
        ("1.5", {"minimum": 0, "maximum": 1}, "n: must be a number in 0..1, got '1.5'"),
        ("nan", {"minimum": 0, "maximum": 1}, "n: must be a number in 0..1, got 'nan'"),
        ("-0.5", {"minimum": 0}, "n: must be a number of at least 0, got '-0.5'"),
        ("2", {"maximum": 1.5}, "n: must be a number of at most 1.5, got '2'"),
        # Never a setting, bounds or not.
        ("inf", {}, "n: must be a number, got 'inf'"),
        ("nan", {}, "n: must be a number, got 'nan'"),
    ],
)
def test_what_is_not_a_finite_number_in_range_is_refused(
    text: str, bounds: dict[str, float], message: str
) -> None:
    with refused(message):
        read(n=text).number("n", **bounds)


def test_booleans_are_true_or_false_as_config_pbtxt_writes_them() -> None:
    assert read(b="true").boolean("b") is True
    assert read(b="false").boolean("b") is False
    for typo in ("True", "1", "yes", ""):
        with refused(f"b: must be true or false, got {typo!r}"):
            read(b=typo).boolean("b")


def test_choices() -> None:
    assert read(c="sdpa").choice("c", ("sdpa", "eager")) == "sdpa"
    with refused("c: must be one of sdpa, eager, got 'x'"):
        read(c="x").choice("c", ("sdpa", "eager"))


def test_json_objects() -> None:
    assert read(j='{"O4": "O4: Nudity Content"}').json_object("j") == {"O4": "O4: Nudity Content"}
    with pytest.raises(mp.InvalidSettingsError, match=r"^j: not valid JSON: "):
        read(j="{").json_object("j")
    with refused("j: must be a JSON object, got list"):
        read(j="[1]").json_object("j")


def test_the_error_is_a_value_error() -> None:
    # What the models raised before they shared this error, so callers that catch it still do.
    assert issubclass(mp.InvalidSettingsError, ValueError)
