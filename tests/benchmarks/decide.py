"""Benchmark: what deciding costs per event, beside what building the verdict costs.

    .venv/bin/python -m tests.benchmarks.decide [--events 200000]

A script, not a test: it prints microseconds per event (median of 5 rounds) for `decide` under
the packaged rules and under rules that use every feature (a category mapping, both bands,
sampling, observe-only), and for building and serialising the verdict it is part of, so the
decision's share of the per-event work can be read off.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from service.core.decisions import DecisionRules, decide
from service.core.policies import PolicyRegistry
from service.core.verdicts import ModelInfo, Source, Timings, Verdict, serialize

RULE_SETS = {
    "packaged (llavaguard-v1.2)": PolicyRegistry.load().get("llavaguard-v1.2").decision,
    "every feature": DecisionRules(
        categories={"O4": "review", "O9": "allow"},
        sample_allowed=0.05,
        sample_blocked=0.1,
    ),
    "observe-only": DecisionRules(enforce=False, sample_allowed=0.05),
}
ANSWERS = [
    ("Safe", "NA", 0.9),
    ("Unsafe", "O4", 0.65),
    ("Unsafe", "O1", 0.95),
    ("Safe", "NA", None),
]


def per_event_us(run: Callable[[int], None], events: int, rounds: int = 5) -> float:
    """Median over `rounds` of the wall time of `run(events)`, per event, in microseconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run(events)
        times.append((time.perf_counter() - started) / events * 1e6)
    return statistics.median(times)


def deciding(rules: DecisionRules) -> Callable[[int], None]:
    ids = [f"event-{n}" for n in range(1000)]

    def run(events: int) -> None:
        for n in range(events):
            rating, code, confidence = ANSWERS[n % len(ANSWERS)]
            decide(
                rules,
                rating=rating,
                category_code=code,
                confidence=confidence,
                event_id=ids[n % 1000],
            )

    return run


def building_verdicts(events: int) -> None:
    model = ModelInfo(name="m", version="1", triton_model="guard", triton_version="1")
    source = Source(topic="images", partition=0, offset=1)
    timings = Timings(decode_ms=1.0, guard_ms=10.0, total_ms=12.0)
    for n in range(events):
        serialize(
            Verdict(
                event_id=f"event-{n}",
                rating="Unsafe",
                category="O4: Nudity Content",
                category_code="O4",
                rationale="a rationale of about this length, which the model writes for us",
                confidence=0.65,
                action="review",
                would_action="review",
                review=True,
                reasons=["category:O4", "confidence_below:0.7"],
                policy_id="llavaguard-v1.2",
                policy_version="1.2.1+281cc87e3207",
                model=model,
                image_sha256="0" * 64,
                metadata={"user": "u-1"},
                source=source,
                trace_id=None,
                timings=timings,
                decided_at=datetime.now(UTC),
            )
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args(argv)
    figures = {
        f"decide, {name}": per_event_us(deciding(rules), args.events)
        for name, rules in RULE_SETS.items()
    }
    figures["build + serialise the verdict"] = per_event_us(
        building_verdicts, max(1, args.events // 10)
    )
    print(f"per event, median of 5 rounds of {args.events} events:")
    for name, us in figures.items():
        print(f"  {name:<40} {us:8.2f} µs")
    return figures


if __name__ == "__main__":
    main()
