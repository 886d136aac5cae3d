"""The inbound contract: one JSON image event per Kafka record on the input topic.

Version 1 of the contract (JSON Schema: `service/schemas/image-event.v1.json`):

    {"schema_version": 1,                      optional, defaults to 1
     "event_id": "upload-8f14e45f",            required, 1-256 characters
     "image": {"data": "<base64>"}             exactly one of data / url
           | {"url": "https://..."},
     "policy_id": "llavaguard-v1.2",           optional, defaults to the service's policy
     "tenant": "acme-art",                     optional, whose upload (service.core.tenants)
     "metadata": {...},                        optional JSON object, echoed in the verdict
     "created_at": "2026-11-22T10:00:00Z"}     optional RFC 3339 time with offset

Unknown fields are rejected rather than ignored, so a producer's typo surfaces as a dead letter
instead of a silently different request; new fields arrive with a new `schema_version`.

The raw form, for producers of small images: the record value is the image file itself, with a
`content-type: image/...` header; the event id comes from the `event-id` header or else the
record key, the policy from an optional `policy-id` header, the tenant from an optional `tenant`
header.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationError,
)
from yarl import URL

from service.core.errors import EventTooLarge, InvalidEvent, InvalidJson

SCHEMA_VERSION: Literal[1] = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InlineImage(_Strict):
    data: Annotated[
        str,
        Field(
            min_length=1,
            description="The encoded image file (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC, AVIF), "
            "base64.",
            json_schema_extra={"contentEncoding": "base64"},
        ),
    ]


class ImageUrl(_Strict):
    url: Annotated[
        str,
        Field(
            max_length=2048,
            pattern=r"^[hH][tT][tT][pP][sS]?://",
            description="Where to fetch the image from (http or https).",
        ),
    ]


def _image_source(value: Any) -> str | None:
    """Which source an `image` object names; None (an error) unless exactly one."""
    if isinstance(value, dict):
        named = {"data", "url"} & value.keys()
        return named.pop() if len(named) == 1 else None
    if isinstance(value, InlineImage):
        return "data"
    if isinstance(value, ImageUrl):
        return "url"
    return None


ImageSource = Annotated[
    Annotated[InlineImage, Tag("data")] | Annotated[ImageUrl, Tag("url")],
    Discriminator(
        _image_source,
        custom_error_type="image_source",
        custom_error_message="image must be an object with exactly one of 'data' or 'url'",
    ),
]


def _not_a_boolean(value: Any) -> Any:
    # JSON's true is not the integer 1, whatever Python thinks.
    if isinstance(value, bool):
        raise ValueError("must be the integer 1, not a boolean")
    return value


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_text(value: Any) -> Any:
    # pydantic would also take Unix timestamps (numbers or digit strings): the schema does not.
    if isinstance(value, datetime) or value is None:
        return value
    if not (isinstance(value, str) and _RFC3339.fullmatch(value)):
        raise ValueError("must be an RFC 3339 date-time string with an offset")
    return value


class ImageEvent(_Strict):
    """An uploaded image to judge."""

    schema_version: Annotated[Literal[1], BeforeValidator(_not_a_boolean)] = SCHEMA_VERSION
    event_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            description="The producer's id for this upload; verdicts carry it back.",
        ),
    ]
    image: ImageSource = Field(description="Exactly one of `data` or `url`.")
    policy_id: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9._-]{1,64}$",
            description="Policy to judge against; the service default when absent.",
        ),
    ] = None
    tenant: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9._-]{1,64}$",
            description="The tenant the upload belongs to: with a tenant file, it picks the "
            "default policy and the policies the event may name; echoed in the verdict.",
        ),
    ] = None
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Producer data echoed in the verdict (size-capped by the service).",
    )
    created_at: Annotated[AwareDatetime | None, BeforeValidator(_rfc3339_text)] = Field(
        None, description="When the upload happened (RFC 3339 with offset)."
    )


@dataclass(frozen=True)
class EventLimits:
    max_event_bytes: int
    max_metadata_bytes: int


@dataclass(frozen=True)
class RawImageEvent:
    """A record whose value is the image file itself (the raw form)."""

    event_id: str
    image: bytes
    policy_id: str | None = None
    metadata: dict[str, JsonValue] = field(default_factory=dict)
    tenant: str | None = None


def is_raw_image(headers: Sequence[tuple[str, bytes]]) -> bool:
    """Whether a record is in the raw form: a `content-type: image/...` header."""
    return any(
        key.lower() == "content-type" and value[:6].lower() == b"image/" for key, value in headers
    )


def parse_raw_event(
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    limits: EventLimits,
) -> RawImageEvent:
    """A raw-form record as an event, or the error that names why not."""
    if not value:
        raise InvalidEvent("raw image record has no value")
    if len(value) > limits.max_event_bytes:
        raise EventTooLarge(
            f"record value is {len(value)} bytes; the limit is {limits.max_event_bytes}"
        )
    named = {name.lower(): raw for name, raw in headers}
    event_id = _header_text(named.get("event-id", key), "event-id header (or key)")
    if event_id is None:
        raise InvalidEvent("raw image records need an event-id header or a record key")
    policy_id = _name_header(named, "policy-id")
    tenant = _name_header(named, "tenant")
    return RawImageEvent(event_id=event_id, image=value, policy_id=policy_id, tenant=tenant)


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What a policy id or a tenant name may be."""


