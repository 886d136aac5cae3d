"""The banks topic from the command line: `python -m service banks add|remove|import|list`.

Every pod reads the banks topic whole and follows it (`service.adapters.kafka.table`), so an
entry published here reaches every pod within a poll, and a removal (a tombstone: the key with
no value) too. The topic is compacted: a key's newest record is the entry. Records are published
with acks=all; the topic is created (cleanup.policy=compact) when it does not exist yet,
one partition, min(3, brokers) replicas. The key and value are `service.core.banks`' contract:

    add      one entry: key <bank>/<kind>/<value>, value {entry_id, note, added_by, added_at}
    remove   a tombstone for that key
    import   every valid row of an entry file (`service.core.bank_files` formats); bad rows are
             logged with file:line and counted, nothing is published for them
    list     the topic read whole: with GUARDSTREAM_BANKS_FILE, the entries the service would
             take (records it would refuse are logged); without, every key as it stands
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from service.adapters.kafka.table import TableReader, ensure_table_topic
from service.config import Settings
from service.core.bank_files import load_banks, read_entries, read_specs
from service.core.banks import BANK_NAME, BankEntry, Banks, EntryRecord, HashKind, entry_key

Record = tuple[bytes, bytes | None]


class BanksCommandFailed(ValueError):
    """What the command was asked cannot be done; the message says why, in one line."""


@dataclass(frozen=True)
class Listing:
    lines: list[str]
    records: int
    rejected: int


def entry_record(entry: BankEntry, added_by: str | None) -> Record:
    """An entry as the banks-topic record that adds it, stamped now."""
    value = EntryRecord(
        entry_id=entry.entry_id, note=entry.note, added_by=added_by, added_at=datetime.now(UTC)
    )
    return entry_key(entry.bank, entry.kind, entry.value), value.model_dump_json().encode()


def new_entry(
    settings: Settings,
    bank: str,
    kind: HashKind,
    value: str,
    entry_id: str | None,
    note: str | None,
) -> BankEntry:
    """A checked entry from command-line text; BanksCommandFailed when it cannot be one."""
    check_bank(settings, bank)
    try:
        return BankEntry(
            bank,
            kind,
            value.strip().lower(),
            entry_id or f"cli-{uuid.uuid4().hex[:12]}",
            note,
        )
    except ValueError as exc:
        raise BanksCommandFailed(str(exc)) from None


def check_bank(settings: Settings, bank: str) -> None:
    """A bank name the service will take: one of the banks file's when there is one."""
    if not BANK_NAME.fullmatch(bank):
        raise BanksCommandFailed(f"bank name {bank!r} must match {BANK_NAME.pattern}")
    if settings.banks_file is not None:
        try:
            names = read_specs(settings.banks_file)  # the names only: not the entry files
        except ValueError as exc:
            raise BanksCommandFailed(str(exc)) from None
        if bank not in names:
            raise BanksCommandFailed(
                f"{settings.banks_file} names no bank {bank!r} (it names: {', '.join(names)}); "
                "the service would skip its entries"
            )


def tombstone(bank: str, kind: HashKind, value: str) -> Record:
    return entry_key(bank, kind, value), None


def import_records(
    settings: Settings, bank: str, path: Path, file_format: str, added_by: str | None
) -> tuple[list[Record], str]:
    """The records adding every valid row of an entry file, and the summary to print."""
    check_bank(settings, bank)
    try:
        read = read_entries(path, bank, file_format)
    except ValueError as exc:
        raise BanksCommandFailed(str(exc)) from None
    if read.rows and not read.entries:
        raise BanksCommandFailed(f"{path}: {read.rows} rows, none valid; nothing published")
    records = [entry_record(entry, added_by) for entry in read.entries]
    summary = (
        f"{path}: {len(records)} entries published to bank {bank} "
        f"({read.rows} rows, {read.rejected} refused)"
    )
    return records, summary


async def publish(settings: Settings, records: Iterable[Record]) -> int:
    """Send records to the banks topic (created if missing), each acknowledged by every replica."""
    topic = _topic(settings)
    await ensure_table_topic(settings, topic)
    producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all")
    try:
        await producer.start()
        sent = [await producer.send(topic, value, key=key) for key, value in records]
        for delivery in sent:
            await delivery
    finally:
        await producer.stop()
    return len(sent)


async def list_entries(settings: Settings, bank: str | None, timeout_s: float) -> Listing:
    """The banks topic as it stands: entries (with a banks file) or raw keys (without)."""
    banks = None if settings.banks_file is None else _banks_from_file(settings.banks_file)
    standing: dict[bytes, bytes] = {}

    def apply(key: bytes, value: bytes | None, where: str) -> bool:
        if banks is not None and not banks.apply(key, value, where):
            return False
        if value is None:
            standing.pop(key, None)
        else:
            standing[key] = value
        return True

    reader = TableReader(settings, _topic(settings), apply)
    try:
        await reader.load(timeout_s)
    except LookupError as exc:
        raise BanksCommandFailed(str(exc)) from None
    finally:
        await reader.stop()
    lines = [
        _listed(key, value)
        for key, value in sorted(standing.items())
        if bank is None or key.startswith(f"{bank}/".encode())
    ]
    if banks is not None:
        counts = banks.counts()
        lines += [f"bank {name}: {counts[name]} entries from file and topic" for name in counts]
    return Listing(lines, reader.records, reader.rejected)


def _listed(key: bytes, value: bytes) -> str:
    try:
        record = EntryRecord.model_validate_json(value)
    except ValueError:
        return f"{key.decode(errors='replace')}  (not an entry: {value[:80]!r})"
    shown = [record.entry_id, record.note or "", record.added_by or "", str(record.added_at or "")]
    return "  ".join([key.decode(), *shown]).rstrip()


def _banks_from_file(path: Path) -> Banks:
    try:
        banks, _ = load_banks(path)
    except ValueError as exc:
        raise BanksCommandFailed(str(exc)) from None
    return banks


def _topic(settings: Settings) -> str:
    if not settings.banks_topic:
        raise BanksCommandFailed("GUARDSTREAM_BANKS_TOPIC is empty: there is no banks topic")
    return settings.banks_topic


def command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.banks_action == "list":
            listing = asyncio.run(list_entries(settings, args.bank, settings.known_load_timeout_s))
            print("\n".join(listing.lines))
            print(f"{listing.records} records read, {listing.rejected} not usable")
            return 0
        if args.banks_action == "import":
            records, summary = import_records(settings, args.bank, args.file, args.format, args.by)
        elif args.banks_action == "add":
            entry = new_entry(settings, args.bank, args.kind, args.value, args.id, args.note)
            records, summary = [entry_record(entry, args.by)], f"added {entry.entry_id}"
        else:
            check_bank(settings, args.bank)
            records = [tombstone(args.bank, args.kind, args.value.strip().lower())]
            summary = f"removed {args.bank}/{args.kind}/{args.value}"
        asyncio.run(publish(settings, records))
    except (BanksCommandFailed, KafkaError, TimeoutError) as exc:
        # KafkaError: the broker cannot be reached or refuses; one line, not a traceback.
        print(f"banks: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(summary)
    return 0
