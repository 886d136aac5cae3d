"""Build the monitoring files that Kubernetes and Grafana load from their one source each.

```
python deploy/monitoring/build.py           # writes the two files below
python deploy/monitoring/build.py --check   # exit 1 when either is stale (the tests run this)
```

- `deploy/monitoring/dashboard.json`: the Grafana dashboard, from `PANELS` below (a panel is a
  few lines here and sixty in Grafana's JSON).
- `deploy/k8s/base/monitoring.yaml`: a PrometheusRule whose spec is `alerts.yaml` as it is, and
  the dashboard in a ConfigMap labelled `grafana_dashboard: "1"`, the label Grafana's dashboard
  sidecar (kube-prometheus-stack, the Grafana Helm chart) watches by default.

Every query selects one consumer group: series are joined with guardstream_consumer_info, which
names the instance's group and input topic (`JOIN`), and `$group` is a dashboard variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yaml"
DASHBOARD = HERE / "dashboard.json"
MANIFEST = HERE.parent / "k8s" / "base" / "monitoring.yaml"
UID = "guardstream-consumer"

JOIN = (
    "* on (job, instance) group_left (group_id, input_topic) "
    'guardstream_consumer_info{group_id=~"$group"}'
)
RATE = "[$__rate_interval]"


def per_group(expr: str, by: str = "") -> str:
    """`expr` (per instance) restricted to the chosen group, summed by `by`."""
    return f"sum by ({by}) ({expr} {JOIN})" if by else f"sum ({expr} {JOIN})"


def per_instance(expr: str, how: str = "sum") -> tuple[str, str]:
    """`expr` restricted to the chosen group, one line per instance."""
    return f"{how} by (instance) ({expr} {JOIN})", "{{instance}}"


def quantiles(histogram: str, selector: str = "") -> list[tuple[str, str]]:
    rate = f"rate({histogram}_bucket{selector}{RATE})"
    return [
        (f"histogram_quantile({q}, {per_group(rate, 'le')})", f"p{round(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    width: int = 12
    stack: bool = False
    exemplars: bool = False
    kind: str = "timeseries"
    extra: dict[str, Any] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Flow",
        [
            Panel(
                "Throughput",
                "Records taken from the input topic, and outcomes (verdicts and dead letters) "
                "the broker acknowledged, per second.",
                [
                    (per_group(f"rate(guardstream_events_consumed_total{RATE})"), "consumed"),
                    (
                        per_group(f"rate(guardstream_end_to_end_latency_seconds_count{RATE})"),
                        "published",
                    ),
                ],
                unit="ops",
            ),
            Panel(
                "Lag per partition",
                "Records between each partition's committed offset and its end. Growing while "
                "events arrive: the group is too slow (GuardstreamConsumerLagGrowing).",
                [
                    (
                        f"max by (topic, partition) (guardstream_partition_lag {JOIN})",
                        "{{topic}}[{{partition}}]",
                    )
                ],
            ),
            Panel(
                "Verdicts by rating and category",
                "Verdicts published per second. A sudden change of shape is more often a model "
                "or policy rollout than a change in what is uploaded.",
                [
                    (
                        per_group(f"rate(guardstream_verdicts_total{RATE})", "rating, category"),
                        "{{rating}} {{category}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            Panel(
                "Verdicts by action, and who decided",
                "Actions the decision rules took (would_action differs only under observe-only "
                "policies), verdicts sent for review, and who decided: model, reuse, bank, "
                "human.",
                [
                    (
                        per_group(f"rate(guardstream_decisions_total{RATE})", "action"),
                        "action {{action}}",
                    ),
                    (per_group(f"rate(guardstream_reviews_total{RATE})"), "sent for review"),
                    (
                        per_group(f"rate(guardstream_decided_total{RATE})", "decided_by"),
                        "decided by {{decided_by}}",
                    ),
                ],
                unit="ops",
            ),
            Panel(
                "Dead letters by code",
                "Dead letters per second by code; fault=input is the producer's problem, "
                "fault=service ours. `python -m service dlq list` shows examples.",
                [
                    (
                        per_group(f"rate(guardstream_dead_letters_total{RATE})", "code, fault")
                        + " > 0",
                        "{{code}} ({{fault}})",
                    )
                ],
                unit="ops",
                stack=True,
                width=24,
            ),
        ],
    ),
    (
        "Latency",
        [
            Panel(
                "Guard latency (successful requests)",
                "One Triton request, percentiles over the chosen range. Exemplars (dots) link "
                "to the request's trace.",
                quantiles("guardstream_guard_latency_seconds", '{outcome="ok"}'),
                unit="s",
                exemplars=True,
            ),
            Panel(
                "End-to-end latency",
                "From the input record's timestamp to its outcome being acknowledged: queueing "
                "in the topic included. Exemplars link to the event's trace.",
                quantiles("guardstream_end_to_end_latency_seconds"),
                unit="s",
                exemplars=True,
            ),
            Panel(
                "Guard failures and image fetches",
                "Guard requests that failed, by code; image.url fetches that failed, by code.",
                [
                    (
                        per_group(
                            f'rate(guardstream_guard_latency_seconds_count{{outcome!="ok"}}{RATE})',
                            "outcome",
                        ),
                        "guard {{outcome}}",
                    ),
                    (
                        per_group(
                            f'rate(guardstream_fetch_latency_seconds_count{{outcome!="ok"}}{RATE})',
                            "outcome",
                        ),
                        "fetch {{outcome}}",
                    ),
                ],
                unit="ops",
            ),
            Panel(
                "Retries",
                "Guard requests retried after a retriable failure, and outcome publications "
                "retried after a broker error.",
                [
                    (per_group(f"rate(guardstream_guard_retries_total{RATE})"), "guard"),
                    (per_group(f"rate(guardstream_publish_retries_total{RATE})"), "publish"),
                ],
                unit="ops",
            ),
        ],
    ),
    (
        "Health",
        [
            Panel(
                "Guard breaker open",
                "1 while an instance's guard breaker is open: consumption paused until Triton "
                "answers (GuardstreamGuardBreakerOpen).",
                [per_instance("guardstream_guard_breaker_open", "max")],
                width=8,
                extra={"min": 0, "max": 1},
            ),
            Panel(
                "Ready",
                "1 while an instance's readiness checks pass; guardstream_ready_check says which "
                "one fails.",
                [
                    per_instance("guardstream_ready", "min"),
                    (
                        f"min by (check) (guardstream_ready_check {JOIN}) == 0",
                        "failing: {{check}}",
                    ),
                ],
                width=8,
                extra={"min": 0, "max": 1},
            ),
            Panel(
                "In flight",
                "Records taken and not yet finished, per instance (bounded by "
                "GUARDSTREAM_MAX_IN_FLIGHT).",
                [per_instance("guardstream_in_flight_events")],
                width=8,
            ),
            Panel(
                "In-flight bytes",
                "Bytes of record values held in flight (bounded by "
                "GUARDSTREAM_MAX_IN_FLIGHT_BYTES).",
                [per_instance("guardstream_in_flight_bytes")],
                unit="bytes",
                width=8,
            ),
            Panel(
                "Memory (RSS)",
                "Resident memory of each consumer process.",
                [per_instance("process_resident_memory_bytes")],
                unit="bytes",
                width=8,
            ),
            Panel(
                "CPU",
                "CPU seconds per second of each consumer process (1 = one core).",
                [per_instance(f"rate(process_cpu_seconds_total{RATE})")],
                width=8,
            ),
            Panel(
                "Rules loaded",
                "1 when the last load of the policy and tenant files succeeded "
                "(GuardstreamRulesReloadFailing).",
                [per_instance("guardstream_rules_reload_ok", "min")],
                width=12,
                extra={"min": 0, "max": 1},
            ),
            Panel(
                "Shadow agreement",
                "With shadow mode on: the candidate's verdicts by agreement with the live one.",
                [
                    (
                        per_group(f"rate(guardstream_shadow_verdicts_total{RATE})", "agreement"),
                        "{{agreement}}",
                    )
                ],
                unit="ops",
                width=12,
            ),
        ],
    ),
]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "custom": {"stacking": {"mode": "normal" if panel.stack else "none"}},
                **panel.extra,
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
                "exemplar": panel.exemplars,
                "refId": chr(ord("A") + index),
            }
            for index, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row, row_panels in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y, x = y + 1, 0
        for panel in row_panels:
            if x + panel.width > 24:
                y, x = y + 8, 0
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "uid": UID,
        "title": "guardstream",
        "description": "The image-moderation consumer: flow, latency and health of one "
        "consumer group. Alerts: deploy/monitoring/alerts.yaml; runbook: deploy/runbook.md.",
        "tags": ["guardstream", "kafka", "triton"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "group",
                    "label": "Consumer group",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(guardstream_consumer_info, group_id)",
                        "refId": "group",
                    },
                    "definition": "label_values(guardstream_consumer_info, group_id)",
                    "refresh": 2,
                    "includeAll": False,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard's panels, in panel order."""
    return [t["expr"] for p in board["panels"] for t in p.get("targets", ())]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, the dashboard's JSON) as literal blocks, readable in a diff."""


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _string)


