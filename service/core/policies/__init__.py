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

Two answer formats: "llavaguard-json" (a JSON object with rating, category and rationale) and
"icm-yes-no" (ICM-Assistant: "Yes" or "No" first, then an explanation). A yes/no policy also
says which answer means Unsafe and which category an Unsafe answer gets when its explanation
names none of the policy's rules::

    answer_format = "icm-yes-no"
    unsafe_answer = "Yes"            # "Yes" or "No"; the other answer is Safe (safe_category)
    default_unsafe_category = "R00"  # a category code, not the safe one

Policies are read once at start-up; a bad file stops the service there (`ValueError`) rather than
failing events one by one. Reading an answer (`parse_answer`) is lenient about form and strict
about substance: the verdict must be written in the answer, never guessed.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from service.core.errors import UnknownPolicy, UnparseableModelOutput

ANSWER_FORMATS = ("llavaguard-json", "icm-yes-no")
"""Answer formats `parse_answer` can read; a policy file must name one of them."""

MAX_ANSWER_BYTES = 64 * 1024
"""Longer guard output is rejected unread: the scan below must stay cheap on any input."""

# An answer object sits at the top of the output or inside a wrapper or two; looking deeper
# would only multiply the work on pathological input (every nested object is a candidate).
_MAX_CANDIDATE_DEPTH = 4

_YES_NO_KEYS = frozenset({"unsafe_answer", "default_unsafe_category"})
_POLICY_KEYS = (
    frozenset({"id", "version", "answer_format", "safe_category", "prompt", "categories"})
    | _YES_NO_KEYS
)
_CATEGORY_KEYS = frozenset({"code", "label"})
_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAFE_ALIASES = ("n/a",)
_YES_NO = ("Yes", "No")


@dataclass(frozen=True)
class Category:
    """One category of a policy: `code` is what verdicts carry, `label` what the model sees."""

    code: str
    label: str


@dataclass(frozen=True)
class YesNoAnswers:
    """How a yes/no answer (answer_format "icm-yes-no") becomes an assessment.

    `unsafe_answer` ("Yes" or "No") is rated Unsafe, the other answer Safe with the policy's safe
    category. An Unsafe answer's category is the rule its explanation names (`named_rule`), else
    `default_category`. `rules` are the categories an explanation can name: all but the safe and
    the default one.
    """

    unsafe_answer: str
    default_category: Category
    rules: tuple[Category, ...]
    _codes: re.Pattern[str] | None = field(init=False, compare=False, repr=False)
    _names: re.Pattern[str] | None = field(init=False, compare=False, repr=False)
    _by_name: dict[str, Category] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.unsafe_answer not in _YES_NO:
            raise ValueError(f"unsafe_answer {self.unsafe_answer!r} is neither 'Yes' nor 'No'")
        if self.default_category in self.rules:
            raise ValueError("the default category cannot also be a rule an answer names")
        codes = [_prose_key(rule.code) for rule in self.rules]
        names = [_prose_key(_label_text(rule)) for rule in self.rules]
        by_name: dict[str, Category] = {}
        for key, rule in zip([*codes, *names], [*self.rules, *self.rules], strict=True):
            if by_name.setdefault(key, rule) != rule:
                raise ValueError(
                    f"rule name {key!r} would match both {by_name[key].code} and {rule.code}"
                )
        object.__setattr__(self, "_codes", _words_pattern(codes))
        object.__setattr__(self, "_names", _words_pattern(names))
        object.__setattr__(self, "_by_name", by_name)

    def named_rule(self, explanation: str) -> Category | None:
        """The rule `explanation` names, or None.

        Matching ignores case and reads "_", "-" and runs of whitespace as one space; a name
        counts only as whole words ("R07" but not "R070", "kiss" but not "kissing"). The first
        rule code in the explanation wins ("R25"); without any code, the first rule name does
        ("bite lips"): the prompt asks for the code, and a name can also occur as plain prose.
        """
        prose = _prose_key(explanation)
        for pattern in (self._codes, self._names):
            found = pattern.search(prose) if pattern is not None else None
            if found is not None:
                return self._by_name[found.group()]
        return None


