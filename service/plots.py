"""The figures of the eval and compare reports, drawn with matplotlib's Agg backend.

Figures are made as `Figure` objects, not through pyplot's global state, and matplotlib is
imported inside each function: the consumer imports this package but never draws, so it never
pays for matplotlib. `service.ops.html.png` turns a figure into the PNG a report embeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    import matplotlib

    # Before anything imports pyplot (ops.html.png does): reports are drawn on servers.
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def heatmap(
    counts: Sequence[Sequence[int]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_label: str,
    column_label: str,
) -> Figure:
    """Counts as shades of one colour, each cell's count written in it."""
    side = max(3.0, 0.6 * max(len(rows), len(columns)) + 1.5)
    figure = _figure(side + 1.0, side)
    axes = figure.add_subplot()
    peak = max((max(row, default=0) for row in counts), default=0)
    picture = axes.imshow(
        [list(row) for row in counts], cmap="Blues", vmin=0, vmax=max(peak, 1), aspect="auto"
    )
    for r, row in enumerate(counts):
        for c, count in enumerate(row):
            # White on the darker half of the scale, so every count stays legible.
            shade = "white" if count > max(peak, 1) / 2 else "black"
            axes.text(c, r, str(count), ha="center", va="center", color=shade)
    axes.set_xticks(range(len(columns)), list(columns), rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), list(rows))
    axes.set_xlabel(column_label)
    axes.set_ylabel(row_label)
    axes.set_title(title)
    figure.colorbar(picture, ax=axes, shrink=0.8)
    return figure


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, axis: str) -> Figure:
    """Shares between 0 and 1, one bar each, its value written above it."""
    figure = _figure(max(4.0, 0.55 * len(labels) + 1.5), 3.5)
    axes = figure.add_subplot()
    drawn = axes.bar(range(len(labels)), values, color="#4c72b0")
    axes.bar_label(drawn, labels=[f"{v:.2f}" for v in values], fontsize=8)
    axes.set_xticks(range(len(labels)), list(labels))
    axes.set_ylim(0, 1.1)
    axes.set_ylabel(axis)
    axes.set_title(title)
    return figure


def reliability(
    edges: Sequence[tuple[float, float]],
    confidences: Sequence[float | None],
    accuracies: Sequence[float | None],
    counts: Sequence[int],
) -> Figure:
    """A reliability diagram: each bin's accuracy against its mean confidence (the diagonal is
    perfect calibration), with how many items each bin holds below it."""
    figure = _figure(5.0, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    centres = [(low + high) / 2 for low, high in edges]
    width = edges[0][1] - edges[0][0]
    filled = [
        (centre, accuracy, confidence)
        for centre, accuracy, confidence in zip(centres, accuracies, confidences, strict=True)
        if accuracy is not None and confidence is not None
    ]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.bar([f[0] for f in filled], [f[1] for f in filled], width=width * 0.9, label="accuracy")
    top.plot(
        [f[2] for f in filled],
        [f[1] for f in filled],
        "o",
        color="#c44e52",
        label="mean confidence",
    )
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy of the rating")
    top.set_title("Reliability of the reported confidence")
    top.legend(loc="upper left")
    bottom.bar(centres, counts, width=width * 0.9, color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence of the predicted rating")
    bottom.set_ylabel("items")
    return figure


def forest(
    names: Sequence[str],
    deltas: Sequence[float],
    intervals: Sequence[tuple[float, float]],
    better: Sequence[bool | None],
) -> Figure:
    """Each figure's change with its confidence interval: green where it moved for the
    better, red for the worse, grey where its interval holds 0 (`better` None)."""
    figure = _figure(6.5, max(2.5, 0.4 * len(names) + 1.2))
    axes = figure.add_subplot()
    for row, (delta, (low, high), improved) in enumerate(
        zip(deltas, intervals, better, strict=True)
    ):
        colour = {True: "#55a868", False: "#c44e52", None: "grey"}[improved]
        if not (math.isnan(low) or math.isnan(high)):
            axes.plot([low, high], [row, row], color=colour, linewidth=2)
        axes.plot([delta], [row], "o", color=colour)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(names)), list(names))
    axes.invert_yaxis()
    axes.set_xlabel("B - A, with its 95% bootstrap interval")
    axes.set_title("What moved")
    return figure
