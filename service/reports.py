"""The eval report: one JSON document, its terminal summary and its HTML page.

`report_document` is what `python -m service eval` writes to report.json: the run's meta, every
metric of `service.core.eval_metrics` and every judged item, so `--compare` can resample the
items of two reports (`service.compare`). The terminal lines and the HTML page are rendered from
the document alone, so a report read back from disk renders as the fresh one did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from service import plots
from service.core.eval_metrics import metrics
from service.core.evaluation import Judged
from service.ops.html import Cell, document, heading, image, paragraph, png, table

SCHEMA = "guardstream.eval/1"
_CELLS = ("tp", "fp", "tn", "fn", "invalid")
Document = dict[str, Any]

_HEADLINE = [
    ("balanced accuracy", "balanced_accuracy"),
    ("accuracy", "accuracy"),
    ("precision", "precision"),
    ("recall (TPR)", "tpr"),
    ("specificity (TNR)", "tnr"),
    ("false-positive rate", "fpr"),
    ("false-negative rate", "fnr"),
    ("F1", "f1"),
    ("F2", "f2"),
]


def report_document(items: Sequence[Judged], meta: Mapping[str, Any]) -> Document:
    report = {
        "schema": SCHEMA,
        "meta": dict(meta),
        "metrics": asdict(metrics(items)),
        "items": [asdict(item) for item in items],
    }
    # The document is what the file will hold (lists, not tuples; ISO times), so a report
    # rendered or compared in memory is the report read back from disk.
    # Meta values JSON has no type for (a Path) are written as their text.
    loaded: Document = orjson.loads(orjson.dumps(report, default=str))
    return loaded


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def share(rate: Mapping[str, Any] | None) -> str:
    """A Rate as `value (count/total)`."""
    if rate is None:
        return "n/a (no items)"
    return f"{number(rate['value'])} ({rate['count']}/{rate['total']})"


def _dead_letters(figures: Mapping[str, Any]) -> str:
    codes = figures["dead_letters"]
    return ", ".join(f"{code} {count}" for code, count in codes.items()) or "none"


def terminal_lines(report: Document) -> list[str]:
    """The headline figures, per-category recall and the service's own figures, aligned."""
    figures = report["metrics"]
    counts, table_ = figures["confusion"], figures["rates"]
    rows: list[tuple[str, str]] = [
        ("items", f"{figures['items']} (no verdict: {_dead_letters(figures)})"),
        *((label, number(table_[key])) for label, key in _HEADLINE),
        ("TP FP TN FN", "{tp} {fp} {tn} {fn} (invalid {invalid})".format(**counts)),
        ("category correct", share(figures["category_correct"])),
        ("policy exceptions", share(figures["policy_exceptions"])),
        ("ICM accuracy", share(figures["icm_accuracy"])),
        ("unparseable answers", share(figures["unparseable"])),
    ]
    if latency := figures["latency"]:
        rows.append(
            ("latency ms", "  ".join(f"{k} {latency[k]:.1f}" for k in ("p50", "p90", "p99", "max")))
        )
    if calibration := figures["calibration"]:
        rows.append(
            (
                "calibration ECE",
                f"{number(calibration['ece'])} ({calibration['scored']} items with a "
                f"confidence, {calibration['unscored']} without)",
            )
        )
    if actions := figures["actions"]:
        rows.append(("Unsafe allowed", share(actions["unsafe_allowed"])))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    if figures["categories"]:
        lines.append(f"{'category':<{width}}{'items':>6}  recall  bal.acc  accuracy")
        lines += [
            f"  {c['code']:<{width - 2}}{c['items']:>6}  {number(c['recall']):>6}  "
            f"{number(c['balanced_accuracy']):>7}  {number(c['accuracy']):>8}"
            for c in figures["categories"]
        ]
    return lines


def write_html(report: Document, path: Path) -> None:
    figures = report["metrics"]
    blocks = [
        table(["", ""], [(str(k), _cell(v)) for k, v in report["meta"].items()], "the run"),
        heading("LlavaGuard's metrics (positive = Unsafe)"),
        table(
            ["figure", "value"],
            [(label, figures["rates"][key]) for label, key in _HEADLINE]
            + [
                ("category correct", share(figures["category_correct"])),
                ("policy-exception recall", share(figures["policy_exceptions"])),
                ("ICM accuracy", share(figures["icm_accuracy"])),
                ("unparseable answers", share(figures["unparseable"])),
            ],
        ),
        *_confusion_blocks(figures),
        *_category_blocks(figures),
        *_calibration_blocks(figures["calibration"]),
        *_service_blocks(figures),
    ]
    path.write_text(document(f"guardstream eval: {report['meta'].get('manifest', '')}", blocks))


