"""What the alert rules and the dashboard ask of the service's metrics, read from their PromQL.

Not a PromQL parser: a reader of the parts of PromQL that name series, enough for the
expressions in deploy/monitoring/ (and refusing what it does not understand, so an expression it
misreads fails a test instead of passing one). promtool and the real Prometheus parse them
fully (tests/test_monitoring.py, tests/test_monitoring_end_to_end.py); this says which metric
names and labels each one needs, to hold them against a scrape of a running service.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Label lists after these keywords are labels, not metric names.
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
# A name not glued to what precedes it (the `m` of `15m` is not a metric).
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^{}]*\})?")
_RANGE = re.compile(r"\[[^\]]*\]")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
    | {"group_left", "group_right"}
)


@dataclass(frozen=True)
class Selector:
    """A series selector: the metric name and its label matchers (label, operator, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Needs:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""


def read(expr: str) -> Needs:
    """The selectors and grouping labels of one expression."""
    grouping: set[str] = set()
    for labels in _GROUPING.findall(expr):
        grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    rest = _GROUPING.sub(" ", expr)
    rest = _RANGE.sub(" ", rest)
    selectors = []
    for match in _SELECTOR.finditer(rest):
        name, braces = match.group(1), match.group(2)
        after = rest[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or (after.startswith("(") and braces is None):
            continue  # a keyword or a function call
        selectors.append(Selector(name, _matchers(braces or "{}", expr)))
    return Needs(tuple(selectors), frozenset(grouping))


def _matchers(braces: str, expr: str) -> tuple[tuple[str, str, str], ...]:
    inside = braces[1:-1]
    found = []
    position = 0
    while position < len(inside):
        match = _MATCHER.match(inside, position)
        if match is None:
            if inside[position:].strip():
                raise ValueError(f"cannot read the matchers {braces!r} of {expr!r}")
            break
        found.append((match.group(1), match.group(2), match.group(3)))
        position = match.end()
    return tuple(found)


def rule_expressions(rules: Mapping[str, Any]) -> dict[str, str]:
    """Each rule's name (alert or record) and expression, from a parsed rules file."""
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
    }


def rules_file(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def recorded(rules: Mapping[str, Any]) -> set[str]:
    return {
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    }


def dashboard_expressions(board: Mapping[str, Any], group: str = ".+") -> list[str]:
    """The dashboard's expressions as Prometheus would get them from Grafana: `$group` (and
    Grafana's `$__rate_interval`) filled in."""
    return [
        target["expr"].replace("$group", group).replace("$__rate_interval", "1m")
        for panel in board["panels"]
        for target in panel.get("targets", ())
    ]


def as_rules_file(expressions: Iterable[str]) -> dict[str, Any]:
    """Expressions as recording rules, for promtool to parse (it has no command for a bare
    expression)."""
    return {
        "groups": [
            {
                "name": "parse",
                "rules": [
                    {"record": f"parse:expression_{n}:check", "expr": e}
                    for n, e in enumerate(expressions)
                ],
            }
        ]
    }


Scrape = Mapping[str, list[Mapping[str, str]]]
"""A scrape: each sample name (`guardstream_verdicts_total`, `..._bucket`) and its label sets."""

PROMETHEUS_OWN = frozenset({"up"})
"""Series Prometheus makes itself: not in a scrape, checked against the real server."""


def scrape_of(families: Iterable[Any]) -> dict[str, list[dict[str, str]]]:
    """A scrape from prometheus_client's parser (`text_string_to_metric_families`)."""
    scrape: dict[str, list[dict[str, str]]] = {}
    for family in families:
        for sample in family.samples:
            scrape.setdefault(sample.name, []).append(dict(sample.labels))
    return scrape


def missing(expr: str, scrape: Scrape, rules: Mapping[str, Any]) -> list[str]:
    """What `expr` uses that the scrape lacks: metric names, label names, label values that a
    `=` matcher selects, grouping labels that none of its series carries. Empty when all is
    there."""
    needs = read(expr)
    made = recorded(rules)
    recorded_labels = {
        name: read(e).grouping for name, e in rule_expressions(rules).items() if name in made
    }
    problems = []
    carried = {"job", "instance"}  # added by Prometheus to every scraped series
    for selector in needs.selectors:
        if selector.name in made:
            carried |= recorded_labels[selector.name]
            continue
        if selector.name in PROMETHEUS_OWN:
            continue
        samples = scrape.get(selector.name)
        if samples is None:
            problems.append(f"{selector.name}: no such series in the scrape")
            continue
        labels = {label for sample in samples for label in sample}
        carried |= labels
        for label, operator, value in selector.matchers:
            if label in ("job", "instance"):
                continue
            if label not in labels:
                problems.append(f"{selector.name}: no label {label!r}")
            elif operator == "=" and not any(s.get(label) == value for s in samples):
                problems.append(f"{selector.name}: no series with {label}={value!r}")
    problems += [
        f"grouping label {label!r} is on none of its series"
        for label in sorted(needs.grouping - carried)
    ]
    return problems