@dataclass(frozen=True)
class Policy:
    """A moderation policy: the prompt to send and the categories an answer may name.

    `answer_format` says how `parse_answer` reads an answer; "icm-yes-no" policies carry the
    mapping of their answers in `yes_no` (and only they do).
    """

    id: str
    version: str
    prompt: str
    categories: tuple[Category, ...]
    safe_category: Category
    answer_format: str = "llavaguard-json"
    yes_no: YesNoAnswers | None = None

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format {self.answer_format!r} is not one of {ANSWER_FORMATS}")
        if (self.answer_format == "icm-yes-no") != (self.yes_no is not None):
            raise ValueError("yes_no is required with answer_format 'icm-yes-no', and only there")

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
    misplaced = sorted(_YES_NO_KEYS & set(data)) if answer_format != "icm-yes-no" else []
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only for answer_format 'icm-yes-no'")
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
        answer_format=answer_format,
        yes_no=_yes_no_answers(data, categories, safe) if answer_format == "icm-yes-no" else None,
    )


def _yes_no_answers(
    data: dict[str, Any], categories: tuple[Category, ...], safe: Category
) -> YesNoAnswers:
    code = _text(data, "default_unsafe_category")
    default = next((c for c in categories if c.code == code), None)
    if default is None:
        raise ValueError(f"default_unsafe_category {code!r} is not the code of any category")
    if default == safe:
        raise ValueError(f"default_unsafe_category {code!r} is the safe category")
    return YesNoAnswers(  # which checks unsafe_answer
        unsafe_answer=_text(data, "unsafe_answer"),
        default_category=default,
        rules=tuple(c for c in categories if c not in (safe, default)),
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


def _label_text(category: Category) -> str:
    """The label without its leading code: "bite lips" for "R25: bite lips"."""
    code, _, text = category.label.partition(":")
    return text.strip() if text.strip() and code.strip() == category.code else category.label


_NAME_SEPARATORS = re.compile(r"[\s_\-\u2010\u2011]+")


def _prose_key(text: str) -> str:
    """`text` lower-cased, with "_", hyphens and whitespace runs read as one space."""
    return _NAME_SEPARATORS.sub(" ", text.lower()).strip()


def _words_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern finding any of `names` as whole words (no letter or digit either side)."""
    unique = sorted({name for name in names if name}, key=lambda name: (-len(name), name))
    if not unique:
        return None
    alternatives = "|".join(re.escape(name) for name in unique)
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")


# --- Reading answers -----------------------------------------------------------------------------

# Which reason a rejection gives, most useful first: what is wrong with the object that tried to
# be the answer, then truncation (generation cut by max_tokens), then anything else.
_ANSWER_WRONG, _TRUNCATED, _OTHER, _NOTHING = range(4)
_RATING = re.compile("rating", re.IGNORECASE)


def parse_answer(text: str, policy: Policy) -> Assessment:
    """Read the guard's answer to `policy`'s prompt, in the policy's answer format.

    Raises UnparseableModelOutput, saying what is wrong, when the answer states no verdict:
    nothing is ever filled in. Answers longer than MAX_ANSWER_BYTES are refused unread.
    """
    # The length test first spares encoding a huge text just to measure it.
    if len(text) > MAX_ANSWER_BYTES or len(_utf8(text)) > MAX_ANSWER_BYTES:
        raise UnparseableModelOutput(
            f"answer is longer than {MAX_ANSWER_BYTES} bytes; not read", model_output=text
        )
    if policy.yes_no is not None:  # answer_format "icm-yes-no" (Policy checks the pairing)
        return _read_yes_no(text, policy, policy.yes_no)
    return _read_json_answer(text, policy)


def _read_json_answer(text: str, policy: Policy) -> Assessment:
    """Read a "llavaguard-json" answer.

    The answer is the first ``{...}`` in `text` that reads as an assessment, wherever it sits
    (alone, in a code fence, amid prose). Tolerated: single-quoted strings, trailing commas,
    True/False/None, any case for keys and the rating, a category named by label, code or label
    text. Extra keys are ignored, except ``"model": {"name": ..., "version": ...}``.

    Raises UnparseableModelOutput, saying what is wrong, when no rating or category can be read:
    nothing is ever filled in. Rating and category are not reconciled (see `Assessment`).
    """
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


# --- Reading yes/no answers ----------------------------------------------------------------------
#
# ICM-Assistant answers "Yes." or "No." and may go on to explain. Its own evaluations read the
# first token's Yes/No logits, or the first character; here the first word must be Yes or No.
# Every pattern below is anchored at one place and bounded, so the work stays linear in the text.

_LEAD = re.compile(r"[\W_]*")  # whitespace, punctuation, markdown before the answer word
_FIRST_WORD = re.compile(r"[^\W_]+")  # letters and digits
_SHOWN_WORD = re.compile(r"\S{1,40}")
# "No-one", "Yes-man", "Yes/No", "No's": the word goes on, so it is not the answer Yes or No.
_COMPOUND = re.compile(r"[-/'\u2010\u2011\u2019][^\W_]")
# "Yes or no", "No, and yes", "yes / no": both answers, which is none.
_BOTH = re.compile(r"[\W_]{0,8}?(?:\b(?:or|and|nor)\b|/)[\W_]{0,8}(?:yes|no)(?![^\W_])", re.I)
# Between the answer word and the explanation: anything but letters, digits and opening brackets.
_EXPLANATION_START = re.compile(r"(?:[^\w(\[{<\u00ab\u2018\u201c]|_)*")


def _read_yes_no(text: str, policy: Policy, yes_no: YesNoAnswers) -> Assessment:
    """Read an "icm-yes-no" answer: Yes or No first, then (optionally) the explanation.

    Lenient about form: any case ("YES", "yes"), and anything but letters and digits before the
    word or right after it (whitespace, "**Yes**", "> No", "Yes.", "No, but ..."). Strict about
    substance: the first word must be exactly Yes or No ("Yesterday", "Nope", "Not sure",
    "No-one", "Yes/No", "Yes or no" are refused). The rationale is the explanation after the
    word, trimmed; an Unsafe answer's category is the rule it names (`YesNoAnswers.named_rule`),
    else the policy's default; the other answer's category is the safe one.
    """
    start = _LEAD.match(text)
    word = _FIRST_WORD.match(text, start.end() if start else 0)
    if word is None:
        reason = "answer is empty" if not text.strip() else "answer has no Yes or No"
        raise UnparseableModelOutput(reason, model_output=text)
    said = word.group()
    if said.lower() not in ("yes", "no") or not said.isascii() or _COMPOUND.match(text, word.end()):
        shown = _SHOWN_WORD.match(text, word.start())
        first = shown.group() if shown else said
        raise UnparseableModelOutput(
            f"answer starts with {_show(first)}, not with Yes or No", model_output=text
        )
    if _BOTH.match(text, word.end()):
        raise UnparseableModelOutput("answer says both Yes and No", model_output=text)
    rest = text[word.end() :]
    skipped = _EXPLANATION_START.match(rest)
    rationale = _trim_explanation(rest[skipped.end() if skipped else 0 :])
    if said.lower() != yes_no.unsafe_answer.lower():
        return Assessment("Safe", policy.safe_category, rationale, None)
    category = yes_no.named_rule(rationale) or yes_no.default_category
    return Assessment("Unsafe", category, rationale, None)


def _trim_explanation(text: str) -> str:
    trimmed = text.rstrip()
    if trimmed.endswith("```"):  # the answer sat in a code fence
        trimmed = trimmed[:-3].rstrip()
    return trimmed
