"""The committed JSON Schema files say what the service accepts and emits.

Producers and consumers in other languages validate against these files, so they are checked
here with an independent validator (jsonschema) against the models' real behaviour.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from service import contract
from service.core import errors
from service.core.errors import EventTooLarge, GuardstreamError, InvalidEvent, InvalidJson
from service.core.events import EventLimits, parse_event
from service.core.policies import PolicyRegistry, parse_answer
from service.core.verdicts import (
    DeadLetter,
    DeadLetterError,
    ModelInfo,
    Source,
    Timings,
    Verdict,
    describe_headers,
    serialize,
)
from service.dev.samples import all_samples

LIMITS = EventLimits(max_event_bytes=12 << 20, max_metadata_bytes=4096)


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((contract.SCHEMA_DIR / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("sample", all_samples("c-"), ids=lambda s: s.name)
def test_the_event_schema_agrees_with_the_parser_on_the_sample_events(sample: Any) -> None:
    try:
        document = orjson.loads(sample.value)
    except orjson.JSONDecodeError:
        return  # not JSON: nothing for a schema to say
    schema_ok = validator("image-event.v1.json").is_valid(document)
    try:
        parse_event(sample.value, LIMITS)
        parsed = True
    except (InvalidJson, InvalidEvent, EventTooLarge):
        parsed = False
    # The schema is the structural contract; base64 content and size caps are checked only by
    # the service, so the schema may accept what the parser refuses but never the reverse.
    assert schema_ok or not parsed
    if sample.name in ("no event_id",):
        assert not schema_ok


@pytest.mark.parametrize(
    "document",
    [
        {"image": {"data": "AAAA"}},
        {"event_id": "a", "image": {"data": "AAAA", "url": "https://x.test/a"}},
        {"event_id": "a", "image": {}},
        {"event_id": "a", "image": {"url": "ftp://x.test/a"}},
        {"event_id": "a", "image": {"data": "AAAA"}, "extra": 1},
        {"event_id": "", "image": {"data": "AAAA"}},
        {"event_id": "a", "image": {"data": "AAAA"}, "schema_version": 2},
    ],
)
def test_the_event_schema_rejects_what_the_parser_rejects(document: dict[str, Any]) -> None:
    assert not validator("image-event.v1.json").is_valid(document)
    with pytest.raises(InvalidEvent):
        parse_event(orjson.dumps(document), LIMITS)


SOURCE = Source(topic="images", partition=0, offset=3)


def _dead_letter(code: str) -> DeadLetter:
    return DeadLetter(
        event_id=None,
        error=DeadLetterError(code=code, message="m"),
        source=SOURCE,
        original="AAAA",
        original_size=3,
        original_truncated=False,
        original_headers=describe_headers([("traceparent", b"00-..."), ("bin", b"\xff")]),
        trace_id="1" * 32,
        failed_at=datetime.now(UTC),
    )


def test_verdicts_validate_against_their_schema() -> None:
    verdict = Verdict(
        event_id="e",
        rating="Unsafe",
        category="O4: Nudity Content",
        category_code="O4",
        rationale="r",
        policy_id="llavaguard-v1.2",
        policy_version="1.2.0",
        model=ModelInfo(name="m", version="1", triton_model="guard", triton_version="1"),
        image_sha256="0" * 64,
        metadata={"a": [1, {"b": None}]},
        source=SOURCE,
        trace_id=None,
        timings=Timings(decode_ms=1.0, guard_ms=2.0, total_ms=3.5),
        decided_at=datetime.now(UTC),
    )
    validator("verdict.v1.json").validate(json.loads(serialize(verdict)))


@pytest.mark.parametrize("code", errors.DEAD_LETTER_CODES)
def test_dead_letters_validate_against_their_schema_with_every_code(code: str) -> None:
    validator("dead-letter.v1.json").validate(json.loads(serialize(_dead_letter(code))))


def test_the_llavaguard_answer_schema_admits_exactly_the_answers_the_parser_reads() -> None:
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    answers = validator("answer.llavaguard-v1.2.json")
    for category in policy.categories:
        for rating in ("Safe", "Unsafe"):
            answer = {"rating": rating, "category": category.label, "rationale": "r"}
            assert answers.is_valid(answer)
            assert parse_answer(json.dumps(answer), policy).category == category
    # Guided decoding must not allow what the parser would refuse or read loosely.
    for wrong in (
        {"rating": "safe", "category": "NA: None applying", "rationale": "r"},
        {"rating": "Safe", "category": "O4", "rationale": "r"},
        {"rating": "Safe", "category": "NA: None applying"},
        {"rating": "Safe", "category": "NA: None applying", "rationale": "r", "extra": 1},
    ):
        assert not answers.is_valid(wrong)


def test_only_policies_answering_in_json_get_an_answer_schema() -> None:
    assert [n for n in contract.names() if n.startswith("answer.")] == [
        "answer.llavaguard-v1.2.json"
    ]


# --- Dead-letter codes ---------------------------------------------------------------------------


def _error_classes(root: type[GuardstreamError] = GuardstreamError) -> list[type[GuardstreamError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _error_classes(sub))]


def test_the_dead_letter_schema_lists_exactly_the_codes_the_error_classes_carry() -> None:
    schema = json.loads((contract.SCHEMA_DIR / "dead-letter.v1.json").read_text())
    listed = schema["$defs"]["DeadLetterError"]["properties"]["code"]["enum"]

    assert sorted(listed) == sorted({error.code for error in _error_classes()})
    assert len(listed) == len(set(listed))


def test_a_dead_letter_with_a_code_the_schema_does_not_list_is_refused() -> None:
    document = json.loads(serialize(_dead_letter("invalid_json")))
    document["error"]["code"] = "invalid_jpeg"

    assert not validator("dead-letter.v1.json").is_valid(document)
    with pytest.raises(ValidationError, match="'invalid_jpeg' is not a dead-letter code"):
        DeadLetterError(code="invalid_jpeg", message="m")


# A line of the tree in the errors module's docstring: the branches, the class, then its code, or
# a note in parentheses for a class that only groups others, and "yes" when it is retriable.
_TREE_LINE = re.compile(
    r"(?P<branches>(?:[│ ]   )*(?:[├└]── )?)(?P<name>\w+)"
    r" +(?:\(.*\)|(?P<code>\w+) +(?P<fault>input|service)(?: +(?P<retriable>yes))?)"
)


def _documented_error_tree() -> dict[str, tuple[str | None, str | None, str | None, bool]]:
    """Class name -> (parent class name, own code, its fault, retriable), as the docstring draws
    the tree."""
    assert errors.__doc__ is not None
    drawing = errors.__doc__.split("```")[1].strip("\n").splitlines()
    assert drawing[0].split() == ["class", "code", "fault", "retriable"]
    tree: dict[str, tuple[str | None, str | None, str | None, bool]] = {}
    ancestors: list[str] = []
    for line in drawing[1:]:
        match = _TREE_LINE.fullmatch(line)
        assert match is not None, f"not a line of the error tree: {line!r}"
        depth = len(match["branches"]) // 4
        del ancestors[depth:]
        parent = ancestors[-1] if ancestors else None
        tree[match["name"]] = (
            parent,
            match["code"],
            match["fault"],
            match["retriable"] is not None,
        )
        ancestors.append(match["name"])
    return tree


def test_the_error_tree_in_the_docstring_draws_exactly_the_error_classes() -> None:
    actual = {
        error.__name__: (
            error.__base__.__name__ if error is not GuardstreamError else None,
            vars(error).get("code"),
            error.fault if "code" in vars(error) else None,
            error.retriable,
        )
        for error in _error_classes()
    }

    assert _documented_error_tree() == actual
