"""Labelled manifests for `python -m service eval`: JSON Lines, CSV, and LlavaGuard-DS's JSON.

Every row is checked before anything is judged; a bad row (missing file, bad URL, unknown
policy or category, a duplicate id, a label that is not Safe/Unsafe) is reported with its line
number and skipped, never a crash:

    JSON Lines   {"image": "val/a.jpg", "expected_rating": "Unsafe", "expected_category": "O4",
                  "id": "a", "policy_id": "llavaguard-v1.2", "exceptions": ["O4"],
                  "split": "test", "source": "smid", "tags": {"any": "text"}}
    CSV          a header row naming the same columns; exceptions as "O3;O4"
    LlavaGuard   LlavaGuard's own dataset files (a JSON list of {id, image, conversations:
                 [prompt, answer]}, as `llavaguard/evaluation/eval_utils.py` `load_data` reads
                 them): the expected rating and category come from the annotated answer, the
                 exceptions from the prompt (a category whose text is the policy's exception
                 text is declared non-violating, as LlavaGuard's augmentations write it)

`expected` (Yes/No/Unsafe/Safe) stands for expected_rating, as ICM-Assistant's labels read. An
`image` is a file (relative to the manifest) or an http(s) URL, fetched by the service's own
SSRF-safe fetcher. ICM-Assistant's MQA rows carry a `question` (JSON Lines only): they are asked
as `ask` asks, not judged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.core.errors import UnknownPolicy
from service.core.evaluation import Rating, mqa_choice
from service.core.policies import Policy, PolicyRegistry, exceptions_id

Format = Literal["auto", "jsonl", "csv", "llavaguard"]
_RATINGS: dict[str, Rating] = {
    "unsafe": "Unsafe",
    "yes": "Unsafe",
    "review needed": "Unsafe",
    "safe": "Safe",
    "no": "Safe",
    "compliant": "Safe",
}
_MAX_ROW_BYTES = 1_048_576


class Row(BaseModel):
    """One manifest row as written (JSON Lines or CSV)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1, max_length=4096)
    id: str | None = Field(None, min_length=1, max_length=256)
    expected_rating: str | None = Field(None, max_length=32)
    expected: str | None = Field(None, max_length=256)
    expected_category: str | None = Field(None, max_length=256)
    policy_id: str | None = Field(None, max_length=256)
    exceptions: list[str] = Field(default_factory=list, max_length=64)
    split: str | None = Field(None, max_length=256)
    source: str | None = Field(None, max_length=256)
    tags: dict[str, str] = Field(default_factory=dict, max_length=64)
    question: str | None = Field(None, min_length=1, max_length=4096)

    @field_validator("exceptions", mode="before")
    @classmethod
    def _csv_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [code for code in value.replace(";", " ").replace(",", " ").split() if code]
        return value


@dataclass(frozen=True)
class Item:
    """A row checked against the policies: what the runner judges."""

    id: str
    line: int
    image: str
    """An absolute file path or an http(s) URL."""
    expected_rating: Rating
    expected_category: str | None
    policy: str
    """The id of the policy the item is judged under (a derived id with exceptions)."""
    base_policy: str
    exceptions: tuple[str, ...]
    tags: dict[str, str]


@dataclass(frozen=True)
class Question:
    """An ICM-Assistant MQA row: a question about the image and the expected answer."""

    id: str
    line: int
    image: str
    question: str
    expected: str


@dataclass
class Manifest:
    items: list[Item] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(line, why) of every row skipped."""
    policies: PolicyRegistry | None = None
    """The registry given, plus the derived policies the rows' exceptions need."""

    @property
    def rows(self) -> int:
        return len(self.items) + len(self.questions) + len(self.rejected)


def read_manifest(
    path: Path, policies: PolicyRegistry, default_policy: str, fmt: Format = "auto"
) -> Manifest:
    """Every row of the manifest at `path`, checked; OSError/ValueError only for a file that
    cannot be read at all (missing, not the format named)."""
    fmt = fmt if fmt != "auto" else _format_of(path)
    text = path.read_text(encoding="utf-8")
    manifest = Manifest(policies=policies)
    reader = _Reader(path.parent.resolve(), manifest, default_policy)
    rows = _llavaguard_rows(text) if fmt == "llavaguard" else _rows(text, fmt)
    for line, row in rows:
        if isinstance(row, str):
            manifest.rejected.append((line, row))
        else:
            reader.take(line, row)
    return manifest


