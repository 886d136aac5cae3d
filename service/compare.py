"""`python -m service eval --compare A.json B.json`: which figures moved between two reports.

Two runs over the same manifest are compared item by item (paired by id): B's figure minus A's,
with a percentile bootstrap interval of that difference. Each resample draws the paired items
with replacement and computes both runs' figures on the same draw, so the noise the two runs
share (which images happened to be in the set) cancels. A figure moved only when its interval
excludes 0: one image out of 200 flipping is a 0.5-point change that is not evidence of
anything, and the report says so instead of selling it as a win.

The figures are `service.core.eval_metrics.rate_table`'s, the same code the report's figures
come from, computed on every resample at once (one matrix product per chunk of resamples).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service import plots
from service.core.eval_metrics import Array, code_order, outcome, rate_table
from service.core.evaluation import Judged
from service.ops.html import document, heading, image, paragraph, png, table
from service.reports import number

SCHEMA = "guardstream.compare/1"
LEVEL = 0.95
Document = dict[str, Any]

_HEADLINE = (
    ("balanced accuracy", "balanced_accuracy"),
    ("accuracy", "accuracy"),
    ("precision", "precision"),
    ("recall", "tpr"),
    ("specificity", "tnr"),
    ("F1", "f1"),
)
_OUTCOMES = ("tp", "fp", "tn", "fn")
# The one compared figure that is better when it falls.
_LOWER_IS_BETTER = frozenset({"unparseable rate"})
# Resamples are weighed in chunks of about this many (resample, item) cells: 16 MB of weights.
_CHUNK_CELLS = 2_000_000


def judged_items(report: Document) -> dict[str, Judged]:
    """A report's items by id, as the records they were written from."""
    return {
        item["id"]: Judged(**{**item, "exceptions": tuple(item["exceptions"])})
        for item in report["items"]
    }


def columns(items: Sequence[Judged], categories: Sequence[str]) -> Array:
    """One row per item, each column a count the figures are made of: its outcome (TP, FP,
    TN, FN), whether its answer was unparseable, then per category whether it is a TP, or an
    FN, of that category. A sum of rows is everything the figures need."""
    outcomes = [outcome(item) for item in items]
    cells = [[o == cell for o in outcomes] for cell in _OUTCOMES]
    cells.append([item.unparseable for item in items])
    for code in categories:
        for cell in ("tp", "fn"):
            cells.append(
                [
                    o == cell and i.expected_category == code
                    for i, o in zip(items, outcomes, strict=True)
                ]
            )
    return np.array(cells, dtype=np.float64).reshape(len(cells), len(items)).T


def figures(sums: Array, items: int, categories: Sequence[str]) -> dict[str, Array]:
    """The compared figures from summed `columns`, one value per row of `sums`."""
    tp, fp, tn, fn, unparseable = (sums[:, index] for index in range(5))
    table_ = rate_table(tp, fp, tn, fn)
    result = {label: table_[key] for label, key in _HEADLINE}
    result["unparseable rate"] = unparseable / max(items, 1)
    for index, code in enumerate(categories):
        hits, misses = sums[:, 5 + 2 * index], sums[:, 6 + 2 * index]
        # NaN, not 0, in a resample that drew no Unsafe item of the category: left out of the
        # interval rather than counted as a recall of 0.
        undefined = np.full(len(sums), np.nan)
        positives = hits + misses
        result[f"recall {code}"] = np.divide(hits, positives, out=undefined, where=positives > 0)
    return result


def resampled_sums(table_: Array, resamples: int, rng: np.random.Generator) -> Array:
    """Column sums of `resamples` draws of the rows with replacement, one row per draw."""
    items = len(table_)
    chunk = max(1, _CHUNK_CELLS // items)
    parts = [np.zeros((0, table_.shape[1]))]
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, items, size=(rows, items)) + items * np.arange(rows)[:, None]
        # Each draw as how often it picked each item, so one product sums every draw.
        weights = np.bincount(picks.ravel(), minlength=rows * items).reshape(rows, items)
        parts.append(weights.astype(np.float64) @ table_)
    return np.concatenate(parts)


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _row(name: str, a: float, b: float, deltas: Array | None) -> dict[str, Any]:
    low = high = None
    if deltas is not None and not np.all(np.isnan(deltas)):
        tail = 100 * (1 - LEVEL) / 2
        low, high = (float(v) for v in np.nanpercentile(deltas, [tail, 100 - tail]))
    # A move is an interval that excludes 0, up or down.
    rose, fell = low is not None and low > 0, high is not None and high < 0
    return {
        "figure": name,
        "a": _finite(a),
        "b": _finite(b),
        "delta": _finite(b - a),
        "low": low,
        "high": high,
        "moved": rose or fell,
        "better": rose != (name in _LOWER_IS_BETTER) if rose or fell else None,
    }


def _labels(item: Judged) -> tuple[object, ...]:
    return (item.expected_rating, item.expected_category, item.exceptions)


