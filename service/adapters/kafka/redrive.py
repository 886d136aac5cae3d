"""A redrive's Kafka side: the ledger read whole, records published again, each then recorded.

- `read_ledger`: the ledger topic (`<dlq>.redriven`, compacted, read as a table by
  `service.adapters.kafka.table`) read to the end it has now; None when it does not exist yet
  (`ensure_table_topic` creates it).
- `RedriveProducer.publish`: one restored record, sent with acks=all (idempotent unless
  GUARDSTREAM_ENABLE_IDEMPOTENCE=false, as for Tansu), returning where the broker put it once
  every in-sync replica has it. `record`: the ledger entry, sent and acknowledged the same way.
  The caller records only after `publish` returned, so a crash between the two leaves a
  published record unrecorded: a later redrive publishes it again (at least once).

What the records are is `service.core.dead_letters`' business; this module only moves bytes.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from service.adapters.kafka.table import TableReader
from service.config import Settings
from service.core.dead_letters import Ledger, Restored
from service.core.verdicts import Source

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""The producer's own cap on a request; the broker's limit (message.max.bytes) is what holds,
and an original record got past it once already."""


async def read_ledger(settings: Settings, topic: str, timeout_s: float) -> Ledger | None:
    """Every redrive the ledger topic records now; None when there is no such topic."""
    ledger = Ledger()
    reader = TableReader(settings, topic, ledger.apply)
    try:
        await reader.load(timeout_s)
    except LookupError:
        return None
    finally:
        await reader.stop()
    return ledger


class RedriveProducer:
    """Publishes restored records and their ledger entries, each acknowledged by all replicas."""

    def __init__(self, settings: Settings, ledger_topic: str) -> None:
        self._ledger_topic = ledger_topic
        self._producer = AIOKafkaProducer(
            **settings.kafka_connection(),
            acks="all",
            enable_idempotence=settings.enable_idempotence,
            max_request_size=MAX_REQUEST_BYTES,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, restored: Restored) -> Source:
        """Send the record; where it was written, once acknowledged. KafkaError when the
        producer gave up (after its own retries): it may or may not have been written."""
        sent = await self._producer.send(
            restored.topic, restored.value, key=restored.key, headers=restored.headers
        )
        written = await sent
        return Source(topic=written.topic, partition=written.partition, offset=written.offset)

    async def record(self, key: bytes, value: bytes) -> None:
        """Send a ledger entry and wait for its acknowledgement."""
        await (await self._producer.send(self._ledger_topic, value, key=key))
