"""The inbound event contract: `parse_event(value, EventLimits)` accepts version-1 image events
and rejects everything else with the error (and dead-letter code) that says why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import EventTooLarge, InvalidEvent, InvalidJson
from service.core.events import (
    EventLimits,
    ImageEvent,
    ImageUrl,
    InlineImage,
    is_raw_image,
    parse_event,
    parse_raw_event,
)

LIMITS = EventLimits(max_event_bytes=64 * 1024, max_metadata_bytes=1024)
ROOMY = EventLimits(max_event_bytes=16 * 1024 * 1024, max_metadata_bytes=16 * 1024 * 1024)

SECRET = "sk_live_7Hq2Zx9Lw4Rt"
"""Looks like a credential a producer leaked into the wrong field; must never be echoed."""


def _event(**fields: Any) -> dict[str, Any]:
    """A minimal valid event as a JSON object, with `fields` added or replaced."""
    return {"event_id": "upload-8f14e45f", "image": {"data": "iVBORw0KGgo="}, **fields}


def _without(key: str) -> dict[str, Any]:
    event = _event()
    del event[key]
    return event


def _parse(document: object, limits: EventLimits = LIMITS) -> ImageEvent:
    return parse_event(json.dumps(document).encode(), limits)


def _rejection(document: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as raised:
        _parse(document)
    return raised.value


# --- Valid events --------------------------------------------------------------------------------


def test_minimal_event_parses_with_defaults() -> None:
    event = parse_event(b'{"event_id": "upload-1", "image": {"data": "iVBORw0KGgo="}}', LIMITS)

    assert event == ImageEvent(event_id="upload-1", image=InlineImage(data="iVBORw0KGgo="))
    assert event.schema_version == 1
    assert event.policy_id is None
    assert event.metadata == {}
    assert event.created_at is None


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.com/u/8f14e45f.jpg",
        "http://10.0.0.7:8080/a.png?sig=abc",
        "HTTPS://IMAGES.EXAMPLE.COM/A.PNG",
    ],
)
def test_event_with_image_url_parses(url: str) -> None:
    event = _parse({"event_id": "e", "image": {"url": url}})

    assert event.image == ImageUrl(url=url)


def test_event_with_policy_id_parses() -> None:
    assert _parse(_event(policy_id="llavaguard-v1.2")).policy_id == "llavaguard-v1.2"


@pytest.mark.parametrize("policy_id", ["a", "A-z_0.9", "p" * 64])
def test_policy_id_of_letters_digits_dot_dash_underscore_up_to_64_is_accepted(
    policy_id: str,
) -> None:
    assert _parse(_event(policy_id=policy_id)).policy_id == policy_id


@pytest.mark.parametrize("tenant", ["acme-art", "A-z_0.9", "t" * 64])
def test_tenant_of_letters_digits_dot_dash_underscore_up_to_64_is_accepted(tenant: str) -> None:
    assert _parse(_event(tenant=tenant)).tenant == tenant


def test_an_event_without_a_tenant_has_none() -> None:
    assert _parse(_event()).tenant is None


def test_metadata_keeps_nested_json_as_sent() -> None:
    metadata = {
        "user": {"id": 42, "tags": ["a", "b"], "ratio": 0.25, "verified": True, "bio": None},
        "uploads": [[1, 2], {"k": "v"}, []],
        "empty": {},
        "unicode": "Grüße 🖼",
    }

    assert _parse(_event(metadata=metadata)).metadata == metadata


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        (
            "2026-11-22T10:00:00+05:30",
            datetime(2026, 11, 22, 10, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        ),
        (
            "2026-11-22T10:00:00.123456-08:00",
            datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-8))),
        ),
    ],
)
def test_created_at_with_offset_keeps_the_time_and_offset(
    created_at: str, expected: datetime
) -> None:
    parsed = _parse(_event(created_at=created_at)).created_at

    assert parsed is not None
    assert parsed.utcoffset() == expected.utcoffset()
    assert parsed.replace(tzinfo=None) == expected.replace(tzinfo=None)


def test_full_event_fields_equal_the_input() -> None:
    document = {
        "schema_version": 1,
        "event_id": "upload-8f14e45f",
        "image": {"data": "iVBORw0KGgo="},
        "policy_id": "llavaguard-v1.2",
        "metadata": {"user_id": "u-1", "source": {"app": "ios", "build": 1234}},
        "created_at": "2026-11-22T10:00:00Z",
    }

    event = _parse(document)

    assert event.model_dump(mode="json", exclude_none=True) == {
        **document,
        "created_at": "2026-11-22T10:00:00Z",
    }


def test_event_id_of_256_characters_is_accepted() -> None:
    event_id = "é" * 256

    assert _parse(_event(event_id=event_id)).event_id == event_id


def test_record_of_exactly_max_event_bytes_is_accepted() -> None:
    compact = json.dumps(_event()).encode()
    padded = compact + b" " * (LIMITS.max_event_bytes - len(compact))

    assert len(padded) == LIMITS.max_event_bytes
    assert parse_event(padded, LIMITS).event_id == "upload-8f14e45f"


# --- Not an event at all -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"   ", id="whitespace"),
        pytest.param(b"upload-1", id="plain-text"),
        pytest.param(b'{"event_id": "e",', id="truncated"),
        pytest.param(b'{"event_id": "e",}', id="trailing-comma"),
        pytest.param(b"{'event_id': 'e'}", id="single-quotes"),
        pytest.param(b'{"event_id": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"n": NaN}', id="nan"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="raw-image-bytes"),
    ],
)
def test_value_that_is_not_json_raises_invalid_json(value: bytes) -> None:
    with pytest.raises(InvalidJson, match=r"^record value is not JSON: ") as raised:
        parse_event(value, LIMITS)

    assert raised.value.code == "invalid_json"


def test_tombstone_raises_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match=r"record has no value \(a tombstone\?\)") as raised:
        parse_event(None, LIMITS)

    assert raised.value.code == "invalid_event"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"[]", "list"),
        (b'[{"event_id": "e", "image": {"data": "QQ=="}}]', "list"),
        (b'"upload-1"', "str"),
        (b"42", "int"),
        (b"4.2", "float"),
        (b"true", "bool"),
        (b"null", "NoneType"),
    ],
)
def test_json_that_is_not_an_object_raises_invalid_event(value: bytes, kind: str) -> None:
    with pytest.raises(InvalidEvent, match=rf"^expected a JSON object, got {kind}$"):
        parse_event(value, LIMITS)


def test_record_over_max_event_bytes_raises_event_too_large_before_parsing() -> None:
    limits = EventLimits(max_event_bytes=100, max_metadata_bytes=100)
    not_even_json = b"\xff" * 101

    with pytest.raises(EventTooLarge, match=r"^record value is 101 bytes; the limit is 100$") as r:
        parse_event(not_even_json, limits)

    assert r.value.code == "event_too_large"


# --- Field rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        pytest.param(_without("event_id"), r"event_id: Field required", id="no-event-id"),
        pytest.param(_without("image"), r"image: Field required", id="no-image"),
        pytest.param(
            _event(event_id=""), r"event_id: String should have at least 1 character", id="empty"
        ),
        pytest.param(
            _event(event_id="e" * 257),
            r"event_id: String should have at most 256 characters",
            id="event-id-257",
        ),
        pytest.param(
            _event(event_id=12345), r"event_id: Input should be a valid string", id="id-number"
        ),
        pytest.param(
            _event(metadata=[1, 2]), r"metadata: Input should be a valid dictionary", id="meta-list"
        ),
        pytest.param(
            _event(metadata="a=b"), r"metadata: Input should be a valid dictionary", id="meta-str"
        ),
        pytest.param(
            _event(policy_id=7), r"policy_id: Input should be a valid string", id="policy-number"
        ),
        pytest.param(
            _event(schema_version=2), r"schema_version: Input should be 1", id="schema-version-2"
        ),
        pytest.param(
            _event(schema_version=0), r"schema_version: Input should be 1", id="schema-version-0"
        ),
        pytest.param(
            _event(schema_version="1"), r"schema_version: Input should be 1", id="version-string"
        ),
        pytest.param(
            _event(created_at="2026-11-22T10:00:00"),
            r"created_at: Value error, must be an RFC 3339 date-time string with an offset",
            id="naive-created-at",
        ),
        pytest.param(
            _event(created_at="yesterday"),
            r"created_at: Value error, must be an RFC 3339 date-time string with an offset",
            id="created-at-words",
        ),
        pytest.param(
            _event(evnet_id="typo"),
            r"evnet_id: Extra inputs are not permitted",
            id="extra-top-level-field",
        ),
        pytest.param(
            _event(image={"data": "QQ==", "mime": "image/png"}),
            r"image\.(data\.)?mime: Extra inputs are not permitted",
            id="extra-image-field",
        ),
        pytest.param(
            _event(image={"data": ""}),
            r"image\.(data\.)?data: String should have at least 1 character",
            id="empty-data",
        ),
        pytest.param(
            _event(image={"data": 12}),
            r"image\.(data\.)?data: Input should be a valid string",
            id="data-number",
        ),
        pytest.param(
            _event(image={"url": "https://x/" + "a" * 2048}),
            r"image\.(url\.)?url: String should have at most 2048 characters",
            id="url-too-long",
        ),
    ],
)
def test_invalid_field_raises_invalid_event_naming_the_field(
    document: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidEvent, match=rf"^invalid image event: {problem}") as raised:
        _parse(document)

    assert raised.value.code == "invalid_event"


@pytest.mark.parametrize(
    "image",
    [
        pytest.param({"data": "QQ==", "url": "https://x/a.png"}, id="both"),
        pytest.param({}, id="neither"),
        pytest.param({"href": "https://x/a.png"}, id="neither-but-other-key"),
        pytest.param("iVBORw0KGgo=", id="string"),
        pytest.param(["iVBORw0KGgo="], id="list"),
        pytest.param(None, id="null"),
        pytest.param(1, id="number"),
    ],
)
def test_image_must_be_an_object_with_exactly_one_source(image: object) -> None:
    expected = (
        "invalid image event: image: image must be an object with exactly one of 'data' or 'url'"
    )

    assert _rejection(_event(image=image)).message == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://images.example.com/a.png",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
        "//images.example.com/a.png",
        "https:/images.example.com/a.png",
        " https://images.example.com/a.png",
        "",
    ],
)
def test_url_that_is_not_http_or_https_is_rejected(url: str) -> None:
    message = _rejection({"event_id": "e", "image": {"url": url}}).message

    assert message.startswith("invalid image event: image.")
    assert "url: String should match pattern" in message


@pytest.mark.parametrize(
    "policy_id",
    ["", "has space", "a/b", "../etc", "politique-é", "p" * 65, "abc\n", "a;b"],
)
def test_policy_id_with_bad_characters_or_over_64_is_rejected(policy_id: str) -> None:
    message = _rejection(_event(policy_id=policy_id)).message

    assert message.startswith("invalid image event: policy_id: String should match pattern")


@pytest.mark.parametrize("tenant", ["", "has space", "a/b", "té", "t" * 65, "a\n", 7, True])
def test_tenant_that_is_not_a_name_of_up_to_64_is_rejected(tenant: object) -> None:
    message = _rejection(_event(tenant=tenant)).message

    assert message.startswith("invalid image event: tenant: ")


# --- Metadata size -------------------------------------------------------------------------------


def _metadata_of_compact_size(size: int) -> dict[str, Any]:
    metadata = {"note": "x" * (size - len(b'{"note":""}'))}
    assert len(orjson.dumps(metadata)) == size
    return metadata


def test_metadata_of_exactly_max_metadata_bytes_as_compact_json_is_accepted() -> None:
    metadata = _metadata_of_compact_size(LIMITS.max_metadata_bytes)
    # Indented on the wire: the limit applies to the compact form, not to the producer's spacing.
    value = json.dumps(_event(metadata=metadata), indent=8).encode()

    assert parse_event(value, LIMITS).metadata == metadata


def test_metadata_over_max_metadata_bytes_as_compact_json_is_rejected() -> None:
    metadata = _metadata_of_compact_size(LIMITS.max_metadata_bytes + 1)

    with pytest.raises(InvalidEvent, match=r"^metadata is 1025 bytes as JSON; the limit is 1024$"):
        _parse(_event(metadata=metadata))


def test_metadata_size_counts_utf8_bytes_not_characters() -> None:
    metadata = {"note": "é" * 600}  # 600 characters, 1200 bytes

    with pytest.raises(InvalidEvent, match=r"^metadata is 1211 bytes as JSON"):
        _parse(_event(metadata=metadata))


def _nested_metadata_event(depth: int) -> bytes:
    """An event whose metadata is `depth` objects, each inside the one before."""
    nested = b'{"a": ' * depth + b"1" + b"}" * depth
    return b'{"event_id": "e", "image": {"data": "QQ=="}, "metadata": ' + nested + b"}"


def test_metadata_nested_just_past_the_serialiser_depth_raises_invalid_event() -> None:
    with pytest.raises(InvalidEvent):
        parse_event(_nested_metadata_event(255), LIMITS)


def test_deeply_nested_metadata_is_rejected_as_invalid() -> None:
    with pytest.raises(InvalidEvent, match=r"^invalid image event: metadata\."):
        parse_event(_nested_metadata_event(300), LIMITS)


# --- The validation message ----------------------------------------------------------------------


def test_validation_message_lists_three_problems_and_counts_the_rest() -> None:
    document = {
        "schema_version": 2,
        "event_id": 5,
        "image": 3,
        "policy_id": "bad id",
        "metadata": [],
        "created_at": "2026-11-22T10:00:00",
        "colour": "red",
    }

    message = _rejection(document).message

    assert message == (
        "invalid image event: schema_version: Input should be 1; "
        "event_id: Input should be a valid string; "
        "image: image must be an object with exactly one of 'data' or 'url' (+4 more)"
    )


def test_validation_message_with_three_problems_has_no_more_suffix() -> None:
    message = _rejection({"schema_version": 2, "event_id": 5, "image": 3}).message

    assert message.count("; ") == 2
    assert "more)" not in message


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("event_id", [SECRET], "event_id"),
        ("event_id", {"token": SECRET}, "event_id"),
        ("policy_id", f"{SECRET}!", "policy_id"),
        ("policy_id", SECRET * 5, "policy_id"),
        ("schema_version", SECRET, "schema_version"),
        ("created_at", SECRET, "created_at"),
        ("created_at", f"2026-11-22T10:00:00 {SECRET}", "created_at"),
        ("metadata", [SECRET], "metadata"),
        ("metadata", SECRET, "metadata"),
        ("image", SECRET, "image"),
        ("image", {"url": f"ftp://{SECRET}@host/a.png"}, "url"),
        ("image", {"data": [SECRET]}, "data"),
    ],
)
def test_validation_message_never_echoes_the_input(field: str, value: object, named: str) -> None:
    message = _rejection(_event(**{field: value})).message

    assert SECRET not in message
    assert named in message
    assert "\n" not in message


def test_invalid_json_message_does_not_echo_the_record() -> None:
    with pytest.raises(InvalidJson) as raised:
        parse_event(f'{{"event_id": "{SECRET}", oops}}'.encode(), LIMITS)

    assert SECRET not in raised.value.message


def test_validation_message_stays_one_line_when_an_unknown_key_holds_a_newline() -> None:
    message = _rejection(_event(**{"x\nforged: log line": 1})).message

    assert "\n" not in message


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"created_at": 1763805600}, id="created-at-number"),
        pytest.param({"created_at": "1763805600"}, id="created-at-digit-string"),
        pytest.param({"schema_version": True}, id="schema-version-true"),
    ],
)
def test_values_outside_the_json_schema_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent):
        _parse(_event(**fields))


# --- Properties ----------------------------------------------------------------------------------

_SMALL = EventLimits(max_event_bytes=2048, max_metadata_bytes=256)

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _or_junk(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `plausible`, sometimes any JSON value."""
    return st.one_of(plausible, plausible, plausible, _json_values)


