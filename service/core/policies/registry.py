"""Policy files → checked `Policy` objects, by id: the registry the pipeline asks.

Files are read whole and checked before anything is used: a bad file raises ValueError naming
the file and the key (or TOML's line and column) and what is wrong, so a service refuses to
start with it and a reload keeps the previous policies. A policy may extend another
(`extends`), inheriting its prompt parts, categories and decision rules, declaring its own
exceptions and overriding decision keys; cycles and missing parents are refused.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from service.core.decisions import DecisionRules, rules_from_table
from service.core.errors import UnknownPolicy
from service.core.policies.policy import (
    ANSWER_FORMATS,
    Category,
    Policy,
    YesNoAnswers,
    check_names_unique,
)
from service.core.policies.prompt import CategoryText, PromptParts, assemble

_YES_NO_KEYS = frozenset({"unsafe_answer", "default_unsafe_category"})
_PARTS_KEYS = frozenset({"preamble", "closing"})
_COMMON_KEYS = frozenset({"id", "version", "exceptions", "decision"})
_BASE_KEYS = (
    _COMMON_KEYS
    | {"answer_format", "safe_category", "prompt", "categories"}
    | _PARTS_KEYS
    | _YES_NO_KEYS
)
_DERIVED_KEYS = _COMMON_KEYS | {"extends"}
_CATEGORY_KEYS = frozenset({"code", "label", "text", "exception_text"})
_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PolicyRegistry:
    """Policies by id, loaded at start-up and again whenever their files change."""

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self._policies = dict(policies)

    @classmethod
    def load(cls, extra_dir: Path | None = None) -> PolicyRegistry:
        """The packaged policies, plus the ``*.toml`` files in `extra_dir`.

        A policy in `extra_dir` replaces a packaged one with the same id, and may extend one.
        Raises ValueError, naming the file and the problem, for any file that is not a valid
        policy.
        """
        sources = _read_dir(files("service") / "policies")
        if extra_dir is not None:
            if not extra_dir.is_dir():
                raise ValueError(f"policy directory {extra_dir} does not exist")
            sources |= _read_dir(extra_dir)
        resolved: dict[str, Policy] = {}
        for policy_id in sources:
            _resolve(policy_id, sources, resolved, ())
        return cls(resolved)

    @classmethod
    def policy_in(cls, path: Path) -> Policy:
        """The policy the file at `path` defines, resolved with its siblings and the packaged
        policies (a derived policy needs its parent): for tools handed one policy file."""
        policy_id = _text(tomllib.loads(path.read_text(encoding="utf-8")), "id")
        return cls.load(path.parent).get(policy_id)

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

    def with_exceptions(self, policy_id: str, exceptions: frozenset[str]) -> PolicyRegistry:
        """This registry plus the policy `policy_id` with `exceptions` declared non-violating,
        as a policy file saying `extends` and `exceptions` would derive it; its id is
        `exceptions_id(policy_id, exceptions)`. ValueError for a code without exception text."""
        parent = self.get(policy_id)
        derived_id = exceptions_id(policy_id, exceptions)
        if not exceptions or derived_id in self._policies:
            return self
        data = {"id": derived_id, "version": parent.version, "exceptions": sorted(exceptions)}
        return PolicyRegistry({**self._policies, derived_id: _derived_policy(data, parent)})


def exceptions_id(policy_id: str, exceptions: frozenset[str]) -> str:
    """The id of `policy_id` with `exceptions`, e.g. llavaguard-v1.2.except-O3-O4: only
    characters an event's policy_id may hold, so events can name it."""
    return f"{policy_id}.except-{'-'.join(sorted(exceptions))}" if exceptions else policy_id


@dataclass(frozen=True)
class _Source:
    """One policy file, parsed as TOML but not yet checked."""

    path: str
    data: dict[str, Any]


