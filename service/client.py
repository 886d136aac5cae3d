"""For upload services: build valid image events and publish them with trace context.

    async with ImageEventProducer("kafka:9092") as producer:
        await producer.send(image_event("upload-42", image=jpeg_bytes, metadata={"user": "u1"}))

The event is keyed by its `event_id` unless a key is given, so its verdict (keyed like the
input) lands on the same partition of the verdicts topic for every retry of that upload. The
current OpenTelemetry context travels in the W3C `traceparent` header, so the consumer's spans
continue the upload's trace.
"""

from __future__ import annotations

import base64
from datetime import datetime
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from opentelemetry.trace import SpanKind
from pydantic import JsonValue

from service.core.events import ImageEvent, ImageUrl, InlineImage
from service.ops.tracing import get_tracer, inject


def image_event(
    event_id: str,
    *,
    image: bytes | None = None,
    url: str | None = None,
    policy_id: str | None = None,
    tenant: str | None = None,
    metadata: dict[str, JsonValue] | None = None,
    created_at: datetime | None = None,
) -> ImageEvent:
    """A validated event for encoded image bytes (JPEG, PNG, ...) or an image URL."""
    if (image is None) == (url is None):
        raise ValueError("give exactly one of image (bytes) or url")
    source = (
        InlineImage(data=base64.b64encode(image).decode("ascii"))
        if image is not None
        else ImageUrl(url=str(url))
    )
    return ImageEvent(
        event_id=event_id,
        image=source,
        policy_id=policy_id,
        tenant=tenant,
        metadata=metadata or {},
        created_at=created_at,
    )


def encode_event(event: ImageEvent) -> bytes:
    """The record value for an event: compact JSON, unset optional fields left out."""
    return event.model_dump_json(exclude_none=True).encode()


class ImageEventProducer:
    """An idempotent Kafka producer of image events (extra keyword arguments go to aiokafka)."""

    def __init__(self, bootstrap_servers: str, topic: str = "images", **kafka: Any) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, **kafka
        )
        self._tracer = get_tracer()

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> ImageEventProducer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def send(self, event: ImageEvent, key: bytes | None = None) -> RecordMetadata:
        """Publish one event and wait for the broker's acknowledgement."""
        return await self.send_raw(
            encode_event(event), key=key or event.event_id.encode(), event_id=event.event_id
        )

    async def send_image(
        self,
        image: bytes,
        event_id: str,
        *,
        content_type: str = "image/jpeg",
        policy_id: str | None = None,
        tenant: str | None = None,
    ) -> RecordMetadata:
        """Publish an image file in the raw form: the value is the file, the rest is headers.

        For small images only (Kafka's default record limit is 1 MB); the service sniffs the
        format from the bytes, so `content_type` need only start with `image/`.
        """
        if not content_type.startswith("image/"):
            raise ValueError(f"content_type must be image/..., not {content_type!r}")
        headers = [("content-type", content_type.encode())]
        if policy_id is not None:
            headers.append(("policy-id", policy_id.encode()))
        if tenant is not None:
            headers.append(("tenant", tenant.encode()))
        return await self.send_raw(image, key=event_id.encode(), event_id=event_id, headers=headers)

    async def send_raw(
        self,
        value: bytes,
        *,
        key: bytes | None = None,
        event_id: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> RecordMetadata:
        """Publish a value as it is (for tools and tests that need malformed events too)."""
        with self._tracer.start_as_current_span(
            f"{self.topic} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": self.topic,
            },
        ):
            sent = inject() + (headers or [])
            if event_id is not None:
                sent.append(("event-id", event_id.encode()))
            delivery = await self._producer.send(self.topic, value=value, key=key, headers=sent)
            return await delivery
