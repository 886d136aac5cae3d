"""`python -m service dlq redrive`: publish the original records of chosen dead letters again.

1. The selection (`--code`, `--event-id`, `--since/--until` or `--offsets`, or `--all`) and the
   options are checked before anything is read: a bad one is one line on stderr, exit 2.
2. The dead-letter topic's range is resolved, its end fixed now (a redriven record that fails
   again lands beyond it). Then the ledger topic (`<dlq>.redriven`) is read whole; when it does
   not exist it is created, compacted (not in a dry run), and the command says so.
3. The range is read; each dead letter the selection takes is planned
   (`service.core.dead_letters.Planner`): restored, or refused with a reason, or skipped as
   already redriven (unless `--again`).
4. Each restored record is published, at most `--rate` a second, acknowledged by all replicas;
   only then is its ledger entry written (acknowledged the same way). A crash between the two
   leaves the record published and unrecorded, so a later redrive publishes it again: at least
   once, never silently lost.
5. One line per dead letter (redriven, refused or skipped, with why), then the summary.

Ctrl-C (or SIGTERM) stops taking dead letters, lets the one in flight be acknowledged and
recorded, prints the summary and exits 130; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Protocol

from aiokafka.errors import KafkaError
from tqdm import tqdm

from service.adapters.kafka.ranges import bounded_read
from service.adapters.kafka.redrive import RedriveProducer, read_ledger
from service.adapters.kafka.table import ensure_table_topic
from service.config import Settings
from service.core.dead_letters import (
    Ledger,
    Letter,
    Planner,
    Refusal,
    Restored,
    Selection,
    SelectionError,
    coordinates,
    ledger_record,
    selection_from,
)
from service.core.dlq_report import Tally
from service.core.pacing import Pacer
from service.core.replay_range import (
    ReplayRangeError,
    Span,
    TimeRange,
    range_request,
    range_words,
)
from service.core.verdicts import Source
from service.dlq import letters, topics_of
from service.replay_run import new_run_id


class Sink(Protocol):
    """Where restored records and their ledger entries go (`RedriveProducer`, or a fake)."""

    async def publish(self, restored: Restored) -> Source: ...

    async def record(self, key: bytes, value: bytes) -> None: ...


class RedriveFailed(Exception):
    """The broker did not take a record or its ledger entry; the message says what is known."""


class Redriver:
    """Takes the range's dead letters one by one: plans each, and publishes and records those
    restored (or, in a dry run, says it would), paced, until the range ends or `stop` is set."""

    def __init__(
        self,
        planner: Planner,
        selection: Selection,
        sink: Sink | None,
        pacer: Pacer,
        stop: asyncio.Event,
        run_id: str,
        say: Callable[[str], None],
        tally: Tally,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.tally = tally
        self._planner = planner
        self._selection = selection
        self._sink = sink
        self._pacer = pacer
        self._stop = stop
        self._run_id = run_id
        self._say = say
        self._now = now

    async def all(self, letters: AsyncIterator[Letter], read: Callable[[], object]) -> bool:
        """Every letter, each counted by `read()`; True when stopped before the end."""
        async for letter in letters:
            read()
            self.tally.read += 1
            if not self._selection.matches(letter):
                continue
            if self._stop.is_set():
                return True
            self.tally.selected += 1
            if not await self._one(letter):
                return True
        return False

    async def _one(self, letter: Letter) -> bool:
        """Plan one dead letter and do it; False when stopped before publishing it."""
        planned = self._planner.plan(letter, self._now())
        if isinstance(planned, Refusal):
            self._say(self.tally.refused(planned))
            return True
        if self._sink is None:
            self._say(self.tally.would(planned))
            return True
        await self._pacer.wait_unless(self._stop)
        if self._stop.is_set():
            return False  # not published: a later run redrives it
        where = coordinates(planned.letter.at)
        try:
            to = await self._sink.publish(planned)
        except KafkaError as exc:
            raise RedriveFailed(
                f"{where}: publishing to {planned.topic} failed ({exc!r}); it may or may not "
                "have been written, and is not in the ledger"
            ) from exc
        key, value = ledger_record(planned, to, self._run_id, self._now())
        try:
            await self._sink.record(key, value)
        except KafkaError as exc:
            raise RedriveFailed(
                f"{where}: published at {coordinates(to)} but its ledger "
                f"entry failed ({exc!r}): a later redrive would publish it again"
            ) from exc
        self._say(self.tally.done(planned, to))
        return True


def _checked(
    settings: Settings, args: argparse.Namespace
) -> tuple[Selection, TimeRange | list[Span]]:
    """The selection and range the arguments name; SelectionError or ReplayRangeError."""
    dlq, ledger_topic = topics_of(settings, args)
    if args.rate < 0:
        raise SelectionError("--rate must be 0 (no limit) or more")
    if args.to in (dlq, ledger_topic):
        raise SelectionError(f"--to {args.to}: that is the dead-letter or the ledger topic")
    ranged = args.since is not None or args.until is not None or bool(args.offsets)
    selection = selection_from(args.code, args.event_id, everything=args.all, ranged=ranged)
    return selection, range_request(args.since, args.until, args.offsets, whole_topic=True)


async def _ledger(settings: Settings, topic: str, *, dry_run: bool) -> Ledger:
    """The ledger as it stands; its topic created (compacted) when missing, unless dry run."""
    ledger = await read_ledger(settings, topic, settings.known_load_timeout_s)
    if ledger is not None:
        return ledger
    if dry_run:
        print(f"ledger topic {topic} does not exist yet: nothing was redriven before")
    elif await ensure_table_topic(settings, topic):
        print(f"created the ledger topic {topic} (compacted, 1 partition)")
    return Ledger()


async def redrive(settings: Settings, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The whole command, until `stop` is set; its exit code."""
    try:
        selection, request = _checked(settings, args)
    except (SelectionError, ReplayRangeError) as exc:
        print(f"dlq redrive: {exc}", file=sys.stderr)
        return 2
    dlq, ledger_topic = topics_of(settings, args)
    run_id = new_run_id()
    tally = Tally(dry_run=args.dry_run)
    sink = None if args.dry_run else RedriveProducer(settings, ledger_topic)
    try:
        if sink is not None:
            await sink.start()
        # The range first (a topic that does not exist is refused before a ledger is made for
        # it), then the ledger whole, then the dead letters one by one.
        async with bounded_read(settings, dlq, request) as bounded:
            ledger = await _ledger(settings, ledger_topic, dry_run=args.dry_run)
            planner = Planner(ledger, bounded.topics, run_id, to=args.to, again=args.again)
            bar = tqdm(
                total=bounded.total,
                unit="record",
                file=sys.stderr,
                disable=args.no_progress,
                desc="redrive",
            )
            redriver = Redriver(
                planner,
                selection,
                sink,
                Pacer(args.rate or None),
                stop,
                run_id,
                lambda line: tqdm.write(line, file=sys.stdout),
                tally,
            )
            with bar:
                interrupted = await redriver.all(letters(bounded), bar.update)
    except ReplayRangeError as exc:  # the dead-letter topic does not exist, offsets outside it
        print(f"dlq redrive: {exc}", file=sys.stderr)
        return 2
    except RedriveFailed as exc:
        print(f"run {run_id}: {tally.summary()}")
        print(f"dlq redrive: stopped: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:  # the broker cannot be reached: one line, not a traceback
        print(f"dlq redrive: Kafka: {exc!r}", file=sys.stderr)
        return 1
    finally:
        if sink is not None:
            await sink.stop()
    if not tally.selected and not interrupted:
        print(selection.nothing_to_redrive(dlq, range_words(args.since, args.until, args.offsets)))
        return 1
    print(f"run {run_id}: {tally.summary()}" + ("; interrupted" if interrupted else ""))
    return tally.exit_code(interrupted=interrupted)