def _read_dir(directory: Traversable) -> dict[str, _Source]:
    sources: dict[str, _Source] = {}
    toml_files = (f for f in directory.iterdir() if f.name.endswith(".toml") and f.is_file())
    for file in sorted(toml_files, key=lambda f: f.name):
        path = str(file)
        try:
            data = tomllib.loads(file.read_bytes().decode("utf-8"))
            policy_id = _text(data, "id")
            if not _POLICY_ID.fullmatch(policy_id):
                raise ValueError(
                    f"id {policy_id!r} may hold only letters, digits, '.', '_' and '-'"
                )
        except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
            raise ValueError(f"{path}: {exc}") from exc
        if policy_id in sources:
            # Two files in one place claiming one id: which one wins would depend on file names.
            raise ValueError(
                f"{path}: policy id {policy_id!r} is also defined in {sources[policy_id].path}"
            )
        sources[policy_id] = _Source(path, data)
    return sources


def _resolve(
    policy_id: str,
    sources: Mapping[str, _Source],
    resolved: dict[str, Policy],
    chain: tuple[str, ...],
) -> Policy:
    """The policy `policy_id`, its parents resolved first; `chain` is who asked, for cycles."""
    if policy_id in resolved:
        return resolved[policy_id]
    source = sources[policy_id]
    try:
        parent_id = source.data.get("extends")
        if parent_id is None:
            policy = _base_policy(source.data)
        else:
            if not isinstance(parent_id, str) or parent_id not in sources:
                known = ", ".join(sorted(sources))
                raise ValueError(f"extends {parent_id!r}: no such policy (known: {known})")
            if parent_id in (*chain, policy_id):
                cycle = " → ".join((*chain, policy_id, parent_id))
                raise ValueError(f"extends: a cycle ({cycle})")
            parent = _resolve(parent_id, sources, resolved, (*chain, policy_id))
            policy = _derived_policy(source.data, parent)
    except ValueError as exc:
        if str(exc).startswith(source.path):  # a parent's error, already placed
            raise
        raise ValueError(f"{source.path}: {exc}") from exc
    resolved[policy_id] = policy
    return policy


def _base_policy(data: dict[str, Any]) -> Policy:
    _check_keys(data, _BASE_KEYS, "policy")
    answer_format = _text(data, "answer_format")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
    misplaced = sorted(_YES_NO_KEYS & set(data)) if answer_format != "icm-yes-no" else []
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only for answer_format 'icm-yes-no'")
    entries = _category_entries(data.get("categories"))
    categories = tuple(Category(code=_text(e, "code"), label=_text(e, "label")) for e in entries)
    safe = _category_named_by(data, "safe_category", categories)
    check_names_unique(categories, safe)
    unsafe, codes = _unsafe(categories, safe)
    parts = _prompt_parts(data, entries, safe.code, codes)
    exceptions = _exceptions(data, parts, codes)
    return Policy(
        id=data["id"],
        version=_text(data, "version"),
        prompt=_text(data, "prompt") if parts is None else assemble(parts, unsafe, exceptions),
        categories=categories,
        safe_category=safe,
        answer_format=answer_format,
        yes_no=_yes_no_answers(data, categories, safe) if answer_format == "icm-yes-no" else None,
        parts=parts,
        exceptions=exceptions,
        decision=_decision(data, DecisionRules(), codes),
    )


def _derived_policy(data: dict[str, Any], parent: Policy) -> Policy:
    _check_keys(data, _DERIVED_KEYS, "derived policy")
    unsafe, codes = _unsafe(parent.categories, parent.safe_category)
    exceptions = _exceptions(data, parent.parts, codes) if "exceptions" in data else None
    if exceptions is None:
        exceptions = parent.exceptions
    prompt = parent.prompt if parent.parts is None else assemble(parent.parts, unsafe, exceptions)
    return Policy(
        id=data["id"],
        version=_text(data, "version"),
        prompt=prompt,
        categories=parent.categories,
        safe_category=parent.safe_category,
        answer_format=parent.answer_format,
        yes_no=parent.yes_no,
        parts=parent.parts,
        exceptions=exceptions,
        decision=_decision(data, parent.decision, codes),
        extends=parent.id,
    )


