"""The alert rules and the dashboard against a real Prometheus scraping a real running service.

One scenario on a broker and a Triton (CPU guard) of its own: the service judges a mix of events
(verdicts Safe and Unsafe, review, dead letters, image URLs fetched and failing, a shadow
candidate), then Triton is stopped and restarted while events wait. Prometheus (Debian's, 1 s
scrapes and rule evaluations, the real alerts.yaml with the breaker alert's `for:` cut to 1 s)
must see the breaker alert fire and resolve; every name and label the rules and the dashboard
use must be in the service's /metrics; every expression must evaluate; and the guard latency's
exemplars must carry the trace ids of the verdicts.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import ImageEventProducer
from service.dev.samples import event_sample, photo_bytes
from tests.support import promql, scripts
from tests.support.faults import (
    REVIEW_POLICY_ID,
    FaultStack,
    ServiceProcess,
    new_topics,
    service_env,
    wait_for_outcomes,
)
from tests.support.hostile import ALLOWED_NETWORKS, ImageServer
from tests.support.prometheus import JOB, PrometheusServer
from tests.support.stack import Topics, free_port

build = scripts.load("monitoring/build.py")

BREAKER_ALERT = "GuardstreamGuardBreakerOpen"


@dataclass
class Monitored:
    stack: FaultStack
    topics: Topics
    service: ServiceProcess
    metrics_url: str
    prometheus: PrometheusServer
    images: ImageServer


def short_breaker_rules() -> dict[str, Any]:
    """alerts.yaml as it is, but the breaker alert fires after 1 s open, not 5 min."""
    rules = copy.deepcopy(promql.rules_file(build.ALERTS))
    [breaker] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == BREAKER_ALERT]
    breaker["for"] = "1s"
    return rules


@pytest.fixture
async def monitored_stack(tmp_path: Path) -> AsyncIterator[Monitored]:
    stack = await FaultStack.start(tmp_path / "stack")  # the CPU guard: Safe and Unsafe answers
    images = ImageServer()
    await images.start()
    topics = await new_topics(stack.bootstrap, "monitoring", partitions=2)
    port = free_port()
    env = service_env(
        stack,
        topics,
        name="monitored",
        overrides={
            "GUARDSTREAM_HEALTH_HOST": "127.0.0.1",
            "GUARDSTREAM_HEALTH_PORT": str(port),
            "GUARDSTREAM_BREAKER_FAILURES": "2",
            "GUARDSTREAM_BREAKER_PROBE_INTERVAL_S": "0.5",
            "GUARDSTREAM_GUARD_TIMEOUT_S": "5",
            "GUARDSTREAM_FETCH_ALLOWED_NETWORKS": ALLOWED_NETWORKS,
            "GUARDSTREAM_SHADOW_MODEL": "guard",  # a candidate: the shadow metrics too
        },
    )
    service = ServiceProcess("monitored", env, tmp_path / "service.log")
    prometheus = PrometheusServer(
        tmp_path / "prometheus", [f"127.0.0.1:{port}"], short_breaker_rules()
    )
    try:
        prometheus.start()
        await service.start()
        yield Monitored(stack, topics, service, f"http://127.0.0.1:{port}", prometheus, images)
    finally:
        if service.running:
            await service.sigterm()
        prometheus.stop()
        await images.close()
        stack.close()


async def publish(monitored: Monitored, tag: str) -> list[str]:
    """A mix that exercises every labelled metric: Unsafe and Safe verdicts, one for review, an
    input dead letter, an image URL fetched and one failing."""
    url = monitored.images.url
    samples = [
        event_sample("colour wheel", "Unsafe/O4", f"{tag}-color", image=photo_bytes("color.png")),
        event_sample("coffee", "Safe/NA", f"{tag}-coffee", image=photo_bytes("coffee.png")),
        event_sample(
            "for review",
            "review",
            f"{tag}-review",
            image=photo_bytes("camera.png"),
            policy_id=REVIEW_POLICY_ID,
        ),
        event_sample("fetched", "Safe", f"{tag}-url", url=str(url / "hops" / "0")),
        event_sample("not found", "dead:fetch_failed", f"{tag}-404", url=str(url / "status/404")),
    ]
    async with ImageEventProducer(monitored.stack.bootstrap, monitored.topics.input) as producer:
        for sample in samples:
            await producer.send_raw(sample.value, event_id=sample.event_id)
        await producer.send_raw(b"not json", event_id=f"{tag}-junk")
    return [*(s.event_id for s in samples if s.event_id), f"{tag}-junk"]


async def scrape(url: str) -> promql.Scrape:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return promql.scrape_of(text_string_to_metric_families(text))


async def test_the_breaker_alert_fires_and_resolves_in_a_real_prometheus_and_every_name_is_scraped(
    monitored_stack: Monitored,
) -> None:
    m = monitored_stack
    first = await publish(m, "before")
    outcomes = await wait_for_outcomes(m.stack.bootstrap, m.topics, first, timeout_s=120)
    assert set(first) <= set(outcomes), m.service.log_tail()
    assert await m.prometheus.alert_state(BREAKER_ALERT) is None

    # Triton goes away while events wait: the breaker opens, the alert fires.
    await m.stack.stop_triton()
    during = await publish(m, "during")
    fired_after = await m.prometheus.wait_for_alert(BREAKER_ALERT, "firing", timeout_s=90)
    [alert] = [
        a
        for a in (await m.prometheus.api("alerts"))["alerts"]
        if a["labels"]["alertname"] == BREAKER_ALERT
    ]
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["group_id"] == m.topics.group
    assert alert["labels"]["input_topic"] == m.topics.input
    assert m.topics.group in alert["annotations"]["summary"]
    assert alert["annotations"]["runbook_url"].endswith("#guardstreamguardbreakeropen")

    # Triton back: the breaker closes by itself, the alert resolves, nothing was lost.
    await m.stack.start_triton()
    resolved_after = await m.prometheus.wait_for_alert(BREAKER_ALERT, None, timeout_s=120)
    outcomes = await wait_for_outcomes(m.stack.bootstrap, m.topics, during, timeout_s=120)
    assert set(during) <= set(outcomes), m.service.log_tail()
    assert not any("error" in o for o in outcomes["during-color"])
    print(
        f"\nbreaker alert firing {fired_after:.1f}s after Triton stopped; resolved "
        f"{resolved_after:.1f}s after it started again"
    )

    # Every name and label the rules and the dashboard use is in the service's own scrape.
    scraped = await scrape(m.metrics_url)
    rules = promql.rules_file(build.ALERTS)
    board = json.loads(build.DASHBOARD.read_text())
    expressions = {
        **promql.rule_expressions(rules),
        **{
            f"dashboard {n}": e
            for n, e in enumerate(promql.dashboard_expressions(board, m.topics.group))
        },
    }
    problems = {name: promql.missing(e, scraped, rules) for name, e in expressions.items()}
    assert {name: p for name, p in problems.items() if p} == {}
    assert "guardstream_guard_latency_seconds_bucket" in scraped

    # Prometheus scraped it as the rules expect (the job `up` is selected by), and evaluates
    # every expression; most have data after this run.
    [up] = (await m.prometheus.api("query", query=f'up{{job="{JOB}"}}'))["result"]
    assert up["value"][1] == "1"
    empty = []
    for name, expr in expressions.items():
        result = (await m.prometheus.api("query", query=expr))["result"]
        if not result:
            empty.append(name)
    print(
        f"{len(expressions) - len(empty)} of {len(expressions)} expressions have data; "
        f"empty: {empty}"
    )
    assert "group_topic:guardstream_outcomes:rate5m" not in empty
    assert "group_topic:guardstream_guard_latency_seconds:p99_rate5m" not in empty

    # Exemplars: the guard latency buckets carry the trace ids of the events judged.
    now = time.time()
    exemplars = await m.prometheus.api(
        "query_exemplars",
        query="guardstream_guard_latency_seconds_bucket",
        start=str(now - 600),
        end=str(now),
    )
    seen = {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}
    judged = {o["trace_id"] for batch in outcomes.values() for o in batch if o.get("trace_id")}
    assert seen & judged, (seen, judged)
