"""Settings, read once from `GUARDSTREAM_*` environment variables.

`python -m service --help` prints this table from the field descriptions below, so the
descriptions are the documentation. OpenTelemetry reads its own standard `OTEL_*` variables
(see `service.tracing`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GUARDSTREAM_"
MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # Kafka
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    input_topic: str = Field("images", description="Topic of image events to judge.")
    verdict_topic: str = Field("verdicts", description="Topic the verdicts are published to.")
    dead_letter_topic: str = Field(
        "images.dlq", description="Topic of events that could not be judged, with the reason."
    )
    group_id: str = Field("guardstream", description="Kafka consumer group.")
    client_id: str = Field("guardstream", description="Kafka client id (shows in broker logs).")
    auto_offset_reset: str = Field(
        "earliest",
        pattern="^(earliest|latest)$",
        description="Where a group with no committed offset starts: earliest or latest.",
    )

    # Delivery
    max_in_flight: int = Field(
        64, ge=1, le=10_000, description="Events being judged at once, across all partitions."
    )
    commit_interval_ms: int = Field(
        500, ge=10, description="How often finished offsets are committed, in milliseconds."
    )
    drain_timeout_s: float = Field(
        20.0,
        gt=0,
        description="On shutdown or partition revocation, how long in-flight events may finish.",
    )

    # Triton / the guard model
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address (host:port).")
    guard_model: str = Field("guard", description="Triton model that answers the policy prompt.")
    guard_model_version: str = Field(
        "", description="Triton model version; empty means the server's default (latest)."
    )
    guard_timeout_s: float = Field(60.0, gt=0, description="Deadline of one Triton request.")
    guard_retries: int = Field(
        3, ge=0, le=20, description="Retries of a Triton request that failed as unavailable."
    )
    guard_retry_backoff_s: float = Field(
        0.2, gt=0, description="First retry delay; doubled each retry, with jitter."
    )
    guard_startup_timeout_s: float = Field(
        120.0, gt=0, description="How long `run` waits for Triton and the model to be ready."
    )
    max_tokens: int = Field(500, ge=1, description="max_tokens sent to the guard model.")
    temperature: float = Field(
        0.2, ge=0, description="Sampling temperature (LlavaGuard's model card uses 0.2)."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top_p.")
    top_k: int = Field(50, ge=0, description="Top-k sampling.")
    seed: int | None = Field(None, ge=0, description="Sampling seed; unset sends none.")
    end_id: int | None = Field(
        None, description="End-of-sequence token id to send (Qwen2: 151645); unset sends none."
    )
    pad_id: int | None = Field(
        None, description="Padding token id to send (Qwen2: 151643); unset sends none."
    )

    # Policies
    default_policy: str = Field(
        "llavaguard-v1.2", description="Policy used when an event names none."
    )
    policy_dir: Path | None = Field(
        None, description="Directory of extra policy files (*.toml); same id overrides."
    )

    # Limits on what strangers send
    max_event_bytes: int = Field(
        12 * MiB, ge=1024, description="Largest record value accepted, in bytes."
    )
    max_image_bytes: int = Field(
        8 * MiB, ge=1024, description="Largest encoded image accepted, in bytes."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image accepted, in pixels (width x height)."
    )
    max_image_side: int = Field(
        16_384, ge=1, description="Largest image width or height accepted, in pixels."
    )
    image_resize_side: int = Field(
        1024,
        ge=32,
        description="Images are downscaled so their longer side is at most this before judging.",
    )
    max_metadata_bytes: int = Field(
        4096, ge=0, description="Largest `metadata` object accepted, as compact JSON bytes."
    )
    dead_letter_original_bytes: int = Field(
        65_536,
        ge=0,
        description="At most this many bytes of the original record are kept in a dead letter.",
    )
    decode_workers: int = Field(
        2, ge=1, le=64, description="Threads that decode images off the event loop."
    )

    # Operations
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
