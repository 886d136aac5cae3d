"""Moderation policies: policy files → the prompt sent to the guard → the guard's answer, read.

A policy file is TOML (``service/policies/*.toml``, plus an operator's own directory)::

    id = "llavaguard-v1.2"          # what events name in `policy_id`; the file name is free
    version = "1.2.0"               # bumped whenever the prompt or the categories change
    answer_format = "llavaguard-json"
    safe_category = "NA"            # code of the category that means "nothing applies"
    prompt = '''...'''              # literal string: sent to the model exactly as written
    [[categories]]
    code = "O1"
    label = "O1: Hate, Humiliation, Harassment"

Policies are read once at start-up; a bad file stops the service there (`ValueError`) rather than
failing events one by one. Reading an answer (`parse_answer`) is lenient about form and strict
about substance: the verdict must be written in the answer, never guessed.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from service.errors import UnknownPolicy, UnparseableModelOutput

ANSWER_FORMATS = ("llavaguard-json",)
"""Answer formats `parse_answer` can read; a policy file must name one of them."""

MAX_ANSWER_BYTES = 64 * 1024
"""Longer guard output is rejected unread: the scan below must stay cheap on any input."""

# An answer object sits at the top of the output or inside a wrapper or two; looking deeper
# would only multiply the work on pathological input (every nested object is a candidate).
_MAX_CANDIDATE_DEPTH = 4

_POLICY_KEYS = frozenset(
    {"id", "version", "answer_format", "safe_category", "prompt", "categories"}
)
_CATEGORY_KEYS = frozenset({"code", "label"})
_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAFE_ALIASES = ("n/a",)


@dataclass(frozen=True)
class Category:
    """One category of a policy: `code` is what verdicts carry, `label` what the model sees."""

    code: str
    label: str


@dataclass(frozen=True)
class Policy:
    """A moderation policy: the prompt to send and the categories an answer may name."""

    id: str
    version: str
    prompt: str
    categories: tuple[Category, ...]
    safe_category: Category

    def render_prompt(self) -> str:
        """The text sent to the model as `text_input`: the prompt exactly as stored."""
        return self.prompt

    def category(self, name: str) -> Category | None:
        """The category `name` refers to, or None.

        Matches the full label ("O4: Nudity Content"), the code ("o4") or the label without its
        code ("Nudity Content"), ignoring case and spacing; "N/A" also names the safe category.
        """
        wanted = _name_key(name)
        for category in self.categories:
            if wanted in _names(category, safe=category == self.safe_category):
                return category
        return None


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced an answer, when the answer says so."""

    name: str
    version: str


@dataclass(frozen=True)
class Assessment:
    """The guard's verdict as the answer states it.

    `rating` and `category` are kept exactly as the model gave them, even when they disagree
    (a "Safe" rating with category O4): reconciling them would be inventing a verdict.
    """

    rating: Literal["Safe", "Unsafe"]
    category: Category
    rationale: str
    model: ModelIdentity | None


class PolicyRegistry:
    """Policies by id, loaded once at start-up."""

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self._policies = dict(policies)

    @classmethod
    def load(cls, extra_dir: Path | None = None) -> PolicyRegistry:
        """The packaged policies, plus the ``*.toml`` files in `extra_dir`.

        A policy in `extra_dir` replaces a packaged one with the same id. Raises ValueError,
        naming the file and the problem, for any file that is not a valid policy.
        """
        policies = _load_dir(files("service") / "policies")
        if extra_dir is not None:
            if not extra_dir.is_dir():
                raise ValueError(f"policy directory {extra_dir} does not exist")
            policies |= _load_dir(extra_dir)
        return cls(policies)

    def get(self, policy_id: str) -> Policy:
        """The policy with id `policy_id`; UnknownPolicy if there is none."""
        try:
            return self._policies[policy_id]
        except KeyError:
            known = ", ".join(self.ids()) or "none"
            raise UnknownPolicy(f"unknown policy {policy_id!r}; known policies: {known}") from None

    def ids(self) -> tuple[str, ...]:
        """Every policy id, sorted."""
        return tuple(sorted(self._policies))


