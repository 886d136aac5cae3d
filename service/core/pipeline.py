"""One record in, one outcome out: event → image → guard → verdict, or a dead letter.

This is the whole moderation flow and the one place that decides between a verdict, a dead
letter and a retry. It knows nothing of Kafka, Triton or HTTP: `service.adapters.kafka.consumer`
hands it a `Record` and publishes what it returns, and the guard and the fetcher are passed in
(`service.core.guard.Guard`, `Fetcher`), so it runs in unit tests with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import numpy.typing as npt
import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from service.core.backoff import exponential, full_jitter
from service.core.breaker import Breaker
from service.core.errors import DeadlineExceeded, GuardstreamError, UrlNotSupported
from service.core.events import (
    EventLimits,
    ImageEvent,
    ImageUrl,
    InlineImage,
    RawImageEvent,
    is_raw_image,
    parse_event,
    parse_raw_event,
    shown_url,
)
from service.core.guard import Guard, GuardReply
from service.core.images import DecodedImage, ImageLimits, decode_image, decode_inline
from service.core.judgements import (
    Judgement,
    ModelIdentity,
    model_judgement,
    served_identity,
    verdict_for,
)
from service.core.known import KnownContent, bank_match, bank_review
from service.core.policies import Policy, parse_answer
from service.core.positions import where
from service.core.rules import Rules
from service.core.verdicts import (
    DeadLetter,
    DeadLetterError,
    Source,
    Timings,
    Verdict,
    describe_headers,
    keep_original,
)
from service.ops.metrics import Metrics, exemplar
from service.ops.tracing import grpc_metadata, trace_id_of

log = logging.getLogger(__name__)

Outcome = Verdict | DeadLetter


@dataclass(frozen=True)
class Record:
    """A consumed record, as the pipeline needs it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None = None
    """The producer's (or broker's) timestamp, for end-to-end latency."""

    @property
    def where(self) -> str:
        return where(self.topic, self.partition, self.offset)


class Fetcher(Protocol):
    async def fetch(self, url: str) -> bytes:
        """The bytes at `url`, or a GuardstreamError that says why not."""
        ...


@dataclass(frozen=True)
class Retry:
    """Retries of a retriable guard failure: `attempts` tries, exponential backoff, full jitter."""

    attempts: int
    first_backoff_s: float
    max_backoff_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return full_jitter(exponential(attempt, self.first_backoff_s, self.max_backoff_s))


@dataclass(frozen=True)
class PipelineLimits:
    event: EventLimits
    image: ImageLimits
    dead_letter_original_bytes: int


@dataclass
class _Judging:
    """One record being judged: the rules in force when it began, its event once parsed."""

    rules: Rules
    event: ImageEvent | RawImageEvent | None = None


