"""`python -m service replay`: judge a range of the input topic again, under a chosen policy or
model, and report what changed against the verdicts originally published.

1. The range is resolved and checked (`service.adapters.kafka.ranges`), and the rules loaded,
   before anything is judged: a bad range or policy is one line on stderr, exit 2.
2. The original verdicts of the range are read from the verdict topic (the latest per input
   record), so each replay verdict names the verdict it supersedes.
3. Each record goes through the service's own pipeline (`service.app.pipeline_from`), without
   known content (no banks, decisions or reuse: a replay measures the guard and the policy),
   at most `--rate` a second and `--concurrency` at a time, so live consumers keep the guard.
4. Each outcome is published with the service's own delivery (`AtLeastOnce`: retried until
   acknowledged), marked as a replay, to `--topic` or `<topic>.dlq`; then its row is appended
   to OUT/outcomes.jsonl and OUT/state.json advanced past the partition's finished prefix.
5. At the end (also of an already finished run), the diff report (`service.replay_report`).

Ctrl-C stops taking records, lets those in flight finish (bounded) and saves the state: the
same `--run-id` resumes. A crash between an acknowledgement and the saved state judges that
record again (at least once); the diff keeps its last row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from typing import Never, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import context
from tqdm import tqdm

from service.adapters.kafka.clients import producer_factory
from service.adapters.kafka.consumer import record_from
from service.adapters.kafka.delivery import AtLeastOnce, Outgoing, PublishFailed
from service.adapters.kafka.ranges import (
    Message,
    first_timestamp,
    plain_consumer,
    read_originals,
    read_range,
    resolve,
)
from service.adapters.rules_source import InvalidRules, RulesFiles
from service.app import batch_pipeline
from service.config import Settings
from service.core.errors import GuardstreamError
from service.core.pacing import Pacer
from service.core.pipeline import Outcome, Pipeline
from service.core.replay_diff import Original, Replayed, diff, superseding
from service.core.replay_range import ReplayRangeError, TimeRange, range_request
from service.core.rules import Rules
from service.core.verdicts import DeadLetter, serialize
from service.interrupts import run_until_signalled
from service.ops.metrics import Metrics
from service.ops.tracing import get_tracer
from service.replay_report import write_report
from service.replay_run import OUTCOMES, ReplayRefused, ReplayState, Run, default_out, new_run_id

REPLAY_HEADER = "guardstream-replay"
DEFAULT_TOPIC = "verdicts.replay"
DRAIN_S = 30.0
"""How long a stopped replay waits for the events in flight before it saves and exits."""


@dataclasses.dataclass(frozen=True)
class ReplayOutgoing(Outgoing):
    """An outcome as the service publishes it, plus the header that marks a replay."""

    run_id: str = ""

    def headers(self) -> list[tuple[str, bytes]]:
        return [*super().headers(), (REPLAY_HEADER, self.run_id.encode())]


def load_rules(settings: Settings, policy: str | None) -> Rules:
    """The rules in the files now; every event judged under `policy` when one is named."""
    rules = RulesFiles.from_settings(settings).load()
    return rules if policy is None else dataclasses.replace(rules, only_policy=policy)


async def prepare(settings: Settings, args: argparse.Namespace) -> Run:
    """The run `--run-id` names (resumed as it was started), or a new one over the range the
    arguments name; ReplayRangeError, InvalidRules or UnknownPolicy when it cannot be."""
    if args.rate < 0 or args.concurrency < 1:
        raise ReplayRefused("--rate must be 0 (no limit) or more, --concurrency at least 1")
    run_id = args.run_id or new_run_id()
    out = args.out or default_out(run_id)
    existing = Run.load(out)
    if existing is not None:
        if existing.state.run_id != run_id:
            raise ReplayRefused(
                f"{out} holds run {existing.state.run_id}: resume it with --run-id "
                f"{existing.state.run_id}, or give another --out"
            )
        load_rules(settings, existing.state.policy)  # the files may have changed since
        _note_ignored(args, existing.state)
        return existing
    if (out / OUTCOMES).exists():  # outcomes without a state: not a run to append to
        raise ReplayRefused(f"{out / OUTCOMES} exists without a state.json: give another --out")
    request = range_request(args.since, args.until, args.offsets)
    load_rules(settings, args.policy)
    consumer = plain_consumer(settings)
    await consumer.start()
    try:
        spans = await resolve(consumer, settings.input_topic, request)
        since_ms = (
            request.since_ms
            if isinstance(request, TimeRange)
            else await first_timestamp(consumer, settings.input_topic, spans)
        )
    finally:
        await consumer.stop()
    state = ReplayState(
        run_id=run_id,
        input_topic=settings.input_topic,
        topic=args.topic or DEFAULT_TOPIC,
        policy=args.policy,
        model=args.model,
        spans=spans,
        since_ms=since_ms,
        next={span.partition: span.first for span in spans},
    )
    run = Run(out, state)
    run.save()
    return run


def _note_ignored(args: argparse.Namespace, state: ReplayState) -> None:
    """Say which arguments a resumed run does not take: it goes on as it was started."""
    asked = {"--policy": args.policy, "--model": args.model, "--since": args.since}
    ignored = [name for name, value in asked.items() if value is not None]
    ignored += ["--offsets"] if args.offsets else []
    ignored += ["--topic"] if args.topic not in (None, state.topic) else []
    if ignored:
        print(
            f"replay: resuming run {state.run_id} as it was started; ignoring {', '.join(ignored)}",
            file=sys.stderr,
        )


def replay_settings(settings: Settings, state: ReplayState) -> Settings:
    """The service's settings for this run: its model, and plain at-least-once publishing
    (a replay commits no offsets, so there is nothing for a transaction to bind)."""
    update: dict[str, object] = {"delivery": "at-least-once", "input_topic": state.input_topic}
    if state.model is not None:
        update["guard_model"] = state.model
    return settings.model_copy(update=update)


async def execute(
    settings: Settings,
    run: Run,
    stop: asyncio.Event,
    *,
    rate: float | None,
    concurrency: int,
    progress: bool,
) -> bool:
    """Judge what remains of the run; True when the range is done, False when stopped."""
    settings = replay_settings(settings, run.state)
    rules = load_rules(settings, run.state.policy)
    consumer = plain_consumer(settings)
    async with batch_pipeline(settings, rules) as batch:
        originals = await read_originals(
            settings,
            settings.verdict_topic,
            settings.input_topic,
            run.state.remaining(),
            run.state.since_ms,
        )
        await consumer.start()
        try:
            metrics, tracer = Metrics(), get_tracer()  # a registry of its own: nothing scrapes it
            delivery = AtLeastOnce(settings, consumer, producer_factory(settings), metrics, tracer)
            await delivery.start()
            try:
                judge = _Judge(run, batch.pipeline, delivery, originals, concurrency)
                bar = tqdm(
                    total=run.state.total,
                    initial=run.state.done,
                    unit="event",
                    file=sys.stderr,
                    disable=not progress,
                    desc="replay",
                )
                with bar:
                    return await judge.all(consumer, Pacer(rate or None), stop, bar)
            finally:
                await delivery.stop()
        finally:
            await consumer.stop()


class _Judge:
    """Takes the range's records one by one, paced, and judges and publishes them concurrently."""

    def __init__(
        self,
        run: Run,
        pipeline: Pipeline,
        delivery: AtLeastOnce,
        originals: dict[tuple[int, int], Original],
        concurrency: int,
    ) -> None:
        self._run = run
        self._pipeline = pipeline
        self._delivery = delivery
        self._originals = originals
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed: list[BaseException] = []

    async def all(
        self, consumer: AIOKafkaConsumer, pacer: Pacer, stop: asyncio.Event, bar: tqdm[Never]
    ) -> bool:
        state = self._run.state
        positions = {s.partition: (s.first, s.end) for s in state.remaining()}
        stopped = False
        with (self._run.out / OUTCOMES).open("a") as outcomes:
            records = read_range(consumer, state.input_topic, positions)
            async with contextlib.aclosing(records):
                async for message in records:
                    await self._slots.acquire()
                    await pacer.wait_unless(stop)
                    stopped = stop.is_set() or bool(self._failed)
                    if stopped:
                        self._slots.release()
                        break
                    self._run.take(message.partition, message.offset)
                    task = asyncio.create_task(self._one(message, outcomes, bar))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            await self._drain(DRAIN_S if stopped else None)
        if self._failed:
            raise self._failed[0]
        if not stopped:
            # Past the range's last offsets too: markers and aborted records are never read.
            state.next = {span.partition: span.end for span in state.spans}
            state.finished = True
        self._run.save()
        return not stopped

    async def _one(self, message: Message, outcomes: TextIO, bar: tqdm[Never]) -> None:
        try:
            outcome = await self._pipeline.judge(record_from(message))
            original = self._originals.get((message.partition, message.offset))
            outcome = superseding(outcome, self._run.state.run_id, original)
            await self._delivery.hand_over(self._outgoing(message, outcome))
            self._run.finish(Replayed.of(outcome, original), outcomes)
            bar.update()
        except Exception as exc:  # PublishFailed, or a bug: stop taking records, keep the state
            self._failed.append(exc)
        finally:
            self._slots.release()

    def _outgoing(self, message: Message, outcome: Outcome) -> ReplayOutgoing:
        topic = self._run.state.topic
        return ReplayOutgoing(
            source=TopicPartition(message.topic, message.partition),
            offset=message.offset,
            topic=f"{topic}.dlq" if isinstance(outcome, DeadLetter) else topic,
            key=message.key,
            value=serialize(outcome),
            outcome=outcome,
            timestamp_ms=None,  # not an end-to-end latency: the event is old on purpose
            context=context.get_current(),
            run_id=self._run.state.run_id,
        )

    async def _drain(self, timeout_s: float | None) -> None:
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in late:  # their records stay unfinished: the next run judges them again
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


