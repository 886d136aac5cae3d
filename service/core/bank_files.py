"""The banks file (TOML) and the entry files it names, in the formats hash lists come in.

```toml
[[bank]]
name = "known-bad"                 # [a-z0-9][a-z0-9_.-]{0,62}; the banks topic's keys name it
action = "block"                   # block | review | allow
category = "O2"                    # the policy category a matching image's verdict names
pdq_threshold = 31                 # optional, 0..256 (PDQ's confident match: 31)
description = "..."                # optional
files = [{ path = "known-bad.csv", format = "csv" }]   # optional; relative to this file
```

A banks file that is not like this raises ValueError naming the file and the key: the service
does not start. An entry file is read row by row: a bad row is counted and logged as
`path:line: why`, and the others load. A file that cannot be read, or that has rows but not one
valid entry, is a readiness problem (`load_banks`' second result): the bank would silently
match nothing.

Entry file formats (`FORMATS`):

    csv          ours: a header naming `kind,value` and optionally `entry_id`, `note`, in any
                 order; kind is pdq, sha256 or md5. Missing entry ids become `<file>:<line>`.
    pdq-hasher   one PDQ hash per line, optionally followed by `,quality[,filename]`: the output
                 of Meta's reference `pdq-photo-hasher` (ThreatExchange, pdq/cpp), which prints
                 `hash,quality,filename`, and bare PDQ hash lists. A row whose quality is under
                 PDQ_MIN_QUALITY is refused (PDQ's authors: such hashes match too much).
    te-signals   python-threatexchange's simple signal file (`LocalFileSignalExchangeAPI`, and
                 what `threatexchange hash photo` prints): `<signal_type> <signal>` per line.
                 Only `pdq` is an image hash; other signal types are refused rows.
    te-csv       `threatexchange dataset --print-signals --csv`: header
                 `collab,signal_type,signal_str,category,tags`; collab, category and tags go
                 into the entry's note.

Blank lines and lines starting with `#` are skipped in every format.
"""

from __future__ import annotations

import csv
import io
import logging
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.banks import BankEntry, Banks, BankSpec, HashKind, check_hash
from service.core.hashing import PDQ_MATCH_DISTANCE, PDQ_MIN_QUALITY

log = logging.getLogger(__name__)

_MAX_FIELD = 2000
_BANK_KEYS = ("name", "action", "category", "pdq_threshold", "description", "files")
_FILE_KEYS = ("path", "format")


class BadRow(ValueError):
    """One row of an entry file that is not an entry; the message says why."""


@dataclass(frozen=True)
class Row:
    kind: HashKind
    value: str
    entry_id: str | None = None
    note: str | None = None


RowReader = Callable[[list[str]], Iterator[tuple[int, Row | BadRow]]]
"""An entry file's lines -> (line number, the row or why it is not one) per data line."""


@dataclass(frozen=True)
class FileEntries:
    entries: list[BankEntry]
    rows: int
    """Data lines read (blank and comment lines not counted)."""
    rejected: int


def read_entries(path: Path, bank: str, file_format: str) -> FileEntries:
    """The entries of one file for `bank`; ValueError if the file cannot be read as a whole."""
    reader = FORMATS.get(file_format)
    if reader is None:
        raise ValueError(f"{path}: unknown format {file_format!r} (known: {', '.join(FORMATS)})")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the entry file: {exc}") from exc
    entries: list[BankEntry] = []
    rejected = 0
    try:
        parsed_rows = list(reader(lines))
    except ValueError as exc:  # a header that names no hash column: no row can be read
        raise ValueError(f"{path}: {exc}") from exc
    for line, parsed in parsed_rows:
        if isinstance(parsed, BadRow):
            rejected += 1
            log.warning("%s:%d: %s; row skipped", path, line, parsed)
            continue
        entry_id = parsed.entry_id or f"{path.name}:{line}"
        entries.append(BankEntry(bank, parsed.kind, parsed.value, entry_id, parsed.note))
    return FileEntries(entries, len(parsed_rows), rejected)


def read_specs(path: Path) -> dict[str, BankSpec]:
    """The banks a banks file names, without reading their entry files."""
    return {spec.name: spec for spec, _ in _read_tables(path)}


def load_banks(path: Path) -> tuple[Banks, list[str]]:
    """The banks of a banks file with their files' entries, and the readiness problems."""
    tables = _read_tables(path)
    banks = Banks({spec.name: spec for spec, _ in tables})
    problems: list[str] = []
    for spec, files in tables:
        for file_path, file_format in files:
            try:
                read = read_entries(path.parent / file_path, spec.name, file_format)
            except ValueError as exc:
                problems.append(f"bank {spec.name}: {exc}")
                continue
            for entry in read.entries:
                banks.add(entry)
            banks.file_rows_rejected += read.rejected
            if read.rows and not read.entries:
                problems.append(f"bank {spec.name}: {file_path} had {read.rows} rows, none valid")
    banks.rebuild()
    return banks, problems


def _read_tables(path: Path) -> list[tuple[BankSpec, list[tuple[str, str]]]]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the banks file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not TOML: {exc}") from exc
    return _bank_tables(raw, path)


