"""The alert rules, their promtool unit tests, the dashboard and the runbook (deploy/monitoring/,
deploy/runbook.md), checked with the real promtool; the end-to-end check against a running
service and a real Prometheus is tests/test_monitoring_end_to_end.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import promql, scripts

kustomize = scripts.load("kustomize.py")
build = scripts.load("monitoring/build.py")

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
UNIT_TESTS = sorted(MONITORING.glob("*.test.yaml"))
RUNBOOK = ROOT / "deploy" / "runbook.md"
RUNBOOK_URL = "https://guardstream.dev/runbook#"
OVERLAYS = ("dev", "prod")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; never skipped: `make check` and `make test` install it (Debian's
    prometheus package), and a missing tool must fail the tests, not pass them quietly."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed: run `make check` (it installs Debian's prometheus)")
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def check_rules(path: Path) -> None:
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def alerts(rules: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rules = rules or promql.rules_file(ALERTS)
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules_file() -> None:
    check_rules(ALERTS)


def test_a_rules_file_that_does_not_parse_fails_the_check(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(ALERTS.read_text().replace("> 1000", "> > 1000", 1))
    with pytest.raises(AssertionError, match="parse error"):
        check_rules(broken)


def test_there_are_promtool_unit_tests() -> None:
    assert [path.name for path in UNIT_TESTS] == ["alerts.test.yaml", "anomalies.test.yaml"]


@pytest.mark.parametrize("tests", UNIT_TESTS, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(tests: Path) -> None:
    result = promtool("test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_failing_unit_test_fails(tmp_path: Path) -> None:
    """The unit tests are not vacuous: the breaker's series against a rule that can never fire
    fail them."""
    rules = tmp_path / "alerts.yaml"
    rules.write_text(ALERTS.read_text().replace(") == 1\n", ") == 2\n", 1))
    assert rules.read_text() != ALERTS.read_text()
    suite = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    suite["tests"] = [t for t in suite["tests"] if "breaker" in t["name"]]
    tests = tmp_path / "breaker.test.yaml"
    tests.write_text(yaml.safe_dump(suite))
    result = promtool("test", "rules", tests)
    assert result.returncode != 0
    assert "GuardstreamGuardBreakerOpen" in result.stdout + result.stderr


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", ()):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never seen firing"
    assert names - quiet == set(), "alerts never seen quiet"
    assert firing | quiet <= names, "unit tests of alerts that do not exist"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_is_labelled_named_and_linked_to_its_runbook_section() -> None:
    anchors = _anchors(RUNBOOK.read_text())
    for rule in alerts():
        name, labels, notes = rule["alert"], rule.get("labels", {}), rule.get("annotations", {})
        assert labels.get("severity") in ("critical", "warning"), name
        assert "{{ $labels.group_id }}" in notes.get("summary", ""), name
        assert notes.get("description"), name
        url = notes.get("runbook_url", "")
        assert url == RUNBOOK_URL + name.lower(), name
        assert name.lower() in anchors, f"deploy/runbook.md has no section for {name}"


def test_the_runbook_covers_every_failure_the_readme_lists() -> None:
    """Each row of the README's "When things fail" table has its section in the runbook."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## When things fail", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    runbook = RUNBOOK.read_text()
    failures = runbook.split("## When things fail", 1)[1]
    for row in rows[1:]:  # the header row is not a failure
        what = row.split("|")[1].strip()
        assert f"**{what}**" in failures, f"the runbook does not cover {what!r}"


def test_the_built_files_are_current() -> None:
    assert build.main(["--check"]) == 0, "run python deploy/monitoring/build.py"


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    board = json.loads(build.DASHBOARD.read_text())
    expressions = promql.dashboard_expressions(board)
    assert len(expressions) >= 20
    path = tmp_path / "dashboard-expressions.yaml"
    path.write_text(yaml.safe_dump(promql.as_rules_file(expressions)))
    check_rules(path)


def test_the_dashboard_shows_what_on_call_needs() -> None:
    board = json.loads(build.DASHBOARD.read_text())
    uses = " ".join(promql.dashboard_expressions(board))
    for metric in (
        "guardstream_events_consumed_total",  # throughput
        "guardstream_partition_lag",
        "guardstream_verdicts_total",
        "guardstream_decisions_total",
        "guardstream_dead_letters_total",
        "guardstream_guard_latency_seconds_bucket",
        "guardstream_end_to_end_latency_seconds_bucket",
        "guardstream_in_flight_events",
        "guardstream_guard_breaker_open",
        "guardstream_guard_retries_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert metric in uses, metric
    exemplars = {
        p["title"] for p in board["panels"] if any(t.get("exemplar") for t in p.get("targets", ()))
    }
    assert exemplars == {"Guard latency (successful requests)", "End-to-end latency"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_carries_the_rules_and_the_dashboard(overlay: str, tmp_path: Path) -> None:
    resources = kustomize.render(ROOT / "deploy" / "k8s" / "overlays" / overlay)
    [rule] = [r for r in resources if r["kind"] == "PrometheusRule"]
    assert rule["spec"] == promql.rules_file(ALERTS)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    check_rules(spec)
    [dashboard] = [
        r
        for r in resources
        if r["kind"] == "ConfigMap" and r["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert json.loads(dashboard["data"]["guardstream.json"]) == build.dashboard()
    assert rule["metadata"]["namespace"] == dashboard["metadata"]["namespace"]


def test_the_scrape_check_reports_what_an_expression_uses_and_the_scrape_lacks() -> None:
    """The end-to-end test holds every rule and panel against a running service's /metrics with
    this check: it must catch a misspelt name, a missing label or value, a stray grouping."""
    scrape = {
        "guardstream_verdicts_total": [{"rating": "Safe", "category": "NA"}],
        "guardstream_consumer_info": [{"group_id": "g", "input_topic": "images"}],
    }
    rules = promql.rules_file(ALERTS)
    join = "* on (job, instance) group_left (group_id) guardstream_consumer_info"
    assert (
        promql.missing(
            f"sum by (group_id, rating) (guardstream_verdicts_total {join})", scrape, rules
        )
        == []
    )
    assert promql.missing("rate(guardstream_verdict_total[5m])", scrape, rules) == [
        "guardstream_verdict_total: no such series in the scrape"
    ]
    assert promql.missing(
        'guardstream_verdicts_total{rating="Unsafe", tenant!=""}', scrape, rules
    ) == [
        "guardstream_verdicts_total: no series with rating='Unsafe'",
        "guardstream_verdicts_total: no label 'tenant'",
    ]
    assert promql.missing("sum by (action) (guardstream_verdicts_total)", scrape, rules) == [
        "grouping label 'action' is on none of its series"
    ]
    # Recording rules are known by name; Prometheus's own `up` is checked against the server.
    assert (
        promql.missing(
            'group_topic:guardstream_outcomes:rate5m > 0 and up{job="x"} == 1', scrape, rules
        )
        == []
    )
    assert promql.missing("group_topic:guardstream_outcome:rate5m", scrape, rules) == [
        "group_topic:guardstream_outcome:rate5m: no such series in the scrape"
    ]
