"""The arithmetic and the tables of the throughput benchmark: pure functions, unit-tested."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def percentiles(values: Sequence[float], wanted: Iterable[float]) -> list[float]:
    """The `wanted` percentiles (0-100) of `values`, linearly interpolated between the closest
    ranks (numpy's default); NaN for each when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return [math.nan for _ in wanted]
    result = []
    for p in wanted:
        if not 0 <= p <= 100:
            raise ValueError(f"a percentile is between 0 and 100, not {p}")
        rank = (len(ordered) - 1) * p / 100
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        result.append(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))
    return result


def latencies_ms(
    sent_ms: Mapping[bytes, int], outputs: Iterable[tuple[bytes | None, int]]
) -> list[float]:
    """Output timestamp minus input timestamp, per output whose key was sent (the first output
    of each key only: a repeat is a redelivery, not a second latency)."""
    result: list[float] = []
    seen: set[bytes] = set()
    for key, timestamp_ms in outputs:
        if key is None or key in seen or key not in sent_ms:
            continue
        seen.add(key)
        result.append(float(timestamp_ms - sent_ms[key]))
    return result


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where either is unknown or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def ceiling(rates: Iterable[float]) -> float:
    """min(A, B): the lower of the known ceilings, NaN when none is known."""
    known = [r for r in rates if not math.isnan(r)]
    return min(known) if known else math.nan


def number(value: float | None, digits: int = 0) -> str:
    """A table cell: '-' for unknown."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A Markdown table; columns from index `right` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