def _unsafe(
    categories: tuple[Category, ...], safe: Category
) -> tuple[list[tuple[str, str]], list[str]]:
    """(code, label) of every category but the safe one, in prompt order, and their codes."""
    unsafe = [(c.code, c.label) for c in categories if c != safe]
    return unsafe, [code for code, _ in unsafe]


def _prompt_parts(
    data: dict[str, Any], entries: list[dict[str, Any]], safe_code: str, unsafe: list[str]
) -> PromptParts | None:
    """The prompt's parts when the file gives them (preamble, closing, category texts)."""
    given = _PARTS_KEYS & set(data)
    texts = {entry["code"]: entry for entry in entries if {"text", "exception_text"} & set(entry)}
    if "prompt" in data:
        if given or texts:
            keys = sorted(given) or [f"categories.{code}.text" for code in texts]
            raise ValueError(f"prompt: give either prompt or its parts, not both ({keys[0]})")
        return None
    if given != _PARTS_KEYS:
        raise ValueError("prompt (or its parts preamble and closing) must be given")
    if safe_code in texts:
        raise ValueError(f"categories.{safe_code}: the safe category has no text in the prompt")
    missing = [code for code in unsafe if "text" not in texts.get(code, {})]
    if missing:
        raise ValueError(f"categories.{missing[0]}.text: needed when the prompt comes in parts")
    return PromptParts(
        preamble=_text(data, "preamble"),
        closing=_text(data, "closing"),
        texts={
            code: CategoryText(
                rules=_text(texts[code], "text", f"categories.{code}."),
                exempt=_text(texts[code], "exception_text", f"categories.{code}.")
                if "exception_text" in texts[code]
                else None,
            )
            for code in unsafe
        },
    )


def _exceptions(
    data: dict[str, Any], parts: PromptParts | None, codes: list[str]
) -> frozenset[str]:
    value = data.get("exceptions", [])
    if not isinstance(value, list) or not all(isinstance(code, str) for code in value):
        raise ValueError("exceptions: must be an array of category codes")
    for code in value:
        if code not in codes:
            raise ValueError(f"exceptions: {code!r} is not an Unsafe category ({', '.join(codes)})")
        if parts is None:
            raise ValueError("exceptions: need a prompt in parts (preamble, closing, texts)")
        if parts.texts[code].exempt is None:
            raise ValueError(f"exceptions: category {code} has no exception_text")
    if len(set(value)) != len(value):
        raise ValueError("exceptions: a category is listed twice")
    return frozenset(value)


def _decision(data: dict[str, Any], base: DecisionRules, codes: list[str]) -> DecisionRules:
    table = data.get("decision", {})
    if not isinstance(table, dict):
        raise ValueError("decision: must be a table ([decision])")
    return rules_from_table(table, base=base, category_codes=codes)


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


def _category_entries(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError("categories must be a non-empty array of tables ([[categories]])")
    for entry in value:
        if not isinstance(entry, dict):
            raise ValueError("each entry of categories must be a table with code and label")
        _check_keys(entry, _CATEGORY_KEYS, "category")
    return value


def _category_named_by(
    table: dict[str, Any], key: str, categories: tuple[Category, ...]
) -> Category:
    """The category whose code `table[key]` holds."""
    code = _text(table, key)
    category = next((c for c in categories if c.code == code), None)
    if category is None:
        raise ValueError(f"{key} {code!r} is not the code of any category")
    return category


def _check_keys(table: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} key(s): {', '.join(unknown)}")


def _text(table: dict[str, Any], key: str, path: str = "") -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}{key} must be a non-empty string")
    return value