class Pipeline:
    def __init__(
        self,
        *,
        rules: Callable[[], Rules],
        guard: Guard,
        limits: PipelineLimits,
        decode_pool: Executor,
        retry: Retry,
        breaker: Breaker,
        deadline_s: float,
        metrics: Metrics,
        tracer: Tracer,
        fetcher: Fetcher | None = None,
        known: KnownContent | None = None,
        model: ModelIdentity | None = None,
    ) -> None:
        """`rules`: the policies and tenants in force (a reload changes what it returns).
        `fetcher` None: `image.url` events are dead-lettered as url_not_supported.
        `known` None: no banks, decisions or reuse; the model judges every image.
        `model`: the model that answers, as Triton describes it at start-up (else the first
        answer tells)."""
        self._rules = rules
        self._guard = guard
        self._limits = limits
        self._decode_pool = decode_pool
        self._retry = retry
        self._breaker = breaker
        self._deadline_s = deadline_s
        self._metrics = metrics
        self._tracer = tracer
        self._fetcher = fetcher
        self._known = known
        self._model = model
        """The model that answers now: reused verdicts must come from it."""

    async def judge(self, record: Record) -> Outcome:
        """The outcome of one record; never raises for anything the record contains."""
        judging = _Judging(self._rules())  # for the whole record, whatever reloads meanwhile
        try:
            async with asyncio.timeout(self._deadline_s) as deadline:
                outcome = await self._judge(record, deadline, judging)
        except TimeoutError:
            outcome = self._dead_letter(
                record,
                None,
                DeadlineExceeded(
                    f"judging took longer than {self._deadline_s:g}s (time paused for a guard "
                    "outage not counted)"
                ),
            )
        return self._by_tenant(judging, outcome)

    def _by_tenant(self, judging: _Judging, outcome: Outcome) -> Outcome:
        """Count the outcome under its tenant's label; name the tenant in a verdict."""
        tenant = judging.event.tenant if judging.event else None
        code = outcome.error.code if isinstance(outcome, DeadLetter) else outcome.rating
        self._metrics.tenant_outcomes.labels(judging.rules.tenant_label(tenant), code).inc()
        named = judging.rules.verdict_tenant(tenant)
        if isinstance(outcome, Verdict) and named is not None:
            return outcome.model_copy(update={"tenant": named})
        return outcome

    async def _judge(self, record: Record, deadline: asyncio.Timeout, judging: _Judging) -> Outcome:
        started = time.perf_counter()
        event: ImageEvent | RawImageEvent | None = None
        try:
            event = judging.event = (
                parse_raw_event(record.value, record.key, record.headers, self._limits.event)
                if is_raw_image(record.headers)
                else parse_event(record.value, self._limits.event)
            )
            policy = judging.rules.policy_for(event.tenant, event.policy_id)
            fetch_started = time.perf_counter()
            source = event.image
            if isinstance(source, ImageUrl):
                source = await self._fetch(source.url)
            decode_started = time.perf_counter()
            image = await self._decode(source)
            guard_started = time.perf_counter()
            judgement = await self._judgement(policy, image, event.event_id, deadline)
            timings = Timings(
                fetch_ms=_ms(decode_started - fetch_started)
                if isinstance(event.image, ImageUrl)
                else None,
                decode_ms=_ms(guard_started - decode_started),
                guard_ms=_ms(time.perf_counter() - guard_started),
                total_ms=_ms(time.perf_counter() - started),
            )
            verdict = verdict_for(judgement, event, policy, image, _source(record), timings)
            self._metrics.decided.labels(verdict.decided_by).inc()
            if self._known is not None and self._model is not None:
                await self._known.remember(policy, verdict, image.pdq, self._model)
            return verdict
        except GuardstreamError as exc:
            return self._dead_letter(record, event, exc)
        except Exception as exc:
            # A bug of ours must not stop the partition or lose the record: dead-letter it
            # with the generic code and leave the traceback in the log.
            log.exception("internal error judging %s", record.where)
            return self._dead_letter(
                record, event, GuardstreamError(f"internal error: {type(exc).__name__}: {exc}")
            )

    async def _fetch(self, url: str) -> bytes:
        if self._fetcher is None:
            raise UrlNotSupported(
                "fetching image.url is turned off here (GUARDSTREAM_FETCH_URLS=false); "
                "send image.data (base64)"
            )
        with self._tracer.start_as_current_span("fetch image", kind=SpanKind.CLIENT) as span:
            # Never the full URL: signed URLs carry credentials in their query.
            span.set_attribute("url.full", shown_url(url))
            started = time.perf_counter()
            try:
                encoded = await self._fetcher.fetch(url)
            except GuardstreamError as exc:
                self._metrics.fetch_latency.labels(exc.code).observe(time.perf_counter() - started)
                raise
            self._metrics.fetch_latency.labels("ok").observe(time.perf_counter() - started)
            span.set_attribute("http.response.body.size", len(encoded))
            return encoded

    async def _decode(self, source: InlineImage | bytes) -> DecodedImage:
        """The image of an inline event, or of the bytes fetched for a URL event."""
        loop = asyncio.get_running_loop()
        limits = self._limits.image
        with self._tracer.start_as_current_span("decode image") as span:
            if isinstance(source, InlineImage):
                decoding = loop.run_in_executor(
                    self._decode_pool, decode_inline, source.data, limits
                )
            else:
                decoding = loop.run_in_executor(self._decode_pool, decode_image, source, limits)
            image = await decoding
            span.set_attributes(
                {
                    "guardstream.image.format": image.format,
                    "guardstream.image.width": image.width,
                    "guardstream.image.height": image.height,
                    "guardstream.image.bytes": image.encoded_bytes,
                }
            )
            return image

    async def _judgement(
        self, policy: Policy, image: DecodedImage, event_id: str, deadline: asyncio.Timeout
    ) -> Judgement:
        """Known content first (`service.core.known`), then the model."""
        known = self._known
        if known is None:
            return await self._assess(policy, image, deadline)
        with self._tracer.start_as_current_span("known content") as span:
            bank = None
            if known.banks is not None:
                loop = asyncio.get_running_loop()
                bank = await loop.run_in_executor(self._decode_pool, known.match_bank, image)
            decided = known.before_reuse(policy, image, bank)
            if decided is None:
                decided = await known.reused(policy, image, self._model)
            span.set_attribute("guardstream.decided_by", decided.decided_by if decided else "model")
            matched = decided.match if decided else (bank_match(bank) if bank else None)
            if matched is not None:
                span.set_attributes(
                    {
                        "guardstream.match.bank": matched.bank,
                        "guardstream.match.entry_id": matched.entry_id,
                        "guardstream.match.distance": matched.distance,
                    }
                )
        if decided is None:
            decided = await known.once(
                policy, image, event_id, lambda: self._assess(policy, image, deadline)
            )
        return bank_review(decided, bank)

    async def _assess(
        self, policy: Policy, image: DecodedImage, deadline: asyncio.Timeout
    ) -> Judgement:
        """The guard's judgement of the image, about one frame: for an animated image judged
        frame by frame, the first frame rated Unsafe, else the first frame."""
        first: Judgement | None = None
        for index, pixels in zip(
            image.frame_indexes, (image.pixels, *image.more_frames), strict=True
        ):
            reply = await self._ask(policy, pixels, deadline)
            self._model = served_identity(reply)
            answer = model_judgement(reply, parse_answer(reply.text, policy), image, index)
            if answer.rating == "Unsafe":
                return answer
            first = first or answer
        assert first is not None  # there is always a first frame
        return first

    async def _ask(
        self, policy: Policy, pixels: npt.NDArray[np.uint8], deadline: asyncio.Timeout
    ) -> GuardReply:
        """Ask the guard, retrying what may pass; an outage waits on the breaker instead."""
        prompt = policy.render_prompt()
        tries_left = self._retry.attempts
        attempt = 0
        while True:
            await self._wait_out_outage(deadline)
            with self._tracer.start_as_current_span("guard infer", kind=SpanKind.CLIENT) as span:
                span.set_attributes(
                    {
                        "rpc.system": "grpc",
                        "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": "ModelInfer",
                        "guardstream.attempt": attempt + 1,
                    }
                )
                started = time.perf_counter()
                try:
                    reply = await self._guard.ask(prompt, pixels, grpc_metadata())
                except GuardstreamError as exc:
                    self._metrics.guard_latency.labels(exc.code).observe(
                        time.perf_counter() - started, exemplar(trace_id_of(span))
                    )
                    span.set_attribute("error.type", exc.code)
                    if not exc.retriable:
                        self._breaker.record_success()  # Triton answered: it is up
                        raise
                    outage = self._breaker.record_failure()
                    tries_left -= 0 if outage else 1
                    if tries_left <= 0:
                        raise
                else:
                    self._metrics.guard_latency.labels("ok").observe(
                        time.perf_counter() - started, exemplar(trace_id_of(span))
                    )
                    self._breaker.record_success()
                    return reply
            self._metrics.guard_retries.inc()
            await asyncio.sleep(self._retry.delay(attempt))
            attempt += 1

    async def _wait_out_outage(self, deadline: asyncio.Timeout) -> None:
        """Wait for an open breaker with the event's deadline stopped meanwhile."""
        if not self._breaker.is_open:
            return
        loop = asyncio.get_running_loop()
        when = deadline.when()
        remaining = None if when is None else when - loop.time()
        deadline.reschedule(None)
        await self._breaker.wait_closed()
        deadline.reschedule(None if remaining is None else loop.time() + remaining)

    def _dead_letter(
        self, record: Record, event: ImageEvent | RawImageEvent | None, exc: GuardstreamError
    ) -> DeadLetter:
        original, size, truncated = keep_original(
            record.value, self._limits.dead_letter_original_bytes
        )
        return DeadLetter(
            event_id=event.event_id if event else event_id_hint(record),
            error=DeadLetterError(
                code=exc.code, message=exc.message, model_output=getattr(exc, "model_output", None)
            ),
            source=_source(record),
            original=original,
            original_size=size,
            original_truncated=truncated,
            original_headers=describe_headers(list(record.headers)),
            trace_id=trace_id_of(trace.get_current_span()),
            failed_at=datetime.now(UTC),
        )


def event_id_hint(record: Record) -> str | None:
    """The producer's event id for a record that failed validation, when one can be seen.

    Dead letters should carry the id back to the producer even when the event is invalid for
    another reason; the `event-id` header (raw events) or a string `event_id` field count.
    """
    for key, value in record.headers:
        if key == "event-id":
            return value.decode("utf-8", errors="replace")[:256]
    if record.value is None or len(record.value) > 1_048_576:
        return None
    try:
        document = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return None
    candidate = document.get("event_id") if isinstance(document, dict) else None
    return candidate if isinstance(candidate, str) and 0 < len(candidate) <= 256 else None


def _source(record: Record) -> Source:
    return Source(topic=record.topic, partition=record.partition, offset=record.offset)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
