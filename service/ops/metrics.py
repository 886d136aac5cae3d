"""Prometheus metrics, one registry per service instance (so tests can run several).

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units. The
alert rules and the dashboard in deploy/monitoring/ use these names: a test scrapes a running
service and checks every name and label they use.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from service.core.errors import DEAD_LETTER_FAULTS

# Guard calls take milliseconds on a GPU and seconds on a CPU or under load.
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


def exemplar(trace_id: str | None) -> dict[str, str] | None:
    """The OpenMetrics exemplar linking an observation to its trace (shown on a dashboard's
    latency panel), or none when the event has no trace."""
    return {"trace_id": trace_id} if trace_id else None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # RSS, CPU seconds, open files: the dashboard's resource panels and the memory alerts
        # a platform team already has read these names.
        ProcessCollector(registry=r)
        self.info = Info(
            "guardstream_consumer",
            "What this instance consumes and where it publishes; alerts join on it to name the "
            "consumer group and topic.",
            registry=r,
        )
        self.consumed = Counter(
            "guardstream_events_consumed_total",
            "Records taken from the input topic.",
            ["topic", "partition"],
            registry=r,
        )
        self.verdicts = Counter(
            "guardstream_verdicts_total",
            "Verdicts published, by rating and category code.",
            ["rating", "category"],
            registry=r,
        )
        self.dead_letters = Counter(
            "guardstream_dead_letters_total",
            "Dead letters published, by error code and fault: input (the producer's problem) "
            "or service (ours).",
            ["code", "fault"],
            registry=r,
        )
        # Every code from the start, at 0: a rate over a series that does not exist yet is no
        # rate at all, and alerts on a ratio would stay silent until a first dead letter.
        for code, fault in DEAD_LETTER_FAULTS.items():
            self.dead_letters.labels(code, fault)
        self.reviews = Counter(
            "guardstream_reviews_total",
            "Verdicts also published to the review topic (action review, or sampled).",
            registry=r,
        )
        self.decisions = Counter(
            "guardstream_decisions_total",
            "Verdicts published, by the action taken and the action the rules chose (they "
            "differ only when a policy observes: the would-be blocks and reviews).",
            ["action", "would_action"],
            registry=r,
        )
        self.guard_latency = Histogram(
            "guardstream_guard_latency_seconds",
            "Duration of one guard request to Triton (each attempt).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fetch_latency = Histogram(
            "guardstream_fetch_latency_seconds",
            "Duration of fetching one image.url, redirects included.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "guardstream_end_to_end_latency_seconds",
            "From the input record's timestamp to its outcome being acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "guardstream_in_flight_events",
            "Records taken whose outcome is not yet acknowledged.",
            registry=r,
        )
        self.in_flight_bytes = Gauge(
            "guardstream_in_flight_bytes",
            "Bytes of record values taken whose outcome is not yet acknowledged.",
            registry=r,
        )
        self.guard_retries = Counter(
            "guardstream_guard_retries_total",
            "Guard requests retried after a retriable failure.",
            registry=r,
        )
        self.publish_retries = Counter(
            "guardstream_publish_retries_total",
            "Outcome publications retried after a retriable broker error.",
            registry=r,
        )
        self.breaker_open = Gauge(
            "guardstream_guard_breaker_open",
            "1 while the guard circuit breaker is open (consumption paused), else 0.",
            registry=r,
        )
        self.lag = Gauge(
            "guardstream_partition_lag",
            "Records between the committed offset and the partition's end, refreshed every "
            "commit interval whether or not anything moves (a stuck consumer's lag still grows).",
            ["topic", "partition"],
            registry=r,
        )
        self.tenant_outcomes = Counter(
            "guardstream_tenant_outcomes_total",
            "Outcomes by tenant (a name from the tenant file, unknown for any other name, none "
            "when the event named none) and outcome (the rating, or the dead-letter code); "
            "counted when judged, so a record judged again counts again.",
            ["tenant", "outcome"],
            registry=r,
        )
        self.rules_reload_failures = Counter(
            "guardstream_rules_reload_failures_total",
            "Reloads of the policy files and the tenant file that failed (the rules in force "
            "stay); a file that keeps failing counts once per change and per SIGHUP.",
            registry=r,
        )
        self.rules_reload_ok = Gauge(
            "guardstream_rules_reload_ok",
            "1 when the last load of the policy files and the tenant file succeeded, else 0.",
            registry=r,
        )
        self.rules_loaded = Gauge(
            "guardstream_rules_loaded_timestamp_seconds",
            "When the rules in force (policy files and tenant file) were loaded, Unix time.",
            registry=r,
        )
        self.decided = Counter(
            "guardstream_decided_total",
            "Verdicts by who decided: model, reuse (a verdict reused), bank (a hash-bank match) "
            "or human (a reviewer's standing decision).",
            ["decided_by"],
            registry=r,
        )
        self.bank_matches = Counter(
            "guardstream_bank_matches_total",
            "Images that matched a hash bank, by bank and hash kind (pdq, sha256, md5).",
            ["bank", "kind"],
            registry=r,
        )
        self.bank_entries = Gauge(
            "guardstream_bank_entries",
            "Entries loaded per bank (files and banks topic).",
            ["bank"],
            registry=r,
        )
        self.known_rejected = Counter(
            "guardstream_known_content_rejected_total",
            "Bank rows, bank-topic records and decision records that were not usable (logged "
            "with file:line or topic[partition]@offset, skipped).",
            ["source"],
            registry=r,
        )
        self.reuse_lookups = Counter(
            "guardstream_reuse_lookups_total",
            "Verdict-reuse lookups by result: hit, near (a PDQ near-duplicate), miss (a store "
            "that failed or was slow answers miss: see reuse_store_errors), error (a stored "
            "verdict that does not parse).",
            ["result"],
            registry=r,
        )
        self.reuse_store_errors = Counter(
            "guardstream_reuse_store_errors_total",
            "Reuse-store requests that failed or timed out, by operation (get, put).",
            ["operation"],
            registry=r,
        )
        self.single_flight_waits = Counter(
            "guardstream_single_flight_waits_total",
            "Events that waited for the model's answer about an identical image already being "
            "judged, instead of asking again.",
            registry=r,
        )
        self.shadow_verdicts = Counter(
            "guardstream_shadow_verdicts_total",
            "Shadow verdicts published, by agreement with the live verdict (agree, stricter, "
            "more_lenient, other_category), the live category and the candidate's category.",
            ["agreement", "live_category", "category"],
            registry=r,
        )
        self.shadow_skipped = Counter(
            "guardstream_shadow_skipped_total",
            "Events not shadowed although sampled, by reason: busy (max_in_flight reached), "
            "timeout, dead_letter (the candidate could not judge it), publish_failed, shutdown.",
            ["reason"],
            registry=r,
        )
        self.shadow_in_flight = Gauge(
            "guardstream_shadow_in_flight", "Shadow judgements under way.", registry=r
        )
        self.ready = Gauge(
            "guardstream_ready",
            "1 when the last readiness check (a probe of /readyz, or a scrape) passed, else 0.",
            registry=r,
        )
        self.ready_checks = Gauge(
            "guardstream_ready_check",
            "Each readiness check's last result (1 ok, 0 failing): partitions, broker, guard, "
            "breaker; which one keeps a consumer out of service.",
            ["check"],
            registry=r,
        )
        self.committed = Gauge(
            "guardstream_committed_offset",
            "Last offset committed for the partition (the next record to read).",
            ["topic", "partition"],
            registry=r,
        )

    def dead_letter(self, code: str) -> None:
        self.dead_letters.labels(code, DEAD_LETTER_FAULTS[code]).inc()

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's gauges: its new owner reports them now, and a stale copy
        here would count its lag twice in a sum over the group."""
        for gauge in (self.lag, self.committed):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))
