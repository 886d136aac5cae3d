"""What a replay changed: each replayed outcome against the verdict originally published.

A replay keeps one `Replayed` row per input record it judged (`outcomes.jsonl`), carrying the
original verdict found for that record, if any; `diff` counts the events whose rating, category
code or action changed, overall and per original category, with example event ids and the
direction of rating changes. Dead letters and events with no original verdict are counted
apart: there is nothing to compare them with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.verdicts import DeadLetter, Replay, Source, Supersedes, Verdict

EXAMPLES = 10
"""Event ids kept per kind of change: enough to look at, bounded for any run size."""

NO_ORIGINAL = "(no original)"

Kind = Literal[
    "rating_changed",
    "category_changed",
    "action_changed",
    "safe_to_unsafe",
    "unsafe_to_safe",
    "no_original",
    "dead_letters",
]
KINDS: tuple[Kind, ...] = get_args(Kind)


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Compared(_Row):
    """The parts of a verdict a diff compares."""

    rating: str
    category_code: str
    category: str
    action: str | None = None

    @classmethod
    def of(cls, verdict: Verdict) -> Compared:
        return cls(
            rating=verdict.rating,
            category_code=verdict.category_code,
            category=verdict.category,
            action=verdict.action,
        )


class Original(Compared):
    """An original verdict, with what a replay verdict names when it supersedes it."""

    event_id: str
    policy_id: str
    policy_version: str
    at: Source = Field(description="Where it was read: the verdict topic, partition, offset.")


def original_from(document: object, at: Source) -> Original | None:
    """The original verdict in a record of the verdict topic, or None for anything else (a
    replay's or a shadow's verdict published there, a record this version cannot read)."""
    if not isinstance(document, dict) or document.get("replay") or document.get("shadow"):
        return None
    try:
        return Original.model_validate({**document, "at": at})
    except ValidationError:
        return None


def source_of(document: object) -> Source | None:
    """The input record a verdict-topic record names as its source, if it names one."""
    found = document.get("source") if isinstance(document, dict) else None
    try:
        return Source.model_validate(found) if found is not None else None
    except ValidationError:
        return None


class Replayed(_Row):
    """One line of outcomes.jsonl: an input record judged again, and its original verdict."""

    partition: int
    offset: int
    event_id: str | None
    judged: Compared | None = Field(description="The replay's verdict; None for a dead letter.")
    dead_letter: str | None = Field(None, description="The dead letter's error code.")
    original: Original | None

    @classmethod
    def of(cls, outcome: Verdict | DeadLetter, original: Original | None) -> Replayed:
        return cls(
            partition=outcome.source.partition,
            offset=outcome.source.offset,
            event_id=outcome.event_id,
            judged=Compared.of(outcome) if isinstance(outcome, Verdict) else None,
            dead_letter=outcome.error.code if isinstance(outcome, DeadLetter) else None,
            original=original,
        )

    @property
    def name(self) -> str:
        """The event id, or the record's place when the event had none (invalid input)."""
        return self.event_id or f"{self.partition}@{self.offset}"


def superseding(
    outcome: Verdict | DeadLetter, run_id: str, original: Original | None
) -> Verdict | DeadLetter:
    """A replay's verdict, marked as such and naming the original it replaces (policy and
    place null when none was found); a dead letter as it is (its header marks the replay).
    `review` is false: a replay sends nothing to the review topic (its action still says
    review where the rules chose it)."""
    if isinstance(outcome, DeadLetter):
        return outcome
    supersedes = (
        Supersedes(event_id=outcome.event_id)
        if original is None
        else Supersedes(
            event_id=original.event_id,
            policy_id=original.policy_id,
            policy_version=original.policy_version,
            source=original.at,
        )
    )
    replay = Replay(run_id=run_id, supersedes=supersedes)
    return outcome.model_copy(update={"replay": replay, "review": False})


class CategoryRow(BaseModel):
    category: str = Field(description="The original verdict's category code.")
    events: int = 0
    rating_changed: int = 0
    category_changed: int = 0
    action_changed: int = 0


class Diff(BaseModel):
    events: int = 0
    changed: int = Field(0, description="Events whose rating, category or action changed.")
    counts: dict[Kind, int] = Field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: dict[Kind, list[str]] = Field(default_factory=lambda: {k: list[str]() for k in KINDS})
    categories: list[CategoryRow] = Field(default_factory=list)


def latest(rows: Iterable[Replayed]) -> list[Replayed]:
    """One row per input record, the last written winning (a record judged again after a
    crash between its acknowledgement and the saved progress), in partition and offset order."""
    kept = {(row.partition, row.offset): row for row in rows}
    return [kept[place] for place in sorted(kept)]


def changes(row: Replayed) -> list[Kind]:
    """What changed for one record, against its original verdict."""
    if row.judged is None:
        return ["dead_letters"]
    before, after = row.original, row.judged
    if before is None:
        return ["no_original"]
    kinds: list[Kind] = []
    if before.rating != after.rating:
        direction: Kind = "unsafe_to_safe" if after.rating == "Safe" else "safe_to_unsafe"
        kinds += ["rating_changed", direction]
    if before.category_code != after.category_code:
        kinds.append("category_changed")
    if before.action != after.action:
        kinds.append("action_changed")
    return kinds


def diff(rows: Iterable[Replayed]) -> Diff:
    result = Diff()
    by_category: dict[str, CategoryRow] = {}
    for row in latest(rows):
        kinds = changes(row)
        category = row.original.category_code if row.original else NO_ORIGINAL
        line = by_category.setdefault(category, CategoryRow(category=category))
        result.events += 1
        line.events += 1
        result.changed += any(k.endswith("_changed") for k in kinds)
        for kind in kinds:
            result.counts[kind] += 1
            if len(result.examples[kind]) < EXAMPLES:
                result.examples[kind].append(row.name)
            if kind in ("rating_changed", "category_changed", "action_changed"):
                setattr(line, kind, getattr(line, kind) + 1)
    result.categories = [by_category[c] for c in sorted(by_category)]
    return result


CATEGORY_COLUMNS = ("category", "events", "rating changed", "category changed", "action changed")


def category_cells(row: CategoryRow) -> tuple[str, int, int, int, int]:
    return row.category, row.events, row.rating_changed, row.category_changed, row.action_changed


def summary_lines(result: Diff) -> list[str]:
    """The diff as a terminal report: totals, the per-category table, examples."""
    counts = result.counts
    lines = [
        f"{result.events} events replayed, {result.changed} changed: "
        f"rating {counts['rating_changed']} (Safe→Unsafe {counts['safe_to_unsafe']}, "
        f"Unsafe→Safe {counts['unsafe_to_safe']}), category {counts['category_changed']}, "
        f"action {counts['action_changed']}; no original verdict {counts['no_original']}, "
        f"dead letters {counts['dead_letters']}",
        "",
    ]
    table = [CATEGORY_COLUMNS, *(tuple(map(str, category_cells(r))) for r in result.categories)]
    widths = [max(len(row[i]) for row in table) for i in range(len(CATEGORY_COLUMNS))]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    examples = [(kind, ids) for kind, ids in result.examples.items() if ids]
    if examples:
        lines.append("")
    lines += [f"{kind.replace('_', ' ')}: {', '.join(ids)}" for kind, ids in examples]
    return lines