def _cell(value: Any) -> Cell:
    return value if isinstance(value, str | int | float) or value is None else str(value)


def _confusion_blocks(figures: Mapping[str, Any]) -> list[str]:
    c = figures["confusion"]
    matrix = plots.heatmap(
        [[c["tp"], c["fn"]], [c["fp"], c["tn"]]],
        ["Unsafe", "Safe"],
        ["Unsafe", "Safe"],
        title="Rating: expected against predicted",
        row_label="expected",
        column_label="predicted",
    )
    return [
        heading("Confusion matrix"),
        image(png(matrix), "confusion matrix of the rating"),
        paragraph(
            f"{c['invalid']} items without a verdict are in no cell (LlavaGuard's invalid "
            f"assessments): {_dead_letters(figures)}.",
            note=True,
        ),
    ]


def _category_blocks(figures: Mapping[str, Any]) -> list[str]:
    categories, confusion = figures["categories"], figures["category_confusion"]
    if not categories:
        return [heading("Categories"), paragraph("No item names an expected category.", True)]
    blocks = [
        heading("Categories"),
        table(
            ["category", "items", "TP", "FP", "TN", "FN", "invalid", "recall", "bal. acc.", "acc."],
            [
                [
                    c["code"],
                    c["items"],
                    *(c["confusion"][k] for k in _CELLS),
                    c["recall"],
                    c["balanced_accuracy"],
                    c["accuracy"],
                ]
                for c in categories
            ],
            "per expected category; recall needs Unsafe items, balanced accuracy both ratings",
        ),
    ]
    recalled = [c for c in categories if c["recall"] is not None]
    if recalled:
        chart = plots.bars(
            [c["code"] for c in recalled],
            [c["recall"] for c in recalled],
            title="Recall per expected category",
            axis="recall (TPR)",
        )
        blocks.append(image(png(chart), "recall per category"))
    matrix = plots.heatmap(
        confusion["counts"],
        confusion["expected"],
        confusion["predicted"],
        title="Category: expected against predicted",
        row_label="expected category",
        column_label="predicted category",
    )
    blocks.append(image(png(matrix), "category confusion matrix"))
    return blocks


def _calibration_blocks(calibration: Mapping[str, Any] | None) -> list[str]:
    if calibration is None:
        return [heading("Calibration"), paragraph("The guard reported no confidence.", True)]
    bins = calibration["bins"]
    diagram = plots.reliability(
        [(b["lower"], b["upper"]) for b in bins],
        [b["mean_confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        [b["count"] for b in bins],
    )
    return [
        heading("Calibration"),
        paragraph(
            f"Expected calibration error {number(calibration['ece'])} over "
            f"{calibration['scored']} items with a confidence; items with a verdict but no "
            f"confidence: {calibration['unscored']}."
        ),
        image(png(diagram), "reliability diagram"),
        table(
            ["bin", "items", "mean confidence", "accuracy"],
            [
                [
                    f"[{b['lower']:.1f}, {b['upper']:.1f}{']' if b['upper'] == 1 else ')'}",
                    b["count"],
                    b["mean_confidence"],
                    b["accuracy"],
                ]
                for b in bins
            ],
        ),
    ]


def _service_blocks(figures: Mapping[str, Any]) -> list[str]:
    blocks = [heading("Dead letters, latency, actions")]
    codes = figures["dead_letters"]
    blocks.append(table(["dead-letter code", "items"], list(codes.items())) if codes else "")
    if latency := figures["latency"]:
        keys = ("p50", "p90", "p99", "max")
        blocks.append(table(["latency ms", *keys], [("", *(latency[k] for k in keys))]))
    if actions := figures["actions"]:
        names = list(dict.fromkeys(a for row in actions["by_expected"].values() for a in row))
        blocks.append(
            table(
                ["expected", *names],
                [
                    (rating, *(row.get(a, 0) for a in names))
                    for rating, row in actions["by_expected"].items()
                ],
                f"actions; Unsafe items allowed: {share(actions['unsafe_allowed'])}",
            )
        )
    return blocks