async def main(settings: Settings, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The whole command, until `stop` is set; its exit code."""
    try:
        run = await prepare(settings, args)
    except (ReplayRangeError, InvalidRules, GuardstreamError, ValueError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:  # the broker cannot be reached: one line, not a traceback
        print(f"replay: Kafka: {exc!r}", file=sys.stderr)
        return 1
    state = run.state
    if not run.resumed:
        print(f"replay run {state.run_id} (resume with --run-id {state.run_id})", flush=True)
    if not state.finished:
        try:
            finished = await execute(
                settings,
                run,
                stop,
                rate=args.rate,
                concurrency=args.concurrency,
                progress=not args.no_progress,
            )
        except (GuardstreamError, PublishFailed, KafkaError) as exc:
            print(f"replay: stopped, progress saved in {run.out}: {exc}", file=sys.stderr)
            return 1
        if not finished:
            print(f"replay: interrupted; resume with --run-id {state.run_id}", file=sys.stderr)
            return 130
    policy = state.policy or "each event's own policy"
    title = f"Replay {state.run_id}: {state.input_topic} under {policy}"
    print("\n".join(write_report(diff(run.rows()), run.out, title)))
    print(f"report: {run.out / 'diff.html'}, {run.out / 'diff.json'}")
    return 0


def command(settings: Settings, args: argparse.Namespace) -> int:
    return run_until_signalled(lambda stop: main(settings, args, stop))
