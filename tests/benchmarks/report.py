"""The arithmetic and the tables of the throughput benchmark: pure functions, unit-tested."""

from __future__ import annotations

import math
import re
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


def mix_rate(weights: Mapping[str, float], rates: Mapping[str, float]) -> float:
    """Events per second of a mix with these shares, from each kind's own rate: the time an
    event takes is the weighted mean of each kind's 1/rate. Kinds without a rate are left out
    (the shares of the rest renormalised); NaN when none is known."""
    known = {k: w for k, w in weights.items() if w > 0 and not math.isnan(rates.get(k, math.nan))}
    if not known or any(rates[k] <= 0 for k in known):
        return math.nan
    return sum(known.values()) / sum(w / rates[k] for k, w in known.items())


def mix_mean(weights: Mapping[str, float], values: Mapping[str, float]) -> float:
    """The weighted mean per event (CPU ms, say) of the kinds known, shares renormalised."""
    known = {k: w for k, w in weights.items() if w > 0 and not math.isnan(values.get(k, math.nan))}
    if not known:
        return math.nan
    return sum(w * values[k] for k, w in known.items()) / sum(known.values())


_ADDRESS = re.compile(r"0x[0-9a-f]+")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """A py-spy frame without its line number, its file shortened to what follows
    site-packages/ or the repository: `decode_image (service/core/images.py)`; a native frame
    with no symbol, only an address, is `? (libc.so.6)`."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    if _ADDRESS.fullmatch(match["function"]):
        # A native frame without symbols (libc's futex and poll waits, mostly): one per library.
        return f"? ({match['file']})"
    file = match["file"]
    if "site-packages/" in file:
        file = file.partition("site-packages/")[2]
    elif "/lib/python3" in file:
        file = "stdlib " + file.partition("/lib/python3")[2].partition("/")[2]
    else:
        for top in ("/service/", "/tests/"):
            if top in file:
                file = top.lstrip("/") + file.partition(top)[2]
                break
    return f"{match['function']} ({file})"


def profile_top(raw_lines: Iterable[str], top: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """py-spy's raw (collapsed) stacks, `frame;frame;... count` per line, aggregated per
    function: the samples in all, and the `top` functions by self samples (the innermost
    frame) with their self and total samples (a frame anywhere in a stack, once per stack)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw_lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    ranked = sorted(own, key=lambda f: (-own[f], f))[:top]
    return samples, [(f, own[f], total[f]) for f in ranked]
