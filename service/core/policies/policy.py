"""Policies and the registry: what a policy asks the guard, and how its answers are named.

Reading and checking the ``*.toml`` files is `service.core.policies.files`; the file format is
described in the package docstring (`service.core.policies`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.core.decisions import DecisionRules
from service.core.policies.prompt import PromptParts

ANSWER_FORMATS = ("llavaguard-json", "icm-yes-no")
"""Answer formats `parse_answer` can read; a policy file must name one of them."""

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
    """A moderation policy: the prompt to send, the categories an answer may name, and the
    rules that turn an answer into an action.

    `answer_format` says how `parse_answer` reads an answer; "icm-yes-no" policies carry the
    mapping of their answers in `yes_no` (and only they do). `prompt` is the text sent, already
    assembled from `parts` with `exceptions` declared non-violating where the policy has parts.
    `extends` names the policy this one was derived from.
    """

    id: str
    version: str
    prompt: str
    categories: tuple[Category, ...]
    safe_category: Category
    answer_format: str = "llavaguard-json"
    yes_no: YesNoAnswers | None = None
    parts: PromptParts | None = None
    exceptions: frozenset[str] = frozenset()
    decision: DecisionRules = field(default_factory=DecisionRules)
    extends: str | None = None
    fingerprint: str = field(init=False, compare=False)
    """12 hex digits of SHA-256 over everything that changes what a verdict says."""

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format {self.answer_format!r} is not one of {ANSWER_FORMATS}")
        if (self.answer_format == "icm-yes-no") != (self.yes_no is not None):
            raise ValueError("yes_no is required with answer_format 'icm-yes-no', and only there")
        identity = {
            "prompt": self.prompt,
            "answer_format": self.answer_format,
            "categories": [[c.code, c.label] for c in self.categories],
            "safe_category": self.safe_category.code,
            "unsafe_answer": self.yes_no.unsafe_answer if self.yes_no else None,
            "default_unsafe_category": self.yes_no.default_category.code if self.yes_no else None,
            "decision": self.decision.canonical(),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8"))
        object.__setattr__(self, "fingerprint", digest.hexdigest()[:12])

    @property
    def full_version(self) -> str:
        """What verdicts carry as `policy_version`: "1.2.1+3f2a9c1d0b7e".

        The file's version for people, the fingerprint for certainty: two policies that ask the
        model differently, read its answer differently or decide differently never share one.
        """
        return f"{self.version}+{self.fingerprint}"

    def render_prompt(self) -> str:
        """The text sent to the model as `text_input`."""
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


def check_names_unique(categories: Iterable[Category], safe: Category) -> None:
    """Raises ValueError when two categories share a name: answers are matched leniently, so
    each name must lead to one category only."""
    owners: dict[str, str] = {}
    for category in categories:
        for name in _names(category, safe=category == safe):
            if owners.setdefault(name, category.code) != category.code:
                raise ValueError(
                    f"category name {name!r} would match both {owners[name]} and {category.code}"
                )


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
