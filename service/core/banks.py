"""Hash banks: lists of known images, each with the action an image that matches one gets.

A bank (`BankSpec`, from the banks file: `service.core.bank_files`) has a name, an action
(block, review or allow), the policy category a blocking verdict names, and its own PDQ
threshold. Its entries (`BankEntry`) are hashes: sha256 or md5 of the encoded bytes (exact
copies), or PDQ (near-duplicates: re-encoded, resized, lightly edited). They come from the bank's
files and from the banks topic, a compacted topic whose records this module reads (`apply`):

    key     "<bank>/<kind>/<value>"      e.g. known-bad/pdq/f8f8...  (UTF-8)
    value   {"entry_id": "...", "note": ... | null, "added_by": ... | null,
             "added_at": "<ISO 8601>" | null}           (JSON; null value: the entry is removed)

How an image is matched (`Banks.match`): its sha256 and md5 against every bank, then, when its
PDQ hash is usable (quality >= PDQ_MIN_QUALITY), its PDQ hash against every bank within that
bank's threshold. Of all matches, the strictest action wins (block > review > allow), then the
smallest distance (an exact match is distance 0); a block found exactly ends the search, since
nothing can outrank it. So an allow bank never overrides a block bank: allow banks say "known
harmless, skip the model" for images no block or review bank knows.

`match` is called from the decode thread pool while the event loop adds and removes entries:
the exact tables are read under a lock held for a dict lookup, the PDQ search
(`service.core.pdq_index`) never waits for a rebuild, and a removal counts from the next match on.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.events import describe_validation_error
from service.core.hashing import PDQ_MATCH_DISTANCE, Pdq
from service.core.pdq_index import PDQ_BITS, PdqIndex

log = logging.getLogger(__name__)

BankAction = Literal["block", "review", "allow"]
HashKind = Literal["pdq", "sha256", "md5"]

HASH_KINDS: tuple[HashKind, ...] = get_args(HashKind)
BANK_ACTIONS: tuple[BankAction, ...] = get_args(BankAction)
HEX_DIGITS: dict[HashKind, int] = {"pdq": 64, "sha256": 64, "md5": 32}
_STRICTNESS: dict[BankAction, int] = {"block": 0, "review": 1, "allow": 2}
BANK_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
"""Bank names: safe in a topic key (no '/'), a metric label and a file name."""
_CATEGORY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class BankSpec:
    name: str
    action: BankAction
    category_code: str
    """Policy category code the verdict of a matching image names, e.g. "O2"; "NA" for none."""
    pdq_threshold: int = PDQ_MATCH_DISTANCE
    """Most PDQ bits that may differ for a near-duplicate to match (0-256; PDQ advises 31)."""
    description: str = ""

    def __post_init__(self) -> None:
        if not BANK_NAME.fullmatch(self.name):
            raise ValueError(f"bank name {self.name!r} must match {BANK_NAME.pattern}")
        if self.action not in BANK_ACTIONS:
            raise ValueError(f"action {self.action!r} must be one of {', '.join(BANK_ACTIONS)}")
        if not _CATEGORY.fullmatch(self.category_code):
            raise ValueError(f"category {self.category_code!r} must be 1-32 of A-Z a-z 0-9 . _ -")
        if not 0 <= self.pdq_threshold <= PDQ_BITS:
            raise ValueError(f"pdq_threshold {self.pdq_threshold} must be 0..{PDQ_BITS}")


@dataclass(frozen=True, slots=True)
class BankEntry:
    bank: str
    kind: HashKind
    value: str
    """Lower-case hex: 64 digits for pdq and sha256, 32 for md5."""
    entry_id: str
    note: str | None = None

    def __post_init__(self) -> None:
        check_hash(self.kind, self.value)


@dataclass(frozen=True, slots=True)
class BankMatch:
    spec: BankSpec
    entry: BankEntry
    distance: int
    """PDQ bits that differ; 0 for an exact (sha256, md5) match."""


def check_hash(kind: str, value: str) -> None:
    """ValueError unless `value` is a hash of `kind` in lower-case hex of the right length."""
    if kind not in HEX_DIGITS:
        raise ValueError(f"hash kind {kind!r} must be one of {', '.join(HASH_KINDS)}")
    digits = HEX_DIGITS[kind]
    if len(value) != digits or not _HEX.fullmatch(value):
        raise ValueError(f"a {kind} hash is {digits} lower-case hex digits, not {value[:80]!r}")


def entry_key(bank: str, kind: HashKind, value: str) -> bytes:
    """The banks-topic key of an entry."""
    return f"{bank}/{kind}/{value}".encode()


class EntryRecord(BaseModel):
    """The value of a banks-topic record: who added the entry, when, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry_id: str = Field(min_length=1, max_length=200)
    note: str | None = Field(None, max_length=2000)
    added_by: str | None = Field(None, max_length=200)
    added_at: datetime | None = None