def manifest(rules: dict[str, Any], board: dict[str, Any]) -> str:
    labels = {"app.kubernetes.io/name": "guardstream", "app.kubernetes.io/component": "consumer"}
    prometheus_rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "guardstream", "labels": labels},
        "spec": rules,
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "guardstream-dashboard",
            "labels": {**labels, "grafana_dashboard": "1"},
        },
        "data": {"guardstream.json": json.dumps(board, indent=2) + "\n"},
    }
    header = (
        "# Built by `python deploy/monitoring/build.py` from deploy/monitoring/alerts.yaml and\n"
        "# the dashboard it defines: edit those, then run it (tests/test_monitoring.py fails\n"
        "# while this file is stale). A Prometheus that the operator runs picks the rule up if\n"
        "# its ruleSelector matches these labels (many installs select `release: <helm\n"
        "# release>`: add it in an overlay); Grafana's sidecar loads the ConfigMap.\n"
    )
    documents = [
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
        for d in (prometheus_rule, config_map)
    ]
    return header + "---\n".join(documents)


def built() -> dict[Path, str]:
    """Each built file's path and the content it should have."""
    board = dashboard()
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        DASHBOARD: json.dumps(board, indent=2) + "\n",
        MANIFEST: manifest(rules, board),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when a built file is stale")
    args = parser.parse_args(argv)
    files = built()
    if args.check:
        stale = [
            path for path, text in files.items() if not path.exists() or path.read_text() != text
        ]
        for path in stale:
            print(f"{path} is stale: run python deploy/monitoring/build.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