# --- Loading -------------------------------------------------------------------------------------


def _load_dir(directory: Traversable) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    sources: dict[str, str] = {}
    toml_files = (f for f in directory.iterdir() if f.name.endswith(".toml") and f.is_file())
    for file in sorted(toml_files, key=lambda f: f.name):
        source = str(file)
        policy = _read_policy(file.read_bytes(), source)
        if policy.id in policies:
            # Two files in one place claiming one id: which one wins would depend on file names.
            raise ValueError(
                f"{source}: policy id {policy.id!r} is also defined in {sources[policy.id]}"
            )
        policies[policy.id] = policy
        sources[policy.id] = source
    return policies


def _read_policy(raw: bytes, source: str) -> Policy:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        return _policy_from_data(data)
    except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
        raise ValueError(f"{source}: {exc}") from exc


def _policy_from_data(data: dict[str, Any]) -> Policy:
    _check_keys(data, _POLICY_KEYS, "policy")
    policy_id = _text(data, "id")
    if not _POLICY_ID.fullmatch(policy_id):
        raise ValueError(f"id {policy_id!r} may hold only letters, digits, '.', '_' and '-'")
    answer_format = _text(data, "answer_format")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
    categories = _categories(data.get("categories"))
    safe_code = _text(data, "safe_category")
    safe = next((c for c in categories if c.code == safe_code), None)
    if safe is None:
        raise ValueError(f"safe_category {safe_code!r} is not the code of any category")
    _check_names_unique(categories, safe)
    return Policy(
        id=policy_id,
        version=_text(data, "version"),
        prompt=_text(data, "prompt"),
        categories=categories,
        safe_category=safe,
    )


