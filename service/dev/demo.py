"""`python -m service demo`: the whole flow on the embedded stack, outcomes shown as they land.

It runs the real service as a child process (`python -m service run`, exactly what a pod
runs) with the example rules of `service/dev/rules/` (three tenants, an exception policy, a
review policy, an observe-only policy), publishes `service.dev.samples` through the producer
helper, and reads the verdicts, dead-letters and review topics like any downstream consumer
would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from service.ask import converse
from service.client import ImageEventProducer
from service.config import Settings
from service.core.reviews import ReviewDecision
from service.dev import stack
from service.dev.samples import (
    RULES_DIR,
    Sample,
    all_samples,
    decision_label,
    known_samples,
    outcome_label,
)
from service.ops.tracing import one_line

SHADOW_POLICY = "llavaguard-v1.2"
_COLUMNS = (
    ("event", 22),
    ("outcome", 11),
    ("rating / code", 24),
    ("decision", 20),
    ("ms", 5),
    ("detail", 80),
)


def run_demo(config: stack.StackConfig, *, keep_stack: bool) -> int:
    started = time.monotonic()
    settings = Settings()
    already = stack.read_state(config.state_dir)
    print("starting the embedded stack (broker + Triton with the CPU guard) ...", flush=True)
    try:
        state = stack.up(config)
    except stack.StackError as exc:
        print(f"stack did not start: {exc}", file=sys.stderr)
        return 1
    print(state.describe(), flush=True)
    started_here = already is None or already.kafka_pid != state.kafka_pid
    demo_dir = config.state_dir.parent / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    service_traces = demo_dir / "service-traces.jsonl"
    producer_traces = demo_dir / "producer-traces.jsonl"
    health = f"http://{state.host}:{_free_port(state.host)}"
    run_id = uuid.uuid4().hex[:6]
    known, setup = known_samples(prefix=f"demo-{run_id}-")
    asyncio.run(_publish_decisions(state.bootstrap_servers, settings, setup.decisions))
    banks = setup.write_banks(demo_dir)
    service = _start_service(state, health, demo_dir, service_traces, banks)
    try:
        _trace_to(producer_traces)
        samples = all_samples(prefix=f"demo-{run_id}-") + known
        print(
            f"\nservice started (pid {service.pid}, log {demo_dir / 'service.log'}, "
            f"{health}/readyz and /metrics); "
            f"publishing {len(samples)} events to {settings.input_topic!r}\n",
            flush=True,
        )
        seen, reviewed = asyncio.run(_publish_and_watch(state.bootstrap_servers, settings, samples))
        _show_review_topic(settings, samples, reviewed)
        if reviewed:
            _show_conversation(state, settings, reviewed[0]["event_id"])
        _show_metrics(health, sum(1 for o in seen.values() if "rating" in o))
    finally:
        service.send_signal(signal.SIGTERM)
        code = service.wait(timeout=settings.drain_timeout_s + 30)
        trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]
        if started_here and not keep_stack:
            stack.down(config.state_dir)
    print(f"\nservice stopped on SIGTERM with exit code {code}")
    _show_trace(seen, [producer_traces, service_traces])
    missing = len(samples) - len(seen)
    actions = [o.get("action") for o in seen.values() if "rating" in o]
    deciders = [o.get("decided_by") for o in seen.values() if "rating" in o]
    print(
        "decided by: "
        + ", ".join(f"{who} {deciders.count(who)}" for who in ("model", "reuse", "bank", "human"))
    )
    print(
        f"\n{len(seen)} of {len(samples)} events answered "
        f"({len(actions)} verdicts: {actions.count('allow')} allow, "
        f"{actions.count('review')} review, {actions.count('block')} block; "
        f"{sum(1 for o in seen.values() if 'error' in o)} dead letters) "
        f"in {time.monotonic() - started:.1f}s; "
        f"stack {'left running' if keep_stack or not started_here else 'stopped'}."
    )
    return 0 if missing == 0 and code == 0 else 1


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _start_service(
    state: stack.StackState, health: str, demo_dir: Path, traces: Path, banks: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GUARDSTREAM_BOOTSTRAP_SERVERS": state.bootstrap_servers,
        "GUARDSTREAM_TRITON_URL": state.triton_grpc,
        "GUARDSTREAM_HEALTH_HOST": state.host,
        "GUARDSTREAM_HEALTH_PORT": health.rsplit(":", 1)[1],
        "GUARDSTREAM_LOG_FORMAT": "text",
        "GUARDSTREAM_POLICY_DIR": str(RULES_DIR / "policies"),
        "GUARDSTREAM_TENANT_FILE": str(RULES_DIR / "tenants.toml"),
        "GUARDSTREAM_BANKS_FILE": str(banks),
        # Shadow mode: the default policy, strictest of the demo's, as the candidate beside
        # each tenant's own: the tenants' milder rules show up as its stricter verdicts.
        "GUARDSTREAM_SHADOW_POLICY": SHADOW_POLICY,
        "GUARDSTREAM_SHADOW_MAX_IN_FLIGHT": "64",  # the demo publishes every event at once
        "OTEL_TRACES_EXPORTER": "console",
    }
    with (demo_dir / "service.log").open("wb") as log, traces.open("wb") as spans:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run"], stdout=spans, stderr=log, env=env
        )


def _show_metrics(health: str, verdicts: int) -> None:
    """What an on-call engineer's dashboard would show for this run, once the shadow has
    judged every verdict's event (it runs behind the live path, never in it)."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{health}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        shadowed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(("guardstream_shadow_verdicts_total{", "guardstream_shadow_skipped"))
        )
        if shadowed >= verdicts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    shown = (
        "guardstream_verdicts_total{",
        "guardstream_decisions_total{",
        "guardstream_reviews_total ",
        "guardstream_dead_letters_total{",
        "guardstream_tenant_outcomes_total{",
        "guardstream_decided_total{",
        "guardstream_bank_matches_total{",
        "guardstream_reuse_lookups_total{",
        "guardstream_single_flight_waits_total ",
        "guardstream_shadow_verdicts_total{",
        "guardstream_shadow_skipped_total{",
    )
    print(f"\n{health}/metrics (excerpt, series above 0):")
    for line in lines:
        # Every dead-letter code is exposed from the start at 0 (for the alerts): not news.
        if line.startswith(shown) and not line.endswith(" 0.0"):
            print(f"  {line}")