def _bank_tables(raw: dict[str, Any], path: Path) -> list[tuple[BankSpec, list[tuple[str, str]]]]:
    unknown = [key for key in raw if key != "bank"]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (the file holds [[bank]] tables)")
    tables = raw.get("bank", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: bank must be an array of tables ([[bank]])")
    parsed: list[tuple[BankSpec, list[tuple[str, str]]]] = []
    for number, table in enumerate(tables):
        where = f"{path}: bank[{number}]"
        parsed.append(_bank_table(table, where))
        if [spec.name for spec, _ in parsed].count(parsed[-1][0].name) > 1:
            raise ValueError(f"{where}: bank {parsed[-1][0].name!r} is named twice")
    return parsed


def _bank_table(table: dict[str, Any], where: str) -> tuple[BankSpec, list[tuple[str, str]]]:
    unknown = [key for key in table if key not in _BANK_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_BANK_KEYS)})")
    for key, kind in (("name", str), ("action", str), ("category", str)):
        if not isinstance(table.get(key), kind):
            raise ValueError(f"{where}.{key}: required, a string")
    threshold = table.get("pdq_threshold", PDQ_MATCH_DISTANCE)
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise ValueError(f"{where}.pdq_threshold: must be an integer")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}.description: must be a string")
    try:
        spec = BankSpec(table["name"], table["action"], table["category"], threshold, description)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    files = table.get("files", [])
    if not isinstance(files, list):
        raise ValueError(f"{where}.files: must be an array of {{ path, format }} tables")
    return spec, [_file_table(item, f"{where}.files[{n}]") for n, item in enumerate(files)]


def _file_table(item: object, where: str) -> tuple[str, str]:
    if not isinstance(item, dict) or sorted(item) != sorted(_FILE_KEYS):
        raise ValueError(f"{where}: must be a table {{ path = ..., format = ... }}")
    if not all(isinstance(item[key], str) for key in _FILE_KEYS):
        raise ValueError(f"{where}: path and format must be strings")
    if item["format"] not in FORMATS:
        raise ValueError(f"{where}.format: {item['format']!r} is not one of {', '.join(FORMATS)}")
    return item["path"], item["format"]


def _data_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield number, text


def _field(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > _MAX_FIELD:
        raise BadRow(f"a field of {len(text)} characters (at most {_MAX_FIELD})")
    return text.strip()


def _csv_rows(
    lines: list[str], required: tuple[str, ...], row_of: Callable[[dict[str, str]], Row]
) -> Iterator[tuple[int, Row | BadRow]]:
    data = list(_data_lines(lines))
    if not data:
        return
    header_line, header = data[0]
    columns = [name.strip() for name in next(csv.reader([header]))]
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"line {header_line}: the header lacks {', '.join(missing)}")
    for number, text in data[1:]:
        cells = next(csv.reader(io.StringIO(text)))
        if len(cells) != len(columns):
            yield number, BadRow(f"{len(cells)} columns, the header has {len(columns)}")
            continue
        try:
            yield number, row_of(dict(zip(columns, cells, strict=True)))
        except BadRow as exc:
            yield number, exc


def _our_row(cells: dict[str, str]) -> Row:
    kind = cells["kind"].strip().lower()
    value = cells["value"].strip().lower()
    try:
        check_hash(kind, value)
    except ValueError as exc:
        raise BadRow(str(exc)) from None
    return Row(kind, value, _field(cells.get("entry_id")), _field(cells.get("note")))  # type: ignore[arg-type]


def _te_csv_row(cells: dict[str, str]) -> Row:
    signal_type = cells["signal_type"].strip()
    if signal_type != "pdq":
        raise BadRow(f"signal type {signal_type[:40]!r} is not an image hash (only pdq is)")
    described = {name: cells.get(name, "").strip() for name in ("collab", "category", "tags")}
    note = " ".join(f"{name}={value}" for name, value in described.items() if value)
    return Row("pdq", _pdq(cells["signal_str"]), note=_field(note))


def _pdq(text: str) -> str:
    value = text.strip().lower()
    try:
        check_hash("pdq", value)
    except ValueError as exc:
        raise BadRow(str(exc)) from None
    return value


def _rows_our_csv(lines: list[str]) -> Iterator[tuple[int, Row | BadRow]]:
    return _csv_rows(lines, ("kind", "value"), _our_row)


def _rows_te_csv(lines: list[str]) -> Iterator[tuple[int, Row | BadRow]]:
    return _csv_rows(lines, ("signal_type", "signal_str"), _te_csv_row)


def _rows_pdq_hasher(lines: list[str]) -> Iterator[tuple[int, Row | BadRow]]:
    for number, text in _data_lines(lines):
        hash_text, *rest = text.split(",", 2)
        try:
            value = _pdq(hash_text)
            if rest and (not rest[0].strip().isdigit() or int(rest[0]) < PDQ_MIN_QUALITY):
                raise BadRow(f"quality {rest[0].strip()[:20]!r} is not {PDQ_MIN_QUALITY}-100")
            yield number, Row("pdq", value, entry_id=_field(rest[1]) if len(rest) > 1 else None)
        except BadRow as exc:
            yield number, exc


def _rows_te_signals(lines: list[str]) -> Iterator[tuple[int, Row | BadRow]]:
    for number, text in _data_lines(lines):
        signal_type, _, signal = text.partition(" ")
        if signal_type != "pdq":
            yield number, BadRow(f"signal type {signal_type[:40]!r} is not pdq")
            continue
        try:
            yield number, Row("pdq", _pdq(signal))
        except BadRow as exc:
            yield number, exc


FORMATS: dict[str, RowReader] = {
    "csv": _rows_our_csv,
    "pdq-hasher": _rows_pdq_hasher,
    "te-signals": _rows_te_signals,
    "te-csv": _rows_te_csv,
}
"""Entry file formats by the name the banks file and `banks import --format` use."""
