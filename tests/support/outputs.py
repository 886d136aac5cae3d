"""Reading what the service published and committed, as a downstream consumer would."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

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
    if topic == topics.dead_letters:
        return f"dead:{value['error']['code']}"
    return f"{value['rating']}/{value['category_code']}"