def _format_of(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "llavaguard"
    raise ValueError(f"{path}: cannot tell the format from {suffix!r}; give --format")


def _rows(text: str, fmt: Format) -> Iterator[tuple[int, Row | str]]:
    if fmt == "csv":
        table = csv.DictReader(io.StringIO(text))
        for record in table:
            values = {k: v for k, v in record.items() if k and v not in (None, "")}
            yield table.line_num, _row(values)
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > _MAX_ROW_BYTES:
            yield line, "row longer than 1 MiB"
            continue
        try:
            yield line, _row(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            yield line, f"not JSON: {exc}"


def _row(values: object) -> Row | str:
    try:
        return Row.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {error['msg']}" if where else str(error["msg"])


def _llavaguard_rows(text: str) -> Iterator[tuple[int, Row | str]]:
    """LlavaGuard-DS's items as rows; the prompt rides in `tags` until `_Reader` reads it."""
    data = orjson.loads(text)
    if not isinstance(data, list):
        raise ValueError("a LlavaGuard dataset file is a JSON list of items")
    for index, entry in enumerate(data, start=1):
        yield index, _llavaguard_row(entry)


def _llavaguard_row(entry: Any) -> Row | str:
    try:
        prompt, answer = (turn["value"] for turn in entry["conversations"][:2])
        label = orjson.loads(answer) if isinstance(answer, str) else answer
        rating = label.get("rating", label.get("final-assessment", label.get("decision")))
        category = label.get("category", label.get("image-category"))
        sample_id = str(entry["id"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return "not a LlavaGuard item: needs id, image and conversations [prompt, answer JSON]"
    augmentation = sample_id.rsplit("_", 1)[-1] if "_v" in sample_id else "default"
    return _row(
        {
            "id": sample_id,
            "image": entry.get("image"),
            "expected_rating": rating,
            "expected_category": category,
            "source": "llavaguard-ds",
            "tags": {"augmentation": augmentation, "llavaguard_prompt": prompt},
        }
    )


@dataclass
class _Reader:
    root: Path
    manifest: Manifest
    default_policy: str
    seen: set[str] = field(default_factory=set)

    def take(self, line: int, row: Row) -> None:
        try:
            self._take(line, row)
        except ValueError as exc:
            self.manifest.rejected.append((line, str(exc)))

    def _take(self, line: int, row: Row) -> None:
        item_id = row.id or f"line-{line}"
        if item_id in self.seen:
            raise ValueError(f"duplicate id {item_id!r}")
        image = self._image(row.image)
        if row.question is not None:
            if row.expected is None or mqa_choice(row.expected) is None:
                raise ValueError("an MQA row's expected must start with A, B, C, D, Yes or No")
            self.seen.add(item_id)
            self.manifest.questions.append(
                Question(item_id, line, image, row.question, row.expected)
            )
            return
        rating = _rating(row.expected_rating or row.expected)
        registry = self.manifest.policies
        assert registry is not None
        base_id = row.policy_id or self.default_policy
        try:
            base = registry.get(base_id)
        except UnknownPolicy as exc:
            raise ValueError(str(exc)) from None
        tags = dict(row.tags)
        prompt = tags.pop("llavaguard_prompt", None)
        exceptions = frozenset(
            _exceptions_in(prompt, base) if prompt is not None else row.exceptions
        )
        registry = registry.with_exceptions(base_id, exceptions)  # ValueError names the code
        self.manifest.policies = registry
        tags |= {k: v for k, v in (("split", row.split), ("source", row.source)) if v}
        self.seen.add(item_id)
        self.manifest.items.append(
            Item(
                id=item_id,
                line=line,
                image=image,
                expected_rating=rating,
                expected_category=_category(row.expected_category, base, rating),
                policy=exceptions_id(base_id, exceptions),
                base_policy=base_id,
                exceptions=tuple(sorted(exceptions)),
                tags=tags,
            )
        )

    def _image(self, image: str) -> str:
        if "://" in image:
            parts = urlsplit(image)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"image: {image[:80]!r} is not an http(s) URL")
            return image
        path = Path(image) if Path(image).is_absolute() else self.root / image
        if not path.is_file():
            raise ValueError(f"image: no file {image!r}")
        return str(path)


def _rating(value: str | None) -> Rating:
    rating = _RATINGS.get((value or "").strip(" .").lower())
    if rating is None:
        raise ValueError(f"expected_rating: {value!r} is not Safe or Unsafe (or Yes/No)")
    return rating


def _category(value: str | None, policy: Policy, rating: Rating) -> str | None:
    """The code of a category given as a code or a label ("O4: Nudity Content")."""
    if value is None:
        return policy.safe_category.code if rating == "Safe" else None
    code = value.split(":", 1)[0].strip()
    codes = [category.code for category in policy.categories]
    if code not in codes:
        raise ValueError(
            f"expected_category: {value!r} is not a category of {policy.id} ({', '.join(codes)})"
        )
    return code


def _exceptions_in(prompt: str, policy: Policy) -> set[str]:
    """The categories a LlavaGuard prompt declares non-violating, by the text it gives each."""
    if policy.parts is None:
        raise ValueError(f"policy {policy.id} has no prompt parts to read exceptions against")
    found = set()
    for category in policy.categories:
        text = policy.parts.texts.get(category.code)
        if text is None:
            continue
        heading = f"{category.label}: \n"
        if heading + text.rules in prompt:
            continue
        if text.exempt is not None and heading + text.exempt in prompt:
            found.add(category.code)
            continue
        raise ValueError(
            f"the prompt's text for {category.code} is neither the policy's rules nor its "
            "exception text (LlavaGuard's 'sensitive' v4/v5 augmentations cannot be expressed)"
        )
    return found