_images = _or_junk(
    st.fixed_dictionaries({"data": _or_junk(st.text(min_size=1, max_size=12))})
    | st.fixed_dictionaries(
        {"url": _or_junk(st.sampled_from(("https://x/a.png", "ftp://x/a.png", "http://")))}
    )
    | st.fixed_dictionaries({}, optional={"data": _json_values, "url": _json_values})
)

_eventish = st.fixed_dictionaries(
    {"event_id": _or_junk(st.text(min_size=1, max_size=260)), "image": _images},
    optional={
        "schema_version": _or_junk(st.sampled_from((1, 2))),
        "policy_id": _or_junk(st.from_regex(r"\A[A-Za-z0-9._ /-]{0,70}\Z")),
        "tenant": _or_junk(st.from_regex(r"\A[A-Za-z0-9._ /-]{0,70}\Z")),
        "metadata": _or_junk(st.dictionaries(st.text(max_size=8), _json_values, max_size=4)),
        "created_at": _or_junk(
            st.sampled_from(("2026-11-22T10:00:00Z", "2026-11-22T10:00:00", "2026-13-01T00:00Z"))
        ),
        "extra": _json_values,
    },
) | st.dictionaries(st.text(max_size=8), _json_values, max_size=5)


def _parses_or_is_rejected(value: bytes | None) -> None:
    try:
        event = parse_event(value, _SMALL)
    except (EventTooLarge, InvalidJson, InvalidEvent):
        return
    assert isinstance(event, ImageEvent)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000) | st.none())
