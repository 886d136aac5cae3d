"""What the `dlq` commands print: the dead-letter topic counted (`Listing`), one dead letter in
full (`show_lines`), a redrive's lines and tally (`Tally`). Text and plain data only, no I/O.

Places are written as the ledger keys them (`images.dlq:0:17`), or `P@offset` inside a listing
of one topic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from service.core.dead_letters import (
    SKIPS,
    LedgerEntry,
    Letter,
    Refusal,
    Restored,
    coordinates,
    instant,
)
from service.core.errors import DEAD_LETTER_FAULTS
from service.core.verdicts import DeadLetter, Source

_BASE64 = re.compile(r"[A-Za-z0-9+/=]{120,}")
"""A string this long of base64's alphabet is data, not text: elided in a preview."""

PREVIEW_LINES = 40


def fault_of(code: str) -> str:
    """Whose problem a dead-letter code is: input (the producer's), service (ours), or unknown
    for a code no error class carries (`service.core.errors`)."""
    return DEAD_LETTER_FAULTS.get(code, "unknown")


def _place(at: Source) -> str:
    return f"{at.partition}@{at.offset}"


def _hour(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")


def _instant(moment: datetime | None) -> str | None:
    return None if moment is None else instant(moment)


@dataclass
class Listing:
    """The dead letters of a range, counted by code and by hour of failure, with examples."""

    examples: int
    dead_letters: int = 0
    redriven: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    redriven_by_code: Counter[str] = field(default_factory=Counter)
    hours: Counter[str] = field(default_factory=Counter)
    first: datetime | None = None
    last: datetime | None = None
    example_ids: dict[str, list[tuple[str | None, str]]] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)
    """Places of records that are not dead letters."""

    def add(self, letter: Letter, redriven: bool) -> None:
        dead_letter = letter.dead_letter
        if dead_letter is None:
            self.others.append(_place(letter.at))
            return
        code, failed = dead_letter.error.code, dead_letter.failed_at
        self.dead_letters += 1
        self.codes[code] += 1
        self.hours[_hour(failed)] += 1
        self.first = failed if self.first is None else min(self.first, failed)
        self.last = failed if self.last is None else max(self.last, failed)
        if redriven:
            self.redriven += 1
            self.redriven_by_code[code] += 1
        shown = self.example_ids.setdefault(code, [])
        if len(shown) < self.examples:
            shown.append((letter.event_id, _place(letter.at)))

    def _by_count(self) -> list[tuple[str, int]]:
        """Codes, most frequent first, ties by name (the same order every time)."""
        return sorted(self.codes.items(), key=lambda item: (-item[1], item[0]))

    def as_json(self, topic: str, selection_words: str) -> dict[str, Any]:
        return {
            "topic": topic,
            "selection": selection_words or "the whole topic",
            "dead_letters": self.dead_letters,
            "not_dead_letters": len(self.others),
            "redriven": self.redriven,
            "first_failed_at": _instant(self.first),
            "last_failed_at": _instant(self.last),
            "codes": [
                {
                    "code": code,
                    "fault": fault_of(code),
                    "count": count,
                    "redriven": self.redriven_by_code[code],
                    "examples": [
                        {"event_id": event_id, "place": place}
                        for event_id, place in self.example_ids[code]
                    ],
                }
                for code, count in self._by_count()
            ],
            "hours": [{"hour": hour, "count": self.hours[hour]} for hour in sorted(self.hours)],
            "not_dead_letter_places": self.others[: self.examples],
        }

    def lines(self, topic: str, selection_words: str) -> list[str]:
        """The listing for a person; `selection_words` as `Selection.describe` gives them."""
        if not self.dead_letters and not self.others:
            match = f" match {selection_words}" if selection_words else ""
            return [f"no dead letters in {topic}{match}"]
        where = f"{topic} ({selection_words})" if selection_words else topic
        head = f"{where}: {self.dead_letters} dead letters, {self.redriven} of them redriven"
        if self.dead_letters:
            head += f"; failed from {_instant(self.first)} to {_instant(self.last)}"
        lines = [head]
        if self.others:
            shown = ", ".join(self.others[: self.examples])
            lines.append(f"{len(self.others)} records that are not dead letters: {shown}")
        if not self.dead_letters:
            return lines
        lines += ["", f"{'code':<26} {'count':>6} {'redriven':>8}  {'fault':<8} examples"]
        for code, count in self._by_count():
            examples = self.example_ids[code]
            shown = ", ".join(f"{event_id or '(no id)'} {place}" for event_id, place in examples)
            redriven = self.redriven_by_code[code]
            lines.append(f"{code:<26} {count:>6} {redriven:>8}  {fault_of(code):<8} {shown}")
        lines += ["", "failed per hour (UTC)"]
        lines += [f"{hour}  {self.hours[hour]:>6}" for hour in sorted(self.hours)]
        return lines