def compare(a: Document, b: Document, resamples: int, seed: int = 0) -> Document:
    """B against A: each figure's change on the items both judged, with its paired
    percentile bootstrap interval (numpy's PCG64 seeded with `seed`, so reruns agree)."""
    items_a, items_b = judged_items(a), judged_items(b)
    paired = [key for key in items_a if key in items_b]
    runs = [[items[key] for key in paired] for items in (items_a, items_b)]
    categories = sorted(
        {
            str(item.expected_category)
            for item in runs[0] + runs[1]
            if item.expected_category and item.expected_rating == "Unsafe"
        },
        key=code_order,
    )
    table_a, table_b = (columns(run, categories) for run in runs)
    point_a, point_b = (
        figures(t.sum(axis=0, keepdims=True), len(paired), categories) for t in (table_a, table_b)
    )
    deltas: dict[str, Array] = {}
    if paired and resamples > 0:
        rng = np.random.Generator(np.random.PCG64(seed))
        # A's and B's columns side by side: both runs are summed over the same draws.
        sums = resampled_sums(np.hstack([table_a, table_b]), resamples, rng)
        width = table_a.shape[1]
        drawn_a = figures(sums[:, :width], len(paired), categories)
        drawn_b = figures(sums[:, width:], len(paired), categories)
        deltas = {name: drawn_b[name] - drawn_a[name] for name in drawn_a}
    rows = [
        _row(name, float(point_a[name][0]), float(point_b[name][0]), deltas.get(name))
        if paired
        else _row(name, np.nan, np.nan, None)
        for name in point_a
    ]
    return {
        "schema": SCHEMA,
        "a": a["meta"],
        "b": b["meta"],
        "paired": len(paired),
        "only_in_a": sorted(set(items_a) - set(items_b)),
        "only_in_b": sorted(set(items_b) - set(items_a)),
        "relabelled": [k for k in paired if _labels(items_a[k]) != _labels(items_b[k])],
        "resamples": resamples,
        "seed": seed,
        "level": LEVEL,
        "figures": rows,
    }


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _interval(row: dict[str, Any]) -> str:
    if row["low"] is None:
        return "n/a"
    return f"[{_signed(row['low'])}, {_signed(row['high'])}]"


def _pairing(result: Document) -> str:
    return (
        f"B against A on {result['paired']} items both judged (only in A: "
        f"{len(result['only_in_a'])}, only in B: {len(result['only_in_b'])}, labels differ: "
        f"{len(result['relabelled'])}); {result['level']:.0%} intervals from "
        f"{result['resamples']} paired bootstrap resamples; a figure moved when its "
        "interval excludes 0"
    )


def _verdict(row: dict[str, Any]) -> str:
    if not row["moved"]:
        return ""
    return "moved, better" if row["better"] else "moved, worse"


def compare_lines(result: Document) -> list[str]:
    rows = result["figures"]
    width = max([len(r["figure"]) for r in rows] + [6]) + 2
    lines = [_pairing(result), ""]
    lines.append(f"{'figure':<{width}}{'A':>8}{'B':>8}{'B - A':>9}  interval")
    for r in rows:
        line = (
            f"{r['figure']:<{width}}{number(r['a']):>8}{number(r['b']):>8}"
            f"{_signed(r['delta']):>9}  {_interval(r):<20}  {_verdict(r)}"
        )
        lines.append(line.rstrip())
    for label, key in (("only in A", "only_in_a"), ("only in B", "only_in_b")):
        if ids := result[key]:
            shown = ", ".join(ids[:10]) + (f", … ({len(ids) - 10} more)" if len(ids) > 10 else "")
            lines.append(f"{label}: {shown}")
    return lines


def write_compare_html(result: Document, path: Path) -> None:
    rows = [r for r in result["figures"] if r["delta"] is not None]
    blocks = [
        table(
            ["", "A", "B"],
            [
                (str(key), str(result["a"].get(key, "")), str(result["b"].get(key, "")))
                for key in dict.fromkeys([*result["a"], *result["b"]])
            ],
            "the two runs",
        ),
        paragraph(_pairing(result) + "."),
    ]
    if rows:
        chart = plots.forest(
            [r["figure"] for r in rows],
            [r["delta"] for r in rows],
            [(np.nan, np.nan) if r["low"] is None else (r["low"], r["high"]) for r in rows],
            [r["better"] for r in rows],
        )
        blocks.append(image(png(chart), "changes with their bootstrap intervals"))
    blocks.append(
        table(
            ["figure", "A", "B", "B - A", "low", "high", "moved"],
            [
                [
                    *(r[key] for key in ("figure", "a", "b", "delta", "low", "high")),
                    _verdict(r) or "no",
                ]
                for r in result["figures"]
            ],
        )
    )
    for label, key in (("Only in A", "only_in_a"), ("Only in B", "only_in_b")):
        blocks += [heading(label), paragraph(", ".join(result[key]) or "none", note=True)]
    blocks += [heading("Labels differ"), paragraph(", ".join(result["relabelled"]) or "none")]
    path.write_text(document("guardstream eval: B against A", blocks))