def test_any_bytes_parse_or_raise_an_event_rejection(value: bytes | None) -> None:
    _parses_or_is_rejected(value)


@settings(max_examples=300, deadline=None)
@given(_eventish | _json_values)
def test_any_json_document_parses_or_raises_an_event_rejection(document: object) -> None:
    _parses_or_is_rejected(json.dumps(document, ensure_ascii=False).encode())


_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)

_valid_events = st.builds(
    ImageEvent,
    event_id=st.text(min_size=1, max_size=256),
    image=st.builds(InlineImage, data=st.text(min_size=1, max_size=50))
    | st.builds(ImageUrl, url=st.from_regex(r"\A[hH][tT][tT][pP][sS]?://[^\n]{0,60}\Z")),
    policy_id=st.none() | st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
    tenant=st.none() | st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
    metadata=st.dictionaries(st.text(max_size=10), _json_values, max_size=5),
    created_at=st.none()
    | st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=_offsets
    ),
)


@settings(max_examples=200, deadline=None)
@given(_valid_events)
def test_valid_event_round_trips_through_its_json(event: ImageEvent) -> None:
    value = event.model_dump_json(exclude_none=True).encode()

    assert parse_event(value, ROOMY) == event


# --- The raw form: the record value is the image file ----------------------------------------

