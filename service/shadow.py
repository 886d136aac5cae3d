"""Shadow mode: a candidate guard or policy judges live events beside the live one.

The candidate's verdicts go to a shadow topic, each naming the live verdict it stands beside and
how it agrees (`service.core.verdicts.agreement`); metrics count agreement by direction and
category. The shadow never changes, delays or blocks the live path: `offer` returns at once,
the live verdict and its offset commit never wait for it, shadow work runs in its own bounded
set of tasks with its own decode thread and its own breaker, and when the candidate is slow or
down the work beyond `max_in_flight` or `timeout_s` is dropped and counted, never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiokafka.errors import KafkaError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.adapters.kafka.clients import KafkaProducer
from service.adapters.triton import GuardClient
from service.config import ENV_PREFIX, Settings
from service.core.breaker import Breaker
from service.core.decisions import sample_point
from service.core.pipeline import Outcome, Pipeline, Record
from service.core.verdicts import Verdict, serialize, shadow_of
from service.ops.metrics import Metrics
from service.ops.tracing import inject

log = logging.getLogger(__name__)
SHADOW_PREFIX = f"{ENV_PREFIX}SHADOW_"


class ShadowSettings(BaseSettings):
    """GUARDSTREAM_SHADOW_*: shadow mode is on when a candidate model or policy is named."""

    model_config = SettingsConfigDict(env_prefix=SHADOW_PREFIX, frozen=True, extra="ignore")

    model: str = Field(
        "", description="Triton model of the candidate guard; empty: the live guard model."
    )
    model_version: str = Field("", description="Its version; empty: the latest Triton serves.")
    triton_url: str = Field(
        "", description="Triton gRPC address of the candidate; empty: the live one."
    )
    policy: str = Field(
        "", description="Candidate policy every event is judged under; empty: the event's own."
    )
    sample: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of events shadowed, chosen by event id (the same events on "
        "every pod and every restart).",
    )
    topic: str = Field("verdicts.shadow", description="Topic of the candidate's verdicts.")
    max_in_flight: int = Field(
        16,
        ge=1,
        description="Shadow judgements at a time; an event offered beyond this is dropped and "
        "counted (guardstream_shadow_skipped_total{reason=busy}). What the candidate may add "
        "to the live load, in GPU and decode work.",
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="A shadow judgement that takes longer is dropped and counted "
        "(reason=timeout): a slow candidate costs at most this per event.",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.model or self.policy)

    def candidate(self, live: Settings) -> Settings:
        """The live settings with the candidate's guard in place."""
        return live.model_copy(
            update={
                "guard_model": self.model or live.guard_model,
                "guard_model_version": self.model_version or live.guard_model_version,
                "triton_url": self.triton_url or live.triton_url,
            }
        )

    def describe(self, live: Settings) -> str:
        candidate = self.candidate(live)
        return (
            f"model {candidate.guard_model!r} at {candidate.triton_url}, policy "
            f"{self.policy or 'of each event'}, {self.sample:.0%} of events, to {self.topic}"
        )


class Shadow:
    """Judges offered events with the candidate and publishes its verdicts; never waited on."""

    def __init__(
        self,
        config: ShadowSettings,
        pipeline: Pipeline,
        producer: KafkaProducer,
        metrics: Metrics,
        parts: CandidateParts,
    ) -> None:
        self._config = config
        self._pipeline = pipeline
        self._producer = producer
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._parts = parts

    async def start(self) -> None:
        await self._producer.start()

    def offer(self, record: Record, live: Outcome) -> None:
        """Shadow `record` if it is sampled and there is room; returns at once."""
        if not isinstance(live, Verdict):  # nothing to compare a candidate's answer with
            return
        if sample_point(f"shadow:{live.event_id}") >= self._config.sample:
            return
        if len(self._tasks) >= self._config.max_in_flight:
            self._metrics.shadow_skipped.labels("busy").inc()
            return
        task = asyncio.create_task(self._judge(record, live), name=f"shadow {record.where}")
        self._tasks.add(task)
        self._metrics.shadow_in_flight.set(len(self._tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._metrics.shadow_in_flight.set(len(self._tasks))

    async def _judge(self, record: Record, live: Verdict) -> None:
        try:
            async with asyncio.timeout(self._config.timeout_s):
                outcome = await self._pipeline.judge(record)
                if not isinstance(outcome, Verdict):
                    self._metrics.shadow_skipped.labels("dead_letter").inc()
                    return
                verdict = shadow_of(live, outcome)
                sent = await self._producer.send(
                    self._config.topic,
                    serialize(verdict),
                    record.key,
                    headers=[*inject(), ("event-id", live.event_id.encode())],
                )
                await sent
        except TimeoutError:
            self._metrics.shadow_skipped.labels("timeout").inc()
            return
        except KafkaError as exc:
            log.warning("shadow verdict for %s not published: %r", record.where, exc)
            self._metrics.shadow_skipped.labels("publish_failed").inc()
            return
        assert verdict.shadow is not None
        self._metrics.shadow_verdicts.labels(
            verdict.shadow.agreement, live.category_code, verdict.category_code
        ).inc()

    async def stop(self, budget_s: float) -> None:
        """Let shadow work finish within `budget_s`, drop the rest, close the candidate."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=budget_s)
            for task in late:
                task.cancel()
            self._metrics.shadow_skipped.labels("shutdown").inc(len(late))
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(KafkaError):
            await self._producer.stop()
        await self._parts.breaker.close()
        self._parts.decode_pool.shutdown(wait=False, cancel_futures=True)
        await self._parts.guard.close()


@dataclass(frozen=True)
class CandidateParts:
    """What the candidate has of its own, so that it cannot slow or trip the live path."""

    guard: GuardClient
    breaker: Breaker
    decode_pool: ThreadPoolExecutor


async def guard_ready(guard: GuardClient, timeout_s: float) -> bool:
    return await guard.not_ready(timeout_s) is None
