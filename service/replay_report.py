"""The diff report of a replay: the terminal summary, OUT/diff.json and OUT/diff.html."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.core.replay_diff import (
    CATEGORY_COLUMNS,
    Diff,
    category_cells,
    summary_lines,
)
from service.ops.html import document, heading, image, paragraph, png, table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_report(result: Diff, out: Path, title: str) -> list[str]:
    """Write diff.json and diff.html under `out`; the terminal summary's lines."""
    (out / "diff.json").write_text(result.model_dump_json(indent=2) + "\n")
    (out / "diff.html").write_text(html_report(result, title))
    return summary_lines(result)


def html_report(result: Diff, title: str) -> str:
    lines = summary_lines(result)
    blocks = [
        paragraph(lines[0]),
        heading("Changes per original category"),
        table(CATEGORY_COLUMNS, map(category_cells, result.categories)),
    ]
    if result.categories:
        blocks.append(image(png(changes_chart(result)), "changes per original category"))
    examples = [(kind, ids) for kind, ids in result.examples.items() if ids]
    if examples:
        blocks.append(heading("Example events"))
        blocks.append(
            table(("kind", "event ids"), [(k.replace("_", " "), ", ".join(i)) for k, i in examples])
        )
    blocks.append(
        paragraph(
            "Categories are the original verdict's; dead letters and events without an "
            "original verdict are counted apart, with nothing to compare.",
            note=True,
        )
    )
    return document(title, blocks)


def changes_chart(result: Diff) -> Figure:
    """Grouped bars: rating, category and action changes per original category."""
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are made on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [row.category for row in result.categories]
    series = {
        "rating": [row.rating_changed for row in result.categories],
        "category": [row.category_changed for row in result.categories],
        "action": [row.action_changed for row in result.categories],
    }
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.2))
    width = 0.8 / len(series)
    for index, (label, counts) in enumerate(series.items()):
        positions = [i + (index - 1) * width for i in range(len(names))]
        axes.bar(positions, counts, width, label=f"{label} changed")
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("events")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of events
    axes.set_title("Changes per original category")
    axes.legend()
    return figure
