"""How a place in a Kafka log is written in logs and error messages: `images[2]@41`, `images[2]`.

The core writes it for records it judges and the Kafka adapter for partitions and offsets it
commits; one spelling lets a log search for a partition find both.
"""

from __future__ import annotations


def where(topic: str, partition: int, offset: int | None = None) -> str:
    """`topic[partition]@offset`, or `topic[partition]` for a whole partition."""
    place = f"{topic}[{partition}]"
    return place if offset is None else f"{place}@{offset}"
