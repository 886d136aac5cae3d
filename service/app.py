"""Wire the service together from its settings and serve until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version

from aiokafka.errors import KafkaError
from opentelemetry.trace import Tracer

from service.adapters.fetch import Fetcher, FetchLimits, parse_allowed_hosts, parse_allowed_networks
from service.adapters.kafka.clients import consumer_from, producer_factory
from service.adapters.kafka.consumer import ModerationConsumer
from service.adapters.kafka.delivery import delivery_from
from service.adapters.kafka.table import Apply, TableReader
from service.adapters.redis_store import RedisStore
from service.adapters.rules_source import RulesFiles, RulesSource
from service.adapters.triton import GuardClient, Sampling
from service.config import Settings
from service.core.bank_files import load_banks
from service.core.breaker import Breaker
from service.core.events import EventLimits
from service.core.human_decisions import HumanDecisions
from service.core.images import ImageLimits, use_pixel_limit
from service.core.known import KnownContent, NearDuplicates
from service.core.pipeline import Pipeline, PipelineLimits, Retry
from service.core.reuse import MemoryStore, VerdictStore
from service.core.rules import Rules
from service.ops.health import Check, HealthServer
from service.ops.metrics import Metrics
from service.ops.tracing import describe_exporter, get_tracer
from service.shadow import CandidateParts, Shadow, ShadowSettings, guard_ready

log = logging.getLogger(__name__)


def limits_from(settings: Settings) -> PipelineLimits:
    return PipelineLimits(
        event=EventLimits(
            max_event_bytes=settings.max_event_bytes,
            max_metadata_bytes=settings.max_metadata_bytes,
        ),
        image=ImageLimits(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_image_side=settings.max_image_side,
            resize_side=settings.image_resize_side,
            frames=settings.animation_frames,
            pdq=settings.pdq,
        ),
        dead_letter_original_bytes=settings.dead_letter_original_bytes,
    )


def sampling_from(settings: Settings) -> Sampling:
    return Sampling(
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        end_id=settings.end_id,
        pad_id=settings.pad_id,
    )


def guard_from(settings: Settings) -> GuardClient:
    return GuardClient(
        settings.triton_url,
        settings.guard_model,
        sampling_from(settings),
        version=settings.guard_model_version,
        timeout_s=settings.guard_timeout_s,
    )


def fetcher_from(settings: Settings) -> Fetcher | None:
    if not settings.fetch_urls:
        return None
    return Fetcher(
        FetchLimits(
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            allowed_hosts=parse_allowed_hosts(settings.fetch_allowed_hosts),
            allowed_networks=parse_allowed_networks(settings.fetch_allowed_networks),
            user_agent=f"guardstream/{version('guardstream')}",
        ),
        max_connections=settings.max_in_flight,
    )


def store_from(settings: Settings, metrics: Metrics) -> VerdictStore | None:
    """The verdict-reuse store `reuse` names; None when reuse is off."""
    if settings.reuse == "off":
        return None
    if settings.reuse == "memory":
        return MemoryStore(settings.reuse_max_entries, settings.reuse_ttl_s)
    return RedisStore.from_settings(settings, metrics)


def breaker_from(settings: Settings, guard: GuardClient, metrics: Metrics) -> Breaker:
    async def guard_ready() -> bool:
        problem = await guard.not_ready(settings.breaker_probe_interval_s * 4)
        if problem is not None:
            log.debug("breaker probe: guard still unavailable: %s", problem)
        return problem is None

    return Breaker(
        settings.breaker_failures,
        guard_ready,
        settings.breaker_probe_interval_s,
        on_change=lambda is_open: metrics.breaker_open.set(1 if is_open else 0),
    )


@dataclass(frozen=True)
class BatchPipeline:
    pipeline: Pipeline
    guard: GuardClient
    model: tuple[str, str]
    """The served model's (name, version), as verdicts name it."""


@contextlib.asynccontextmanager
async def batch_pipeline(settings: Settings, rules: Rules) -> AsyncIterator[BatchPipeline]:
    """The service's pipeline for a tool that judges a batch (eval, replay) under fixed `rules`:
    the guard once ready, no known content (the tool measures the guard and the policy),
    metrics of its own (nothing scrapes them); everything closed afterwards."""
    use_pixel_limit(settings.max_image_pixels)
    guard = guard_from(settings)
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    fetcher = fetcher_from(settings)
    metrics = Metrics()
    breaker = breaker_from(settings, guard, metrics)
    try:
        await guard.wait_ready(settings.guard_startup_timeout_s)
        model = await guard.identity()
        pipeline = pipeline_from(
            settings,
            rules=lambda: rules,
            guard=guard,
            breaker=breaker,
            decode_pool=decode_pool,
            metrics=metrics,
            tracer=get_tracer(),
            fetcher=fetcher,
            model=model,
        )
        yield BatchPipeline(pipeline, guard, model)
    finally:
        await breaker.close()
        decode_pool.shutdown(wait=False, cancel_futures=True)
        if fetcher is not None:
            await fetcher.close()
        await guard.close()


