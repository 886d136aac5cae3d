"""Self-contained HTML reports (eval, compare, replay's diff): one file, no external resources.

Plots are matplotlib figures rendered to PNG and embedded as data: URIs, so a report can be
mailed, attached to a change request or opened offline; every text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Cell = str | int | float | None

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222 }
h1 { font-size: 1.5em } h2 { font-size: 1.2em; margin-top: 2em }
table { border-collapse: collapse; margin: .5em 0 } caption { text-align: left; color: #555 }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right }
th:first-child, td:first-child { text-align: left }
.note { color: #555 } figure { margin: 1em 0 } img { max-width: 100% }
"""


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg), closed afterwards so a long run does not keep it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def image(png_bytes: bytes, alt: str) -> str:
    data = base64.b64encode(png_bytes).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[Cell]], caption: str = "") -> str:
    def cell(value: Cell, tag: str) -> str:
        shown = "" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        return f"<{tag}>{html.escape(str(shown))}</{tag}>"

    parts = [f"<caption>{html.escape(caption)}</caption>" if caption else ""]
    parts.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    parts += ["<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows]
    return "<table>" + "".join(parts) + "</table>"


def paragraph(text: str, note: bool = False) -> str:
    return f"<p{' class=note' if note else ''}>{html.escape(text)}</p>"


def heading(text: str) -> str:
    return f"<h2>{html.escape(text)}</h2>"


def document(title: str, blocks: Iterable[str]) -> str:
    """A whole page: `blocks` are fragments made by the functions above."""
    body = "\n".join(blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