RAW_LIMITS = EventLimits(max_event_bytes=1000, max_metadata_bytes=100)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("content-type", b"image/jpeg")], True),
        ([("Content-Type", b"IMAGE/PNG")], True),
        ([("content-type", b"application/json")], False),
        ([("event-id", b"x")], False),
        ([], False),
    ],
)
def test_raw_form_is_marked_by_an_image_content_type(
    headers: list[tuple[str, bytes]], expected: bool
) -> None:
    assert is_raw_image(headers) is expected


def test_raw_event_takes_its_id_from_the_header_before_the_key() -> None:
    headers = [("content-type", b"image/png"), ("event-id", b"up-1"), ("policy-id", b"p.v2")]

    event = parse_raw_event(b"\x89PNG...", b"key-1", headers, RAW_LIMITS)

    assert (event.event_id, event.policy_id, event.image) == ("up-1", "p.v2", b"\x89PNG...")
    assert parse_raw_event(b"x", b"key-1", headers[:1], RAW_LIMITS).event_id == "key-1"


def test_raw_event_names_its_tenant_in_a_tenant_header() -> None:
    headers = [("content-type", b"image/png"), ("Tenant", b"acme-art")]

    assert parse_raw_event(b"\x89PNG", b"k", headers, RAW_LIMITS).tenant == "acme-art"
    assert parse_raw_event(b"\x89PNG", b"k", headers[:1], RAW_LIMITS).tenant is None