class KnownSources:
    """Known content and what feeds it: bank files, the banks and decisions topics, the store.

    The topics are read whole before the first event is judged, then followed. A bank file
    with rows but no valid entry is a readiness problem (`problems`): a blocklist that
    silently loaded nothing would let everything through.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        banks, self.problems = (
            load_banks(settings.banks_file) if settings.banks_file else (None, [])
        )
        self.known = KnownContent(
            metrics,
            banks=banks,
            decisions=HumanDecisions() if settings.decisions_topic else None,
            store=store_from(settings, metrics),
            near=NearDuplicates(settings.reuse_max_entries, settings.reuse_pdq_distance)
            if settings.reuse != "off" and settings.reuse_pdq_distance is not None
            else None,
        )
        self._tables: list[TableReader] = []
        if banks is not None:  # each row logged with file:line as it was read
            metrics.known_rejected.labels("banks_file").inc(banks.file_rows_rejected)
        self._count_banks()

    async def start(self) -> None:
        """Read the banks and decisions topics to their end, then follow them."""
        known, settings = self.known, self._settings
        if known.banks is not None and settings.banks_topic:
            await self._table(settings.banks_topic, "banks_topic", self._bank_record)
        if known.decisions is not None:
            await self._table(settings.decisions_topic, "decisions_topic", known.decisions.apply)

    async def stop(self) -> None:
        for table in self._tables:
            await table.stop()
        if self.known.store is not None:
            await self.known.store.close()

    async def _table(self, topic: str, source: str, apply: Apply) -> None:
        def counted(key: bytes, value: bytes | None, where: str) -> bool:
            usable = apply(key, value, where)
            if not usable:
                self._metrics.known_rejected.labels(source).inc()
            return usable

        table = TableReader(self._settings, topic, counted)
        try:
            await table.load(self._settings.known_load_timeout_s)
        except LookupError as exc:
            # Nobody has published to it yet: nothing is known from it until a restart.
            log.warning("%s; nothing known from it until it exists and guardstream restarts", exc)
            await table.stop()
            return
        table.follow()
        self._tables.append(table)

    def _bank_record(self, key: bytes, value: bytes | None, where: str) -> bool:
        assert self.known.banks is not None
        usable = self.known.banks.apply(key, value, where)
        if usable:  # the one bank it changed: a topic of 10^6 entries is read at start-up
            bank = key.split(b"/", 1)[0].decode()
            self._metrics.bank_entries.labels(bank).set(self.known.banks.counts()[bank])
        return usable

    def _count_banks(self) -> None:
        if self.known.banks is not None:
            for name, count in self.known.banks.counts().items():
                self._metrics.bank_entries.labels(name).set(count)


def pipeline_from(
    settings: Settings,
    *,
    rules: Callable[[], Rules],
    guard: GuardClient,
    breaker: Breaker,
    decode_pool: Executor,
    metrics: Metrics,
    tracer: Tracer,
    fetcher: Fetcher | None,
    known: KnownContent | None = None,
    model: tuple[str, str] | None = None,
) -> Pipeline:
    return Pipeline(
        rules=rules,
        guard=guard,
        limits=limits_from(settings),
        decode_pool=decode_pool,
        retry=Retry(
            attempts=settings.guard_retries + 1,
            first_backoff_s=settings.guard_retry_backoff_s,
        ),
        breaker=breaker,
        deadline_s=settings.event_deadline_s,
        metrics=metrics,
        tracer=tracer,
        fetcher=fetcher,
        known=known,
        model=model,
    )


def shadow_from(
    config: ShadowSettings,
    live: Settings,
    rules: Callable[[], Rules],
    metrics: Metrics,
    tracer: Tracer,
    fetcher: Fetcher | None,
) -> Shadow:
    """The candidate's pipeline: its guard and breaker, one decode thread (shadow decoding never
    queues ahead of live decoding), no known content (the candidate itself is measured), and
    metrics of its own (its judgements must not count as the live service's). UnknownPolicy
    for a candidate policy the files do not define: the service refuses to start."""
    settings = config.candidate(live)
    guard = guard_from(settings)
    private = Metrics()
    breaker = Breaker(
        settings.breaker_failures,
        lambda: guard_ready(guard, settings.breaker_probe_interval_s * 4),
        settings.breaker_probe_interval_s,
    )
    candidate_rules = rules
    if config.policy:
        policy = config.policy
        # Derived once per snapshot of the rules (a reload swaps the snapshot), not per event;
        # deriving it here raises UnknownPolicy at start-up.
        base = rules()
        snapshot = [base, dataclasses.replace(base, only_policy=policy)]  # [live, candidate]

        def candidate_rules() -> Rules:
            current = rules()
            if snapshot[0] is not current:
                snapshot[:] = [current, dataclasses.replace(current, only_policy=policy)]
            return snapshot[1]

    parts = CandidateParts(
        guard, breaker, ThreadPoolExecutor(1, thread_name_prefix="shadow-decode")
    )
    pipeline = pipeline_from(
        settings,
        rules=candidate_rules,
        guard=guard,
        breaker=breaker,
        decode_pool=parts.decode_pool,
        metrics=private,
        tracer=tracer,
        fetcher=fetcher,
    )
    # Its own idempotent acks=all producer: shadow verdicts are never part of the live
    # delivery's transactions, so they can neither hold one up nor abort it.
    producer = producer_factory(live.model_copy(update={"delivery": "at-least-once"}))()
    return Shadow(config, pipeline, producer, metrics, parts)


class Readiness:
    """What /readyz reports: partitions, broker, guard model, breaker (as each part starts)."""

    def __init__(self, guard: GuardClient, check_timeout_s: float) -> None:
        self._guard = guard
        self._timeout_s = check_timeout_s
        self.consumer: ModerationConsumer | None = None
        self.breaker: Breaker | None = None
        self.known_problems: list[str] = []

    async def readiness(self) -> Mapping[str, Check]:
        guard, broker = await asyncio.gather(self._guard_check(), self._broker_check())
        return {
            "partitions": Check(True, self.consumer.assignment())
            if self.consumer
            else Check(False, "starting: waiting for Triton"),
            "broker": broker,
            "guard": guard,
            "breaker": Check(False, "open: consumption paused")
            if self.breaker and self.breaker.is_open
            else Check(True, "closed"),
            "known_content": Check(False, "; ".join(self.known_problems))
            if self.known_problems
            else Check(True, "banks loaded"),
        }

    async def _guard_check(self) -> Check:
        problem = await self._guard.not_ready(self._timeout_s)
        return Check(problem is None, problem or f"model {self._guard.model!r} ready")

    async def _broker_check(self) -> Check:
        if self.consumer is None or not self.consumer.connected:
            return Check(False, "not connected")
        try:
            # A metadata request: answered only by a reachable broker.
            topics = await self.consumer.consumer.topics()
        except KafkaError as exc:
            return Check(False, f"unreachable: {exc!r}")
        return Check(True, f"reachable ({len(topics)} topics visible)")


# guardstream_consumer_info's labels: what the alerts name (the group, the topic).
_DESCRIBED = ("group_id", "input_topic", "verdict_topic", "dead_letter_topic", "delivery")


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    tracer: Tracer | None = None,
    metrics: Metrics | None = None,
    shadow_settings: ShadowSettings | None = None,
) -> None:
    """Run the consumer until `stop` is set; the start-up order fails fast on bad config.
    `shadow_settings`: GUARDSTREAM_SHADOW_* unless given."""
    tracer = tracer or get_tracer()
    metrics = metrics or Metrics()
    metrics.info.info({name: str(getattr(settings, name)) for name in _DESCRIBED})
    shadow_settings = shadow_settings or ShadowSettings()
    rules = RulesSource(  # InvalidRules for a bad file: refuse to start
        RulesFiles.from_settings(settings), metrics, interval_s=settings.reload_interval_s
    )
    use_pixel_limit(settings.max_image_pixels)
    guard = guard_from(settings)
    readiness = Readiness(guard, settings.health_check_timeout_s)
    health = HealthServer(
        settings.health_host,
        settings.health_port,
        readiness,
        metrics,
        check_timeout_s=settings.health_check_timeout_s,
    )
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    fetcher = fetcher_from(settings)
    known = KnownSources(settings, metrics)  # a bad banks file: refuse to start
    readiness.known_problems = known.problems
    await health.start()  # first, so /livez answers and /readyz says why while Triton starts
    rules.start_watching()  # from now on SIGHUP reloads the rules instead of ending the process
    try:
        log.info("waiting for Triton at %s, model %r", settings.triton_url, settings.guard_model)
        await guard.wait_ready(settings.guard_startup_timeout_s)
        log.info("Triton model %r is ready; traces go to %s", guard.model, describe_exporter())

        await known.start()
        breaker = breaker_from(settings, guard, metrics)
        pipeline = pipeline_from(
            settings,
            rules=rules.current,
            guard=guard,
            breaker=breaker,
            decode_pool=decode_pool,
            metrics=metrics,
            tracer=tracer,
            fetcher=fetcher,
            known=known.known,
            model=await guard.identity(),
        )
        shadow = None
        if shadow_settings.enabled:
            shadow = shadow_from(shadow_settings, settings, rules.current, metrics, tracer, fetcher)
            await shadow.start()
            log.info("shadow mode: %s", shadow_settings.describe(settings))
        kafka = consumer_from(settings)
        delivery = delivery_from(settings, kafka, producer_factory(settings), metrics, tracer)
        consumer = ModerationConsumer(
            settings, kafka, delivery, pipeline, breaker, metrics, tracer, shadow
        )
        readiness.consumer, readiness.breaker = consumer, breaker
        try:
            await consumer.run(stop)
        finally:
            await breaker.close()
            if shadow is not None:
                await shadow.stop(min(shadow_settings.timeout_s, settings.drain_timeout_s))
    finally:
        await rules.stop_watching()
        await known.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)
        if fetcher is not None:
            await fetcher.close()
        await guard.close()
        await health.stop()