@dataclass
class _Exact:
    """sha256 and md5 entries by (kind, value), then by bank: a hash may be in several banks."""

    by_hash: dict[tuple[HashKind, str], dict[str, BankEntry]] = field(default_factory=dict)

    def put(self, entry: BankEntry) -> None:
        self.by_hash.setdefault((entry.kind, entry.value), {})[entry.bank] = entry

    def pop(self, bank: str, kind: HashKind, value: str) -> BankEntry | None:
        banks = self.by_hash.get((kind, value))
        if banks is None:
            return None
        entry = banks.pop(bank, None)
        if not banks:
            del self.by_hash[kind, value]
        return entry

    def find(self, kind: HashKind, value: str) -> list[BankEntry]:
        return list(self.by_hash.get((kind, value), {}).values())


class Banks:
    """Every bank's entries; `match` finds an image's strictest match."""

    def __init__(self, specs: Mapping[str, BankSpec]) -> None:
        self.specs = dict(specs)
        self._lock = threading.Lock()
        self._entries = _Exact()
        self._counts = dict.fromkeys(self.specs, 0)
        self._pdq: PdqIndex[tuple[str, str], BankEntry] = PdqIndex()
        """PDQ entries by (bank, value): kept there only, they cost ~0.5 KB each at 10^6."""
        self._max_threshold = max((spec.pdq_threshold for spec in specs.values()), default=0)
        self.file_rows_rejected = 0
        """Rows of the banks' files that were not entries (each logged with file:line)."""

    def add(self, entry: BankEntry) -> None:
        """Add or replace (same bank, kind and value) an entry; KeyError for an unknown bank."""
        if entry.bank not in self.specs:
            raise KeyError(f"unknown bank {entry.bank!r}")
        if entry.kind == "pdq":
            new = self._pdq.add((entry.bank, entry.value), entry.value, entry)
        else:
            with self._lock:
                new = self._entries.pop(entry.bank, entry.kind, entry.value) is None
                self._entries.put(entry)
        with self._lock:
            self._counts[entry.bank] += new

    def remove(self, bank: str, kind: HashKind, value: str) -> bool:
        """Remove an entry, from the next match on; False when there was none."""
        with self._lock:
            if kind == "pdq":
                removed = self._pdq.remove((bank, value)) is not None
            else:
                removed = self._entries.pop(bank, kind, value) is not None
            if removed:
                self._counts[bank] -= 1
        return removed

    def apply(self, key: bytes, value: bytes | None, where: str) -> bool:
        """Take one banks-topic record; False (logged with `where`) when it is not usable."""
        try:
            bank, kind, hash_value = _parse_key(key, self.specs)
        except ValueError as exc:
            log.warning("%s: not a bank entry key (%s); skipped", where, exc)
            return False
        if value is None:
            self.remove(bank, kind, hash_value)
            return True
        try:
            record = EntryRecord.model_validate_json(value)
        except ValidationError as exc:
            log.warning("%s: %s; skipped", where, describe_validation_error(exc, what="bank entry"))
            return False
        self.add(BankEntry(bank, kind, hash_value, record.entry_id, record.note))
        return True

    def match(self, sha256: str, md5: str, pdq: Pdq | None) -> BankMatch | None:
        """The strictest bank match of an image, then the nearest; None if no bank knows it."""
        with self._lock:
            exact = self._entries.find("sha256", sha256) + self._entries.find("md5", md5)
        matches = [BankMatch(self.specs[entry.bank], entry, 0) for entry in exact]
        if any(found.spec.action == "block" for found in matches):
            return min(matches, key=_rank)
        if pdq is not None and pdq.usable:
            matches += self._near(pdq.hex)
        return min(matches, key=_rank, default=None)

    def counts(self) -> dict[str, int]:
        """Entries per bank, every bank named (0 for an empty one)."""
        with self._lock:
            return dict(self._counts)

    def rebuild(self) -> None:
        """Fold recent PDQ additions and removals into the index now (after a bulk load)."""
        self._pdq.rebuild()

    def _near(self, pdq_hex: str) -> list[BankMatch]:
        found = self._pdq.search(pdq_hex, self._max_threshold)
        near = [(self.specs[entry.bank], entry, distance) for entry, distance in found]
        return [BankMatch(*match) for match in near if match[2] <= match[0].pdq_threshold]


def _rank(found: BankMatch) -> tuple[int, int]:
    return _STRICTNESS[found.spec.action], found.distance


def _parse_key(key: bytes, specs: Mapping[str, BankSpec]) -> tuple[str, HashKind, str]:
    try:
        text = key.decode()
    except UnicodeDecodeError:
        raise ValueError("the key is not UTF-8") from None
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"{text[:200]!r} is not <bank>/<kind>/<value>")
    bank, kind, value = parts
    if bank not in specs:
        raise ValueError(f"unknown bank {bank[:100]!r}")
    check_hash(kind, value)
    return bank, kind, value  # type: ignore[return-value]  # check_hash checked the kind