def show_lines(letter: Letter, redrives: list[LedgerEntry]) -> list[str]:
    """One record of the dead-letter topic, for a person: what failed, where it came from, the
    original record decoded, and what redrives the ledger holds of it."""
    title = f"{coordinates(letter.at)}  (written {_instant(_from_ms(letter.timestamp_ms))})"
    dead_letter = letter.dead_letter
    if dead_letter is None:
        key = None if letter.key is None else letter.key.decode("utf-8", "replace")
        return [
            title,
            f"  not a guardstream dead letter: {letter.unreadable}",
            f"  key          {key}",
            *_labelled("value", preview(letter.raw or b"", cut=False)),
        ]
    error = dead_letter.error
    lines = [
        title,
        f"  code         {error.code}  (fault: {fault_of(error.code)})",
        *_labelled("message", error.message.splitlines() or [""]),
        *_labelled("model output", (error.model_output or "-").splitlines() or [""]),
        f"  event id     {dead_letter.event_id or '-'}",
        f"  input        {coordinates(dead_letter.source)}  key {_key(letter.key)}",
        f"  failed at    {_instant(dead_letter.failed_at)}",
        f"  trace id     {dead_letter.trace_id or '-'}"
        + ("  (find the trace by this id in your tracing backend)" if dead_letter.trace_id else ""),
        f"  original     {_size(dead_letter)}",
        *_labelled("headers", _headers(dead_letter)),
        *_labelled("value", _original_preview(dead_letter)),
    ]
    history = [
        f"{_instant(entry.at)}  run {entry.run_id} → {coordinates(entry.to)}" for entry in redrives
    ]
    return [*lines, *_labelled("redrives", history or ["none"])]


def _labelled(label: str, rows: list[str]) -> list[str]:
    return [f"  {label if i == 0 else '':<12} {row}".rstrip() for i, row in enumerate(rows)]


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _key(key: bytes | None) -> str:
    if key is None:
        return "none"
    try:
        return repr(key.decode("utf-8"))
    except UnicodeDecodeError:
        return f"(binary) {key.hex()}"


def _size(dead_letter: DeadLetter) -> str:
    if dead_letter.original is None:
        return "none (the record had no value)"
    if dead_letter.original_truncated:
        kept = len(dead_letter.original) * 3 // 4 - dead_letter.original[-2:].count("=")
        return f"{dead_letter.original_size} bytes, TRUNCATED: {kept} kept, cannot be redriven"
    return f"{dead_letter.original_size} bytes, complete"


def _headers(dead_letter: DeadLetter) -> list[str]:
    rows = []
    for header in dead_letter.original_headers:
        if header.value_base64 is None:
            rows.append(f"{header.key}: {header.value}")
        else:
            rows.append(f"{header.key} (binary, base64): {header.value_base64}")
    return rows or ["none"]


def _original_preview(dead_letter: DeadLetter) -> list[str]:
    if dead_letter.original is None:
        return ["none"]
    try:
        value = base64.b64decode(dead_letter.original, validate=True)
    except binascii.Error:
        return ["(not decodable base64)"]
    return preview(value, cut=dead_letter.original_truncated)


def preview(value: bytes, *, cut: bool, max_lines: int = PREVIEW_LINES) -> list[str]:
    """A record value for a person: JSON pretty-printed with long base64 strings elided to
    their length; other text as it is; binary as its size and first bytes."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        document = None
        shown: list[str] = []
    else:
        shown = json.dumps(_elided(document), indent=2, ensure_ascii=False).splitlines()
    if document is None:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            head = value[:16].hex(" ")
            shown = [f"{len(value)} bytes of binary data: {head}{' …' if len(value) > 16 else ''}"]
        else:
            shown = [_elide_string(line) for line in text.splitlines()] or ['""']
    if len(shown) > max_lines:
        shown = [*shown[:max_lines], f"… {len(shown) - max_lines} more lines"]
    return [*shown, "… (cut: the rest was not kept)"] if cut else shown


def _elided(document: Any) -> Any:
    transform: Callable[[Any], Any] = _elided
    if isinstance(document, dict):
        return {key: transform(item) for key, item in document.items()}
    if isinstance(document, list):
        return [transform(item) for item in document]
    if isinstance(document, str):
        return _elide_string(document)
    return document


def _elide_string(text: str) -> str:
    return _BASE64.sub(lambda m: f"<base64, {len(m.group(0))} characters>", text)


@dataclass
class Tally:
    """A redrive run's counts, and the lines that report each dead letter and the run."""

    dry_run: bool
    read: int = 0
    selected: int = 0
    redriven: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def refused(self, refusal: Refusal) -> str:
        self.reasons[refusal.reason] += 1
        verb = "skipped" if refusal.skipped else "refused"
        return f"{verb} {_about(refusal.letter)}: {refusal.message}"

    def would(self, restored: Restored) -> str:
        self.redriven += 1
        return f"would redrive {_about(restored.letter)} → {restored.topic}"

    def done(self, restored: Restored, to: Source) -> str:
        self.redriven += 1
        return f"redriven {_about(restored.letter)} → {coordinates(to)}"

    def summary(self) -> str:
        verb = "dry run: would redrive" if self.dry_run else "redriven"
        parts = [
            f"{verb} {self.redriven}",
            f"already redriven {self.reasons['already_redriven']} (skipped)",
        ]
        if self.reasons["duplicate"]:
            parts.append(f"repeated input records {self.reasons['duplicate']} (skipped)")
        refusals = {r: n for r, n in self.reasons.items() if r not in SKIPS}
        refused = f"refused {sum(refusals.values())}"
        if refusals:
            refused += ": " + ", ".join(f"{reason} {n}" for reason, n in sorted(refusals.items()))
        parts.append(refused)
        return ", ".join(parts) + ("; nothing published" if self.dry_run else "")

    def exit_code(self, *, interrupted: bool) -> int:
        """130 when interrupted; 0 when anything was redriven (or would be, in a dry run)
        or a dry run selected something; 1 otherwise."""
        if interrupted:
            return 130
        return 0 if self.redriven or (self.dry_run and self.selected) else 1


def _about(letter: Letter) -> str:
    code = f" ({letter.code})" if letter.code else ""
    return f"{coordinates(letter.at)} event {letter.event_id or '-'}{code}"
