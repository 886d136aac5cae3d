"""`python -m service dlq list|show|redrive`: the dead-letter topic, for on-call engineers.

- `list`: the topic (or a range of it, `--since/--until`) counted by code and by hour of
  failure, with examples and how many were already redriven (from the ledger).
- `show EVENT_ID | P:OFFSET`: one event's dead letters (every one, newest last) or one record,
  in full, with the original record decoded and its redrives.
- `redrive`: `service.dlq_redrive`.

Every command reads the dead-letter topic without a consumer group, to the end it has when the
command starts (`service.adapters.kafka.ranges.bounded_read`), and the ledger topic
(`<dlq>.redriven`, or `--ledger-topic`) whole when it exists; `list` and `show` create nothing.
A bad range is one line on stderr and exit 2; a broker that cannot be reached, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator

from aiokafka.errors import KafkaError

from service.adapters.kafka import table
from service.adapters.kafka.ranges import Bounded, bounded_read
from service.adapters.kafka.redrive import read_ledger
from service.config import Settings
from service.core.dead_letters import (
    Ledger,
    Letter,
    Selection,
    SelectionError,
    check_codes,
    letter_from,
)
from service.core.dlq_report import Listing, show_lines
from service.core.replay_range import (
    ReplayRangeError,
    Span,
    TimeRange,
    range_request,
    range_words,
)
from service.core.verdicts import Source
from service.interrupts import run_until_signalled

_PLACE = re.compile(r"(\d+):(\d+)")


def topics_of(settings: Settings, args: argparse.Namespace) -> tuple[str, str]:
    """The dead-letter topic and its ledger topic, as the arguments name them."""
    dlq: str = args.topic or settings.dead_letter_topic
    return dlq, args.ledger_topic or f"{dlq}.redriven"


async def letters(bounded: Bounded, wanted: bytes | None = None) -> AsyncIterator[Letter]:
    """The range's records as letters; with `wanted`, only records whose key is it or whose
    value holds it (an event id), the others not even parsed."""
    async for message in bounded.records:
        if wanted is not None and message.key != wanted and wanted not in (message.value or b""):
            continue
        at = Source(topic=message.topic, partition=message.partition, offset=message.offset)
        yield letter_from(at, message.key, message.value, message.timestamp)


async def ledger_of(settings: Settings, topic: str) -> Ledger:
    """The ledger as it stands; empty when its topic does not exist yet."""
    return await read_ledger(settings, topic, settings.known_load_timeout_s) or Ledger()


async def list_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    dlq, ledger_topic = topics_of(settings, args)
    try:
        selection = Selection(codes=check_codes(args.code))
        request = range_request(args.since, args.until, args.offsets, whole_topic=True)
        if args.examples < 0:
            raise SelectionError("--examples must be 0 or more")
    except (SelectionError, ReplayRangeError) as exc:
        print(f"dlq list: {exc}", file=sys.stderr)
        return 2
    ledger = await ledger_of(settings, ledger_topic)
    listing = Listing(args.examples)
    async with bounded_read(settings, dlq, request) as bounded:
        async for letter in letters(bounded):
            if selection.matches(letter):
                listing.add(letter, ledger.redriven(letter) is not None)
    words = selection.describe(range_words(args.since, args.until, args.offsets))
    if args.json:
        print(json.dumps(listing.as_json(dlq, words), indent=2))
    else:
        print("\n".join(listing.lines(dlq, words)))
    return 0


async def show_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    dlq, ledger_topic = topics_of(settings, args)
    place = _PLACE.fullmatch(args.target.strip())
    if place is not None:
        partition, offset = int(place.group(1)), int(place.group(2))
        request: TimeRange | list[Span] = [Span(partition, offset, offset + 1)]
        wanted, what = None, f"at {dlq}:{partition}:{offset}"
    else:
        request = range_request(None, None, [], whole_topic=True)
        wanted, what = args.target.encode(), f"for event {args.target!r} in {dlq}"
    ledger = await ledger_of(settings, ledger_topic)
    found: list[Letter] = []
    try:
        async with bounded_read(settings, dlq, request) as bounded:
            async for letter in letters(bounded, wanted):
                if wanted is None or letter.event_id == args.target:
                    found.append(letter)
    except ReplayRangeError as exc:  # no such topic, or a place outside it
        print(f"dlq show: no dead letter {what}: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"dlq show: no dead letter {what}", file=sys.stderr)
        return 1
    found.sort(key=lambda letter: (letter.timestamp_ms, letter.at.partition, letter.at.offset))
    if len(found) > 1:
        print(f"{len(found)} dead letters {what}, newest last\n")
    print("\n\n".join("\n".join(show_lines(f, ledger.redrives(f.at))) for f in found))
    return 0


def command(settings: Settings, args: argparse.Namespace) -> int:
    # The table reader logs each load for the service's log; here it would only interleave
    # with the command's own output (which says what the ledger held, where it matters).
    logging.getLogger(table.__name__).setLevel(logging.WARNING)
    if args.dlq_action == "redrive":
        from service.dlq_redrive import redrive

        return run_until_signalled(lambda stop: redrive(settings, args, stop))
    run = list_dead_letters if args.dlq_action == "list" else show_dead_letters
    try:
        return asyncio.run(run(settings, args))
    except ReplayRangeError as exc:  # the dead-letter topic does not exist, offsets outside
        print(f"dlq {args.dlq_action}: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:  # the broker cannot be reached: one line, not a traceback
        print(f"dlq {args.dlq_action}: Kafka: {exc!r}", file=sys.stderr)
        return 1
