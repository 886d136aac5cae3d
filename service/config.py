"""Settings, read once from `GUARDSTREAM_*` environment variables.

`python -m service --help` prints this table from the field descriptions below, so the
descriptions are the documentation. OpenTelemetry reads its own standard `OTEL_*` variables
(see `service.ops.tracing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context
from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.adapters.fetch import parse_allowed_networks

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
    review_topic: str = Field(
        "verdicts.review",
        description="Verdicts marked for review (action review, or picked by quality sampling) "
        "are also published here (same key, value and headers as on the verdict topic), for "
        "people to look at.",
    )
    group_id: str = Field("guardstream", description="Kafka consumer group.")
    client_id: str = Field("guardstream", description="Kafka client id (shows in broker logs).")
    group_instance_id: str = Field(
        "",
        description="Static group membership (KIP-345): a stable id per instance (e.g. the "
        "StatefulSet pod name) lets a restarted instance take its partitions back at once, "
        "without a rebalance; empty means dynamic membership.",
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Kafka group session timeout: a silent member is dropped."
    )
    max_poll_interval_ms: int = Field(
        300_000,
        ge=1000,
        description="Kafka max.poll.interval.ms, also the rebalance timeout: how long the group "
        "waits for members to rejoin.",
    )
    fetch_max_wait_ms: int = Field(
        500,
        ge=0,
        le=60_000,
        description="Kafka fetch.max.wait.ms: how long the broker may hold a fetch while it has "
        "no records for it. Kafka answers as soon as a record arrives, so there this adds no "
        "latency; a broker that holds every fetch this long (Tansu) adds up to it to every "
        "event's latency, and wants a few milliseconds.",
    )
    auto_offset_reset: str = Field(
        "earliest",
        pattern="^(earliest|latest)$",
        description="Where a group with no committed offset starts: earliest or latest.",
    )

    # Kafka security (every managed Kafka needs some of these)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How to talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN",
        description="SASL mechanism (SASL_* protocols): PLAIN, SCRAM-SHA-256, SCRAM-SHA-512.",
    )
    sasl_username: str = Field("", description="SASL user name (from a Secret).")
    sasl_password: SecretStr = Field(
        SecretStr(""), description="SASL password (from a Secret; never logged)."
    )
    ssl_cafile: FilePath | None = Field(
        None,
        description="PEM file of the CAs that sign the brokers' certificates (SSL, SASL_SSL); "
        "unset: the system's CAs.",
    )
    ssl_certfile: FilePath | None = Field(
        None, description="PEM client certificate, for brokers that require mutual TLS."
    )
    ssl_keyfile: FilePath | None = Field(None, description="PEM key of the client certificate.")
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )

    # Delivery
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="at-least-once: publish, then commit offsets. exactly-once: outcomes and "
        "offsets in one Kafka transaction (needs a stable transactional id per instance).",
    )
    transactional_id: str = Field(
        "",
        description="exactly-once only: this instance's transactional id; empty means "
        "<group_id>-<group_instance_id or hostname>, stable for StatefulSet pods. A restarted "
        "instance with the same id fences its predecessor.",
    )
    enable_idempotence: bool = Field(
        True,
        description="Idempotent producer (no duplicates from the producer's own retries). "
        "Turn off only for brokers that refuse it (no IDEMPOTENT_WRITE permission, Tansu); "
        "exactly-once needs it.",
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Records taken but not yet finished (outcome acknowledged), all partitions.",
    )
    max_in_flight_bytes: int = Field(
        64 * MiB,
        ge=1024,
        description="Bytes of record values taken but not yet finished; fetching pauses above.",
    )
    event_deadline_s: float = Field(
        300.0,
        gt=0,
        description="Longest one event may take (not counting time paused by the guard "
        "breaker); then it is dead-lettered as deadline_exceeded.",
    )
    publish_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long publishing an outcome is retried through broker errors before "
        "the service stops (uncommitted, so nothing is lost).",
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
    breaker_failures: int = Field(
        5,
        ge=1,
        description="Consecutive unavailable/timeout answers from Triton that open the breaker: "
        "consumption pauses, waiting events keep their retries, a probe closes it.",
    )
    breaker_probe_interval_s: float = Field(
        1.0, gt=0, description="How often an open breaker asks Triton whether the model is ready."
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

    # Conversations with the guard (`python -m service ask`, `service.ask`)
    ask_max_questions: int = Field(
        8,
        ge=1,
        le=8,
        description="Questions one conversation may ask, the policy prompt included; the next "
        "is refused. Every answer is sent back with each later question, and the guards take at "
        "most 16 earlier turns.",
    )
    ask_max_question_chars: int = Field(
        2000, ge=1, description="Longest question accepted, in characters; longer is refused."
    )
    ask_max_tokens: int = Field(
        512, ge=1, description="max_tokens sent to the guard for each answer of a conversation."
    )

    # Policies
    default_policy: str = Field(
        "llavaguard-v1.2", description="Policy used when an event names none."
    )
    policy_dir: Path | None = Field(
        None, description="Directory of extra policy files (*.toml); same id overrides."
    )
    tenant_file: Path | None = Field(
        None,
        description="TOML file of tenants: each one's default policy and the policies its events "
        "may name (policy_not_allowed otherwise). Unset: an event's tenant is only echoed in "
        "its verdict.",
    )
    unknown_tenant: Literal["default", "dead-letter"] = Field(
        "default",
        description="An event naming a tenant the tenant file does not list: default judges it "
        "as if it named none (its policy_id, else default_policy); dead-letter dead-letters it "
        "as unknown_tenant.",
    )
    reload_interval_s: float = Field(
        5.0,
        ge=0,
        description="How often the policy directory and the tenant file are checked for changed "
        "content, and reloaded if so; 0: never (SIGHUP still reloads). A file that fails to "
        "load leaves the rules in force as they were.",
    )

    # Known content: hash banks, reviewers' decisions, verdict reuse (README: Known content)
    pdq: bool = Field(
        True,
        description="Compute every image's PDQ perceptual hash (about 10 ms of CPU; the verdict "
        "carries it), needed by PDQ banks and near-duplicate reuse.",
    )
    banks_file: Path | None = Field(
        None,
        description="TOML file naming the hash banks (action, category, PDQ threshold, entry "
        "files). Unset: no banks, and the banks topic is not read (a bank is named here first).",
    )
    banks_topic: str = Field(
        "guardstream.banks",
        description="Compacted topic of bank entries (python -m service banks publishes them); "
        "read whole at start-up and followed. Empty: banks come from their files only.",
    )
    decisions_topic: str = Field(
        "verdicts.decisions",
        description="Compacted topic of reviewers' decisions, read whole at start-up and "
        "followed: an image a reviewer decided gets that decision under the same policy. Empty: "
        "no human decisions.",
    )
    known_load_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest the banks and decisions topics may take to read at start-up.",
    )
    reuse: Literal["off", "memory", "redis"] = Field(
        "memory",
        description="Verdict reuse for an image judged before under the same policy, policy "
        "version and model: memory (an LRU in this process), redis (shared by every pod, at "
        "redis_url), off.",
    )
    reuse_ttl_s: float = Field(
        86_400.0, gt=0, description="How long a verdict may be reused, in seconds."
    )
    reuse_max_entries: int = Field(
        100_000, ge=1, description="Verdicts the in-process store (and the PDQ index) keeps."
    )
    reuse_pdq_distance: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Reuse a verdict for a near-duplicate whose PDQ hash is within this many "
        "bits (both hashes of quality >= 50); unset: exact duplicates (same sha256) only.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis (or Valkey) of the shared reuse store, for reuse=redis; rediss:// "
        "for TLS.",
    )
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis password (from a Secret); empty: none."
    )
    redis_timeout_s: float = Field(
        0.1,
        gt=0,
        description="Longest one reuse-store request may take; slower or failing, the event "
        "goes to the model (reuse never fails an event).",
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
        1152,
        ge=32,
        description="Images larger than this are reduced (JPEG DCT scaling, then a whole-factor "
        "box filter) until their longer side is between half of it and it. 1152: LLaVA-OneVision "
        "(LlavaGuard) pools anything beyond 3x3 tiles of 384 px back down (anyres_max_9).",
    )
    animation_frames: int = Field(
        1,
        ge=1,
        le=16,
        description="Frames of an animated GIF/WebP/PNG judged, evenly spaced from the first "
        "(each is one guard request; the verdict is the first frame rated Unsafe, else the "
        "first); 1 judges the first frame only.",
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

    # Fetching image.url (SSRF defence: see service/adapters/fetch.py)
    fetch_urls: bool = Field(
        True,
        description="Fetch `image.url` events; false dead-letters them as url_not_supported.",
    )
    fetch_connect_timeout_s: float = Field(
        3.0, gt=0, description="Longest wait to connect to an image host."
    )
    fetch_read_timeout_s: float = Field(
        5.0, gt=0, description="Longest silence from an image host while reading its answer."
    )
    fetch_total_timeout_s: float = Field(
        15.0,
        gt=0,
        description="Longest a fetch may take in all, redirects included (a slow drip of bytes "
        "ends here): fetch_timeout.",
    )
    fetch_max_redirects: int = Field(
        3, ge=0, le=10, description="Redirects followed, each one validated like the URL itself."
    )
    fetch_allowed_hosts: str = Field(
        "",
        description="Comma-separated host names images may come from (`*.example.com` for "
        "subdomains); empty means any public host.",
    )
    fetch_allowed_networks: str = Field(
        "",
        description="Comma-separated CIDRs fetched from although not public (an on-prem object "
        "store, e.g. 10.20.0.0/16); empty: only globally routable addresses.",
    )

    # Operations
    health_host: str = Field(
        "0.0.0.0", description="Address of the /livez, /readyz, /metrics server."
    )
    health_port: int = Field(
        8080, ge=0, le=65535, description="Port of /livez, /readyz and /metrics; 0 picks one."
    )
    health_check_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Longest /readyz waits for its checks before answering 503; keep it under "
        "the probe's timeoutSeconds.",
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line with trace ids; text: for people."
    )

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_allowed_networks(value)  # raises ValueError, reported as a settings error
        return value

    @field_validator(
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "tenant_file",
        "banks_file",
        "reuse_pdq_distance",
        mode="before",
    )
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # A ConfigMap key left empty means "not set", as for the other settings.
        return None if value == "" else value

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_username and self.sasl_password.get_secret_value()
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_username and sasl_password"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self

    def kafka_connection(self) -> dict[str, Any]:
        """aiokafka keyword arguments for reaching the brokers: address, client id, security."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL_"):
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value(),
            }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
            context.check_hostname = self.ssl_check_hostname
            options["ssl_context"] = context
        return options

    @model_validator(mode="after")
    def _review_topic_is_a_topic_of_its_own(self) -> Settings:
        # On the verdict topic, every review verdict would be published there twice.
        if self.review_topic in (self.verdict_topic, self.dead_letter_topic):
            raise ValueError("review_topic must differ from verdict_topic and dead_letter_topic")
        return self

    @model_validator(mode="after")
    def _exactly_once_needs_idempotence(self) -> Settings:
        if self.delivery == "exactly-once" and not self.enable_idempotence:
            raise ValueError("delivery=exactly-once needs enable_idempotence=true")
        return self
