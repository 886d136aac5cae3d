"""Policy files and the registry: reading and checking ``*.toml`` files into `Policy` objects.

The file format is described in the package docstring (`service.core.policies`). Every check
happens here, at start-up: a bad file raises ValueError naming the file and the problem, so the
answer readers can rely on a policy being consistent.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from service.core.errors import UnknownPolicy

ANSWER_FORMATS = ("llavaguard-json", "icm-yes-no")
"""Answer formats `parse_answer` can read; a policy file must name one of them."""

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
    safe = _category_named_by(data, "safe_category", categories)
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
    default = _category_named_by(data, "default_unsafe_category", categories)
    if default == safe:
        raise ValueError(f"default_unsafe_category {default.code!r} is the safe category")
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


def _category_named_by(
    table: dict[str, Any], key: str, categories: tuple[Category, ...]
) -> Category:
    """The category whose code `table[key]` holds."""
    code = _text(table, key)
    category = next((c for c in categories if c.code == code), None)
    if category is None:
        raise ValueError(f"{key} {code!r} is not the code of any category")
    return category


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