def _trace_to(path: Path) -> None:
    """The demo is an upload service too: its publish spans start each event's trace."""
    provider = TracerProvider(resource=Resource.create({"service.name": "demo-uploader"}))
    out = path.open("w")
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=one_line))
    )
    trace.set_tracer_provider(provider)


async def _publish_decisions(
    bootstrap: str, settings: Settings, decisions: Iterable[ReviewDecision]
) -> None:
    """What a review tool did earlier: reviewers' decisions on the decisions topic (which the
    stack creates, compacted)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for decision in decisions:
            await producer.send_and_wait(
                settings.decisions_topic,
                decision.model_dump_json().encode("utf-8"),
                key=decision.event_id.encode("utf-8"),
            )
    finally:
        await producer.stop()


async def _publish_and_watch(
    bootstrap: str, settings: Settings, samples: list[Sample]
) -> tuple[dict[bytes, dict[str, Any]], list[dict[str, Any]]]:
    """Publish every sample, then print outcomes until each has one (or 180 s pass); also
    what reached the review topic meanwhile."""
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await watcher.start()
    try:
        await watcher.topics()  # loads the metadata partitions_for_topic reads
        partitions = [
            TopicPartition(topic, p)
            for topic in (settings.verdict_topic, settings.dead_letter_topic, settings.review_topic)
            for p in sorted(watcher.partitions_for_topic(topic) or ())
        ]
        watcher.assign(partitions)
        await watcher.seek_to_end(*partitions)
        for tp in partitions:
            await watcher.position(tp)  # fix the start before publishing
        expected = {s.value: s for s in samples}
        async with ImageEventProducer(bootstrap, settings.input_topic) as producer:
            for sample in samples:
                await producer.send_raw(
                    sample.value, event_id=sample.event_id, headers=list(sample.headers)
                )
        _print_row([name for name, _ in _COLUMNS])
        seen: dict[bytes, dict[str, Any]] = {}
        reviewed: list[dict[str, Any]] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (
            len(seen) < len(samples) or len(reviewed) < _for_review(seen)
        ):
            batches = await watcher.getmany(timeout_ms=500)
            for message in (m for batch in batches.values() for m in batch):
                outcome = json.loads(message.value)
                if message.topic == settings.review_topic:
                    reviewed.append(outcome)
                    continue
                key = _match(outcome, expected)
                if key is not None and key not in seen:
                    seen[key] = outcome
                    _print_outcome(expected[key], outcome)
        return seen, reviewed
    finally:
        await watcher.stop()


def _match(outcome: dict[str, Any], expected: dict[bytes, Sample]) -> bytes | None:
    """Which published value an outcome answers (dead letters of invalid JSON carry no id)."""
    for value, sample in expected.items():
        if sample.event_id is not None and outcome.get("event_id") == sample.event_id:
            return value
    original = outcome.get("original")
    if original:
        raw = base64.b64decode(original)
        return raw if raw in expected else None
    return None


def _for_review(seen: dict[bytes, dict[str, Any]]) -> int:
    return sum(1 for outcome in seen.values() if outcome.get("review"))


def _print_outcome(sample: Sample, outcome: dict[str, Any]) -> None:
    got, decision = outcome_label(outcome), None
    if "rating" in outcome:
        decision = decision_label(outcome)
        row = [
            sample.name,
            "verdict",
            f"{outcome['rating']} {outcome['category']}",
            decision,
            f"{outcome['timings']['total_ms']:.0f}",
            f"[{outcome['policy_id']}; {', '.join(outcome['reasons'])}]{_known(outcome)} "
            f"{outcome['rationale']}",
        ]
    else:
        row = [
            sample.name,
            "dead letter",
            outcome["error"]["code"],
            "",
            "",
            outcome["error"]["message"],
        ]
    decided_by = outcome.get("decided_by")
    if (
        got != sample.expect
        or sample.decision not in (None, decision)
        or sample.decided_by not in (None, decided_by)
    ):
        wanted = " ".join(x for x in (sample.expect, sample.decision, sample.decided_by) if x)
        row[-1] = f"(expected {wanted}) {row[-1]}"
    _print_row(row)


def _known(verdict: dict[str, Any]) -> str:
    """What decided, when known content did: ' [bank demo-known-bad: kb-1, pdq 12]'."""
    match = verdict.get("match")
    if verdict.get("decided_by") in (None, "model") or not match:
        return ""
    distance = f" {match['distance']}" if match["kind"] == "pdq" else ""
    bank = "" if match["bank"] == verdict["decided_by"] else f" {match['bank']}"
    return f" [{verdict['decided_by']}{bank}: {match['entry_id']}, {match['kind']}{distance}]"


def _show_review_topic(
    settings: Settings, samples: list[Sample], reviewed: list[dict[str, Any]]
) -> None:
    """What a review tool reading the review topic gets (decisions.v1.json is its answer)."""
    names = {s.event_id: s.name for s in samples}
    print(f"\n{settings.review_topic!r} received {len(reviewed)} verdicts for a person:")
    for verdict in reviewed:
        print(
            f"  {names.get(verdict['event_id'], verdict['event_id'])}: {verdict['rating']} "
            f"{verdict['category_code']} under {verdict['policy_id']} "
            f"({', '.join(verdict['reasons'])}), tenant {verdict['tenant']}"
        )


def _show_conversation(state: stack.StackState, settings: Settings, event_id: str) -> None:
    """What the reviewer can ask the guard about that verdict (`python -m service ask`)."""
    print(
        f"\na reviewer asks the guard about it: python -m service ask {shlex.quote(event_id)} ..."
    )
    here = settings.model_copy(
        update={
            "bootstrap_servers": state.bootstrap_servers,
            "triton_url": state.triton_grpc,
            "policy_dir": RULES_DIR / "policies",
            "tenant_file": RULES_DIR / "tenants.toml",
        }
    )
    question = "Which rule does the picture break?"
    asyncio.run(converse(here, event_id, [question], policy_id=None, policy=True))


def _print_row(cells: Iterable[str]) -> None:
    parts = []
    for (_, width), cell in zip(_COLUMNS, cells, strict=True):
        text = " ".join(str(cell).split())
        parts.append(text[: width - 1] + "…" if len(text) > width else text.ljust(width))
    print(" ".join(parts).rstrip(), flush=True)


def _show_trace(seen: dict[bytes, dict[str, Any]], files: list[Path]) -> None:
    """Print one verdict's trace: the upload's publish span and the service's spans under it."""
    traced = [o for o in seen.values() if "rating" in o and o.get("trace_id")]
    # A reviewed verdict's trace shows both publishes: the verdict and its review copy.
    verdict = next((o for o in traced if o.get("review")), traced[0] if traced else None)
    if verdict is None:
        return
    spans = [
        s for s in _read_spans(files) if s["context"]["trace_id"] == "0x" + verdict["trace_id"]
    ]
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(span.get("parent_id"), []).append(span)
    print(
        f"\ntrace {verdict['trace_id']} of {verdict['event_id']} "
        f"({len(spans)} spans; files {', '.join(str(f) for f in files)}):"
    )

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start_time"]):
            service = span["resource"]["attributes"].get("service.name", "?")
            print(f"  {'  ' * depth}{span['name']:<{40 - 2 * depth}} {span['kind']:<22} {service}")
            walk(span["context"]["span_id"], depth + 1)

    walk(None, 0)
    print("  (set OTEL_EXPORTER_OTLP_ENDPOINT to send the service's spans to a collector)")


def _read_spans(files: list[Path]) -> list[dict[str, Any]]:
    spans = []
    for path in files:
        if path.exists():
            spans += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return spans
