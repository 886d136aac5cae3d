"""Benchmark: how fast `python -m service replay` judges a backlog, paced and unpaced.

    .venv/bin/python -m tests.benchmarks.replay [--events 150]

A script, not a test. It starts its own broker (noida-db: Tansu 0.6 answers ListOffsets short
of a partition's end, and a replay's range ends where ListOffsets says) and a Triton serving
the CPU guard (NudeNet: real inference), publishes `--events` photo events of about 50 KB, and
replays the whole range three times in this process, each run with its own run id and output
topic: at --rate 10, at --rate 50 and with no limit (--rate 0), --concurrency 8 (`--rates`,
`--concurrency` to change them).

Events/s counts acknowledged outcomes (OUT/outcomes.jsonl rows) from the first to the last, so
the start-up (waiting for Triton, reading the original verdicts) is not in the figure; the
wall time of the whole command is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from skimage import data as photos

from service.__main__ import build_parser
from service.adapters.kafka.ranges import topic_ends
from service.client import encode_event, image_event
from service.config import Settings
from service.dev import stack
from service.replay import main as replay
from tests.benchmarks.harness import BenchmarkFailed, Outgoing, print_cpu_guard_table, publish
from tests.benchmarks.throughput import jpeg_of_size

INPUT = "replay-backlog"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


@dataclass(frozen=True)
class ReplayRun:
    rate: str
    events: int
    events_per_s: float
    wall_s: float


def backlog(events: int) -> list[Outgoing]:
    images = [jpeg_of_size(getattr(photos, name)(), 50_000) for name in PHOTOS]
    return [
        Outgoing(
            key=f"e{i}".encode(),
            value=encode_event(image_event(f"replay-{i:05d}", image=images[i % len(images)])),
            headers=[],
        )
        for i in range(events)
    ]


async def run_once(
    settings: Settings, workdir: Path, spans: list[str], rate: float, args: argparse.Namespace
) -> ReplayRun:
    total = args.events
    label = "no limit" if rate == 0 else f"{rate:g}/s"
    topic = f"replay-out-{rate:g}"
    await stack.create_topics(settings.bootstrap_servers, [topic, f"{topic}.dlq"], 3)
    out = workdir / f"replay-{rate:g}"
    args = build_parser().parse_args(
        [
            "replay",
            *(f"--offsets={span}" for span in spans),
            "--topic",
            topic,
            "--out",
            str(out),
            "--rate",
            str(rate),
            "--concurrency",
            str(args.concurrency),
            "--no-progress",
        ]
    )
    seen: list[float] = []  # when each outcome row appeared

    async def watch() -> None:
        path = out / "outcomes.jsonl"
        while True:
            rows = path.read_bytes().count(b"\n") if path.exists() else 0
            seen.extend([time.monotonic()] * (rows - len(seen)))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        code = await replay(settings, args, asyncio.Event())
        await asyncio.sleep(0.05)  # the watcher's last look
    finally:
        watcher.cancel()
    wall = time.monotonic() - started
    if code != 0 or len(seen) != total:
        raise BenchmarkFailed(f"replay at {label}: exit {code}, {len(seen)} of {total} outcomes")
    # The first outcome is not inside the measured window: n-1 intervals.
    run = ReplayRun(label, total, (total - 1) / (seen[-1] - seen[0]), wall)
    print(f"  {label}: {run.events_per_s:.2f} events/s, whole command {wall:.1f} s", flush=True)
    return run


async def benchmark(args: argparse.Namespace, state: stack.StackState, workdir: Path) -> str:
    records = backlog(args.events)
    await publish(state.bootstrap_servers, INPUT, records, idempotent=True)
    ends = await topic_ends(Settings(bootstrap_servers=state.bootstrap_servers), INPUT)
    spans = [f"{p}:0-{end}" for p, end in sorted(ends.items()) if end]
    print(f"published {len(records)} events of ~50 KB", flush=True)
    settings = Settings(
        bootstrap_servers=state.bootstrap_servers,
        triton_url=state.triton_grpc,
        input_topic=INPUT,
        verdict_topic="verdicts-none",  # no originals: every row compares with nothing
        health_port=0,
        decisions_topic="",
        banks_topic="",
    )
    runs = [await run_once(settings, workdir, spans, rate, args) for rate in args.rates]
    return report(runs, args.concurrency)


def report(runs: list[ReplayRun], concurrency: int) -> str:
    lines = [
        f"{runs[0].events} events of ~50 KB, CPU guard, --concurrency {concurrency}; "
        f"load average {os.getloadavg()[0]:.2f}",
        "",
        "| --rate | events/s | whole command (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r.rate} | {r.events_per_s:.2f} | {r.wall_s:.1f} |" for r in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150, help="[%(default)s]")
    parser.add_argument("--concurrency", type=int, default=8, help="[%(default)s]")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[10, 50, 0], help="0: no limit [%(default)s]"
    )
    args = parser.parse_args(argv)
    return print_cpu_guard_table(
        "noida-db", INPUT, lambda state, workdir: benchmark(args, state, workdir)
    )


if __name__ == "__main__":
    raise SystemExit(main())
