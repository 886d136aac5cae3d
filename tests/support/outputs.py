"""Reading what the service published and committed, as a downstream consumer would."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.dev import samples
from tests.support.stack import Topics


async def collect(
    bootstrap: str, topics: Topics, expected: int, timeout_s: float = 120
) -> dict[bytes, list[tuple[str, Any, dict[str, bytes]]]]:
    """Read both output topics until `expected` outcomes arrived, then a little longer."""
    reader = AIOKafkaConsumer(
        topics.verdicts,
        topics.dead_letters,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        group_id=None,
    )
    await reader.start()
    outcomes: dict[bytes, list[tuple[str, Any, dict[str, bytes]]]] = {}
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settle: float | None = None
        while loop.time() < deadline and (settle is None or loop.time() < settle):
            for batch in (await reader.getmany(timeout_ms=300)).values():
                for m in batch:
                    outcomes.setdefault(m.key, []).append(
                        (m.topic, orjson.loads(m.value), dict(m.headers))
                    )
            if settle is None and sum(map(len, outcomes.values())) >= expected:
                settle = loop.time() + 1.0  # catch duplicates that would follow
    finally:
        await reader.stop()
    return outcomes


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, Any]]:
    """Every committed record of `topic` now, in partition order: (key, parsed value)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", group_id=None
    )
    await reader.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]  # as Topics.create makes them
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        records: list[tuple[bytes | None, Any]] = []
        loop = asyncio.get_running_loop()
        deadline, quiet = loop.time() + 30, 0
        # Until every partition is read to its end, or three polls in a row bring nothing: the
        # last offset may be a transaction marker, which a position never passes.
        while loop.time() < deadline and quiet < 3:
            batches = await reader.getmany(timeout_ms=300)
            records += [(m.key, orjson.loads(m.value)) for b in batches.values() for m in b]
            quiet = 0 if batches else quiet + 1
            if all([await reader.position(tp) >= ends[tp] for tp in partitions]):
                break
        return records
    finally:
        await reader.stop()


async def committed_offsets(
    bootstrap: str, topics: Topics
) -> tuple[dict[int, int | None], dict[int, int]]:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=topics.group)
    await probe.start()
    try:
        partitions = [TopicPartition(topics.input, p) for p in range(3)]
        ends = await probe.end_offsets(partitions)
        committed = {tp.partition: await probe.committed(tp) for tp in partitions}
        return committed, {tp.partition: end for tp, end in ends.items()}
    finally:
        await probe.stop()


def outcome_label(topic: str, value: dict[str, Any], topics: Topics) -> str:
    label = samples.outcome_label(value)
    assert label.startswith("dead:") == (topic == topics.dead_letters), (topic, label)
    return label
