"""Reviewers' decisions as a table by (image, policy): newest wins, tombstones withdraw, bad
records are refused with their position and change nothing."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer

from service.adapters.kafka.table import TableReader
from service.config import Settings
from service.core.human_decisions import HumanDecisions
from service.core.reviews import ReviewDecision
from service.dev import stack
from tests.support.waiting import eventually

SHA = "a" * 64
OTHER = "b" * 64
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def decision(
    event_id: str, action: str = "block", *, sha: str = SHA, policy: str = "p", minutes: int = 0
) -> bytes:
    return (
        ReviewDecision(
            event_id=event_id,
            image_sha256=sha,
            policy_id=policy,
            policy_version="1.0.0+abc",
            model_action="review",
            sampled=False,
            action=action,  # type: ignore[arg-type]
            rating="Unsafe" if action == "block" else "Safe",
            category_code="O4" if action == "block" else "NA",
            reviewer="r-17",
            decided_at=T0 + timedelta(minutes=minutes),
        )
        .model_dump_json()
        .encode()
    )


def test_a_decision_applies_to_its_image_under_its_policy_only() -> None:
    table = HumanDecisions()
    assert table.apply(b"e1", decision("e1"), "d[0]@0")
    found = table.decision_for(SHA, "p")
    assert found is not None
    assert (found.event_id, found.action) == ("e1", "block")
    assert table.decision_for(SHA, "other-policy") is None
    assert table.decision_for(OTHER, "p") is None


def test_the_newest_decision_about_an_image_stands_and_a_withdrawal_restores_the_older() -> None:
    table = HumanDecisions()
    table.apply(b"e1", decision("e1", "block", minutes=0), "d[0]@0")
    table.apply(b"e2", decision("e2", "allow", minutes=5), "d[1]@0")
    assert table.decision_for(SHA, "p").action == "allow"  # type: ignore[union-attr]
    assert table.apply(b"e2", None, "d[1]@1")  # withdrawn
    assert table.decision_for(SHA, "p").action == "block"  # type: ignore[union-attr]
    table.apply(b"e1", None, "d[0]@1")
    assert table.decision_for(SHA, "p") is None
    assert len(table) == 0


def test_a_new_decision_for_a_key_replaces_its_old_one_even_about_another_image() -> None:
    table = HumanDecisions()
    table.apply(b"e1", decision("e1", sha=SHA), "d[0]@0")
    table.apply(b"e1", decision("e1", sha=OTHER), "d[0]@1")
    assert table.decision_for(SHA, "p") is None
    assert table.decision_for(OTHER, "p") is not None
    assert len(table) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"{", "invalid review decision"),
        (b'{"schema_version": 1}', "event_id: Field required"),
        (decision("e9").replace(b'"block"', b'"shrug"'), "action"),
    ],
)
def test_a_record_that_is_not_a_decision_is_refused_with_its_position(
    value: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = HumanDecisions()
    table.apply(b"e1", decision("e1"), "d[0]@0")
    with caplog.at_level(logging.WARNING):
        assert not table.apply(b"e9", value, "verdicts.decisions[2]@41")
    assert "verdicts.decisions[2]@41" in caplog.text
    assert message in caplog.text
    assert len(table) == 1


async def test_the_decisions_topic_is_read_whole_then_followed(
    embedded_stack: stack.StackState,
) -> None:
    topic = f"decisions-{uuid.uuid4().hex[:8]}"
    bootstrap = embedded_stack.bootstrap_servers
    await stack.create_topics(bootstrap, [topic], 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, decision("e1", minutes=0), key=b"e1")
        await producer.send_and_wait(topic, b"not json", key=b"bad")
        await producer.send_and_wait(topic, decision("e2", "allow", minutes=5), key=b"e2")
        table = HumanDecisions()
        reader = TableReader(Settings(bootstrap_servers=bootstrap), topic, table.apply)
        await reader.load(timeout_s=30)
        try:
            assert (reader.records, reader.rejected, len(table)) == (3, 1, 2)
            assert table.decision_for(SHA, "p").action == "allow"  # type: ignore[union-attr]
            reader.follow()
            await producer.send_and_wait(topic, None, key=b"e2")  # withdrawn
            await eventually(
                lambda: table.decision_for(SHA, "p").action == "block",  # type: ignore[union-attr]
                timeout_s=10,
            )
        finally:
            await reader.stop()
    finally:
        await producer.stop()