@pytest.mark.parametrize(
    ("value", "key", "headers", "error", "message"),
    [
        (b"", b"k", [], InvalidEvent, "no value"),
        (None, b"k", [], InvalidEvent, "no value"),
        (b"x" * 1001, b"k", [], EventTooLarge, "limit is 1000"),
        (b"x", None, [], InvalidEvent, "need an event-id header or a record key"),
        (b"x", b"\xff\xfe", [], InvalidEvent, "not UTF-8"),
        (b"x", b"k" * 257, [], InvalidEvent, "1-256 characters"),
        (b"x", b"k", [("policy-id", b"../etc")], InvalidEvent, "policy-id header"),
        (b"x", b"k", [("tenant", b"acme art")], InvalidEvent, "tenant header: must be 1-64"),
        (b"x", b"k", [("tenant", b"\xff")], InvalidEvent, "tenant header is not UTF-8"),
    ],
)
def test_bad_raw_records_are_rejected_with_a_reason(
    value: bytes | None,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        parse_raw_event(value, key, headers, RAW_LIMITS)


def test_the_producer_helper_puts_the_tenant_in_the_event() -> None:
    from service.client import encode_event, image_event

    event = image_event("up-1", image=b"\x89PNG", policy_id="p", tenant="acme-art")

    assert _parse(json.loads(encode_event(event))).tenant == "acme-art"
