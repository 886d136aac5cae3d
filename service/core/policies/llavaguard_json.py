"""Reading a "llavaguard-json" answer: a JSON object with rating, category and rationale.

Models wrap the object in prose or code fences, write Python literals, single quotes and
trailing commas; the reader finds the object and reads it leniently, but never fills in what
the answer does not say.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal, NamedTuple

from service.core.errors import UnparseableModelOutput
from service.core.policies.assessment import Assessment, ModelIdentity, quoted
from service.core.policies.policy import Policy

# An answer object sits at the top of the output or inside a wrapper or two; looking deeper
# would only multiply the work on pathological input (every nested object is a candidate).
_MAX_CANDIDATE_DEPTH = 4

# Which reason a rejection gives, most useful first: what is wrong with the object that tried to
# be the answer, then truncation (generation cut by max_tokens), then anything else.
_ANSWER_WRONG, _TRUNCATED, _OTHER, _NOTHING = range(4)
_RATING = re.compile("rating", re.IGNORECASE)


def read_json_answer(text: str, policy: Policy) -> Assessment:
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
        return f"rating {quoted(rating)} is neither Safe nor Unsafe"
    if "category" not in obj:
        return "answer has no category"
    name = obj["category"]
    category = policy.category(name) if isinstance(name, str) else None
    if category is None:
        return f"category {quoted(name)} is not in policy {policy.id}"
    rationale = obj.get("rationale", "")
    if not isinstance(rationale, str):
        return f"rationale must be a string, not {quoted(rationale)}"
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