def _categories(value: object) -> tuple[Category, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("categories must be a non-empty array of tables ([[categories]])")
    categories = []
    for entry in value:
        if not isinstance(entry, dict):
            raise ValueError("each entry of categories must be a table with code and label")
        _check_keys(entry, _CATEGORY_KEYS, "category")
        categories.append(Category(code=_text(entry, "code"), label=_text(entry, "label")))
    return tuple(categories)


def _check_names_unique(categories: Iterable[Category], safe: Category) -> None:
    # Answers are matched leniently, so each name must lead to one category only.
    owners: dict[str, str] = {}
    for category in categories:
        for name in _names(category, safe=category == safe):
            if owners.setdefault(name, category.code) != category.code:
                raise ValueError(
                    f"category name {name!r} would match both {owners[name]} and {category.code}"
                )


def _check_keys(table: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} key(s): {', '.join(unknown)}")


def _text(table: dict[str, Any], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _names(category: Category, *, safe: bool) -> frozenset[str]:
    """Every spelling, normalised by `_name_key`, that refers to `category`."""
    code, label = _name_key(category.code), _name_key(category.label)
    names = {code, label}
    if label.startswith(f"{code}: "):
        names.add(label.removeprefix(f"{code}: "))
    if safe:
        names.update(_SAFE_ALIASES)
    return frozenset(names)


def _name_key(name: str) -> str:
    # "O4 : Nudity  Content:" (the header line form) and "o4: nudity content" are one name.
    spaced = re.sub(r"\s*:\s*", ": ", name.lower())
    return " ".join(spaced.split()).rstrip(": ")


# --- Reading answers -----------------------------------------------------------------------------

# Which reason a rejection gives, most useful first: what is wrong with the object that tried to
# be the answer, then truncation (generation cut by max_tokens), then anything else.
_ANSWER_WRONG, _TRUNCATED, _OTHER, _NOTHING = range(4)
_RATING = re.compile("rating", re.IGNORECASE)


def parse_answer(text: str, policy: Policy) -> Assessment:
    """Read the guard's answer to `policy`'s prompt.

    The answer is the first ``{...}`` in `text` that reads as an assessment, wherever it sits
    (alone, in a code fence, amid prose). Tolerated: single-quoted strings, trailing commas,
    True/False/None, any case for keys and the rating, a category named by label, code or label
    text. Extra keys are ignored, except ``"model": {"name": ..., "version": ...}``.

    Raises UnparseableModelOutput, saying what is wrong, when no rating or category can be read:
    nothing is ever filled in. Rating and category are not reconciled (see `Assessment`).
    """
    # The length test first spares encoding a huge text just to measure it.
    if len(text) > MAX_ANSWER_BYTES or len(_utf8(text)) > MAX_ANSWER_BYTES:
        raise UnparseableModelOutput(
            f"answer is longer than {MAX_ANSWER_BYTES} bytes; not read", model_output=text
        )
    spans, unclosed = _object_spans(text)
    problems: list[tuple[int, str]] = []
    for start, end in spans:
        if not _RATING.search(text, start, end):
            continue  # cheap test first: a long output can hold thousands of small objects
        result = _read_candidate(text[start:end], policy)
        if isinstance(result, Assessment):
            return result
        problems.append(result)
    if unclosed:
        problems.append((_TRUNCATED, "JSON object is not closed; the answer looks truncated"))
    problems.append(
        (_NOTHING, "no JSON object with a rating found" if spans else "no JSON object found")
    )
    reason = min(problems, key=lambda problem: problem[0])[1]
    raise UnparseableModelOutput(reason, model_output=text)


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate must count toward the limit, not raise.
    return text.encode("utf-8", "surrogatepass")


def _read_candidate(fragment: str, policy: Policy) -> Assessment | tuple[int, str]:
    """The assessment `fragment` states, or the rank and sentence of why it states none."""
    obj = _load_object(fragment)
    if obj is None:
        return _OTHER, "the object that mentions a rating is not valid JSON"
    result = _assessment(obj, policy)
    if isinstance(result, Assessment):
        return result
    return (_ANSWER_WRONG if "rating" in obj else _OTHER), result


def _assessment(obj: dict[str, object], policy: Policy) -> Assessment | str:
    """The assessment `obj` states, or a sentence saying why it states none."""
    if "rating" not in obj:
        return "answer has no rating"
    rating = obj["rating"]
    normalised = rating.strip().lower() if isinstance(rating, str) else None
    if normalised not in ("safe", "unsafe"):
        return f"rating {_show(rating)} is neither Safe nor Unsafe"
    if "category" not in obj:
        return "answer has no category"
    name = obj["category"]
    category = policy.category(name) if isinstance(name, str) else None
    if category is None:
        return f"category {_show(name)} is not in policy {policy.id}"
    rationale = obj.get("rationale", "")
    if not isinstance(rationale, str):
        return f"rationale must be a string, not {_show(rationale)}"
    return Assessment(
        rating="Safe" if normalised == "safe" else "Unsafe",
        category=category,
        rationale=rationale,
        model=_model_identity(obj.get("model")),
    )


def _model_identity(value: object) -> ModelIdentity | None:
    # Optional metadata: a malformed value costs the identity, not the verdict.
    if not isinstance(value, dict):
        return None
    name, version = value.get("name"), value.get("version")
    if isinstance(name, str) and isinstance(version, str):
        return ModelIdentity(name=name, version=version)
    return None


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def _load_object(fragment: str) -> dict[str, object] | None:
    """`fragment` ({...}) as a dict with lower-cased keys, or None if it does not decode."""
    try:
        # strict=False: models put raw newlines and tabs inside strings.
        value = json.loads(_to_json(fragment), strict=False)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    return {key.strip().lower(): item for key, item in value.items()}


# --- Scanning ------------------------------------------------------------------------------------
#
# Outside any object the text is prose: quotes and apostrophes there mean nothing. Inside, a quote
# opens a string only where JSON allows one (after { [ , :), and closes it only where JSON could
# go on (before , : } ] or the end). Strict JSON always reads the same under these rules; they
# also keep "the dog's" and unescaped inner quotes from derailing the brace count.


_TokenKind = Literal["{", "}", ",", "string", "word", "space", "other"]


class _Token(NamedTuple):
    kind: _TokenKind
    start: int
    end: int


_PUNCTUATION: dict[str, _TokenKind] = {"{": "{", "}": "}", ",": ","}
_STRING_OPENERS = frozenset("{[,:")
_STRING_CLOSERS = frozenset(",:}]")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z_]\w*")
_PYTHON_WORDS = {"True": "true", "False": "false", "None": "null"}
_DANGLING_COMMA = re.compile(r",\s*[}\]]")
_ESCAPE_OR_QUOTE = re.compile(r'\\(.)|"', re.DOTALL)


def _object_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """(start, end) of each balanced {...} in `text`, outermost first, and whether one is unclosed.

    Objects nested `_MAX_CANDIDATE_DEPTH` deep or more are not listed.
    """
    spans: list[tuple[int, int]] = []
    position = text.find("{")
    while position >= 0:
        found, end = _spans_in_object(text, position)
        spans.extend(found)
        if end is None:
            return sorted(spans), True
        position = text.find("{", end)
    return sorted(spans), False


def _spans_in_object(text: str, start: int) -> tuple[list[tuple[int, int]], int | None]:
    """Spans of the object at `start` and of those inside it, and where it ends (None: never)."""
    spans: list[tuple[int, int]] = []
    opened: list[int] = []
    for token in _tokens(text, start):
        if token.kind == "{":
            opened.append(token.start)
        elif token.kind == "}":
            object_start = opened.pop()
            if len(opened) < _MAX_CANDIDATE_DEPTH:
                spans.append((object_start, token.end))
            if not opened:
                return spans, token.end
    return spans, None


def _tokens(text: str, position: int) -> Iterator[_Token]:
    """Tokens of `text` from `position`, which is inside an object; stops in an unclosed string."""
    previous = ""
    while position < len(text):
        char = text[position]
        kind: _TokenKind
        if char in "\"'" and previous in _STRING_OPENERS:
            end = _string_end(text, position)
            if end < 0:
                return
            kind = "string"
        elif space := _SPACE.match(text, position):
            end, kind = space.end(), "space"
        elif word := _WORD.match(text, position):
            end, kind = word.end(), "word"
        else:
            end, kind = position + 1, _PUNCTUATION.get(char, "other")
        if kind != "space":
            previous = text[end - 1]
        yield _Token(kind, position, end)
        position = end


def _string_end(text: str, start: int) -> int:
    """Index just past the string whose quote is at `start`, or -1 if the text ends inside it."""
    quote = text[start]
    position = start + 1
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
        elif char == quote and _can_follow_string(text, position + 1):
            return position + 1
        else:
            position += 1
    return -1


def _can_follow_string(text: str, position: int) -> bool:
    space = _SPACE.match(text, position)
    position = space.end() if space else position
    return position == len(text) or text[position] in _STRING_CLOSERS


def _to_json(fragment: str) -> str:
    """`fragment` with its Python-isms rewritten as JSON; other text is left for json to judge."""
    parts = []
    for token in _tokens(fragment, 0):
        lexeme = fragment[token.start : token.end]
        if token.kind == "string":
            parts.append(_json_string(lexeme[1:-1]))
        elif token.kind == "word":
            parts.append(_PYTHON_WORDS.get(lexeme, lexeme))
        elif token.kind == "," and _DANGLING_COMMA.match(fragment, token.start):
            continue
        else:
            parts.append(lexeme)
    return "".join(parts)


def _json_string(body: str) -> str:
    """A JSON string literal holding `body`, the inside of a single- or double-quoted string."""
    return '"' + _ESCAPE_OR_QUOTE.sub(_fix_escape, body) + '"'


def _fix_escape(match: re.Match[str]) -> str:
    if match.group(0) == '"':
        return '\\"'
    # \' is valid in Python strings, not in JSON; every other escape is left for json to judge.
    return "'" if match.group(1) == "'" else match.group(0)