def _name_header(named: dict[str, bytes], header: str) -> str | None:
    text = _header_text(named.get(header), f"{header} header")
    if text is not None and not _NAME.fullmatch(text):
        raise InvalidEvent(f"{header} header: must be 1-64 of A-Z a-z 0-9 . _ -")
    return text


def _header_text(raw: bytes | None, what: str) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent(f"{what} is not UTF-8") from None
    if not 0 < len(text) <= 256:
        raise InvalidEvent(f"{what} must be 1-256 characters")
    return text


def parse_event(value: bytes | None, limits: EventLimits) -> ImageEvent:
    """Validate one record value into an `ImageEvent`, or raise the error that names why not."""
    if value is None:
        raise InvalidEvent("record has no value (a tombstone?); expected a JSON image event")
    if len(value) > limits.max_event_bytes:
        raise EventTooLarge(
            f"record value is {len(value)} bytes; the limit is {limits.max_event_bytes}"
        )
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"record value is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(document).__name__}")
    try:
        event = ImageEvent.model_validate(document)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc)) from None
    try:
        metadata_bytes = len(orjson.dumps(event.metadata))
    except orjson.JSONEncodeError:
        raise InvalidEvent("metadata is nested too deeply") from None
    if metadata_bytes > limits.max_metadata_bytes:
        raise InvalidEvent(
            f"metadata is {metadata_bytes} bytes as JSON; the limit is {limits.max_metadata_bytes}"
        )
    return event


def describe_validation_error(
    exc: ValidationError, limit: int = 3, what: str = "image event"
) -> str:
    """One line a producer can act on: where each problem is and what it is, inputs omitted."""
    errors = exc.errors(include_url=False, include_input=False)
    root = f"<{what.split()[-1]}>"  # the whole record: <event>, <entry>, <decision>
    parts = [f"{_location(e['loc'], root)}: {e['msg']}" for e in errors]
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return f"invalid {what}: " + "; ".join(parts[:limit]) + more


def _location(loc: tuple[int | str, ...], root: str) -> str:
    """A field path for a message: producers' keys may hold anything, logs must stay one line."""
    path = ".".join(str(part)[:64] for part in loc) or root
    return "".join(c if c.isprintable() else "?" for c in path)


def shown_url(url: str | URL) -> str:
    """A URL for messages and logs: scheme, host and path, never the query (signed URLs carry
    credentials there)."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        return str(parsed.with_query(None).with_fragment(None).with_user(None))
    except ValueError:
        return "(invalid URL)"
