"""Benchmark: what verdict reuse saves on a stream with duplicates and near-duplicates.

    make bench   # then .venv/bin/python -m tests.benchmarks.known_content

A script, not a test. It starts its own broker and a Triton serving the CPU guard (NudeNet:
real inference, so that a model call costs what a small model costs on this machine's CPU),
publishes one stream of image events of about 50 KB, and runs `python -m service run` over
it three times, each with a consumer group and an output topic of its own:

- reuse off: every event is a model call;
- reuse on (the default: the in-process store, exact duplicates by sha256);
- reuse on with near-duplicates (`GUARDSTREAM_REUSE_PDQ_DISTANCE`).

The stream: `--unique` fraction of new images (smooth random textures, each its own PDQ),
`--duplicates` exact copies of an image sent earlier, the rest near-duplicates of an earlier
image (re-encoded at JPEG quality 60 and resized to 80 %: new bytes, a PDQ a few bits away).
Events/s counts verdicts from the first to the last; model calls are Triton's successful
inference requests meanwhile; "decided by" counts the verdicts' `decided_by`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from service.client import encode_event, image_event
from service.dev import stack
from tests.benchmarks.harness import (
    SERVICE_COMMAND,
    BenchmarkFailed,
    Outgoing,
    OutputReader,
    check_running,
    print_cpu_guard_table,
    publish,
    run_settings,
    start_child,
    stop_child,
    tail,
    triton_metric,
    uninterrupted,
)

INPUT = "known-stream"


@dataclass(frozen=True)
class KnownRun:
    label: str
    events: int
    seconds: float
    events_per_s: float
    model_calls: int
    decided_by: dict[str, int]


def texture(rng: np.random.Generator, side: int = 480) -> Image.Image:
    """A smooth random colour texture: photo-like statistics, a PDQ of its own."""
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
    grain = rng.integers(0, 24, (side, side * 4 // 3, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image) + grain).filter(ImageFilter.SMOOTH)


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def stream(events: int, unique: float, duplicates: float, seed: int = 5) -> list[tuple[str, bytes]]:
    """(kind, image) per event: 'new', 'duplicate' or 'near'; the first is always new."""
    rng = np.random.default_rng(seed)
    sent: list[Image.Image] = []
    encoded: list[bytes] = []
    out: list[tuple[str, bytes]] = []
    for _ in range(events):
        draw = rng.random()
        if not sent or draw < unique:
            sent.append(texture(rng))
            encoded.append(jpeg(sent[-1], 88))
            out.append(("new", encoded[-1]))
        elif draw < unique + duplicates:
            out.append(("duplicate", encoded[rng.integers(len(encoded))]))
        else:
            original = sent[rng.integers(len(sent))]
            smaller = original.resize((original.width * 4 // 5, original.height * 4 // 5))
            out.append(("near", jpeg(smaller, 60)))
    return out


async def run_once(
    state: stack.StackState, workdir: Path, label: str, total: int, overrides: dict[str, str]
) -> KnownRun:
    tag = label.replace(" ", "-")
    await stack.create_topics(state.bootstrap_servers, [f"out-{tag}", f"dlq-{tag}"], 3)
    settings = run_settings(state, tag, INPUT) | overrides
    log_path = workdir / f"{tag}.log"
    print(f"  {label}: {' '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
    async with OutputReader(
        state.bootstrap_servers, [f"out-{tag}", f"dlq-{tag}"], keep_values=True
    ) as reader:
        calls_before = triton_metric(state, "nv_inference_request_success")
        child = start_child(SERVICE_COMMAND, settings, log_path)
        try:
            deadline = time.monotonic() + 600
            while not reader.records:
                check_running(child, log_path)
                if time.monotonic() > deadline:
                    raise BenchmarkFailed(f"no output in 600 s:\n{tail(log_path)}")
                await asyncio.sleep(0.02)
            started = reader.records[0].seen
            if not await reader.wait_for(total, 900):
                raise BenchmarkFailed(f"{len(reader.records)} of {total} outcomes in 900 s")
            seconds = max(r.seen for r in reader.records) - started
            calls = triton_metric(state, "nv_inference_request_success") - calls_before
        finally:
            with uninterrupted():
                stop_child(child)
    outcomes = [json.loads(r.value or b"{}") for r in reader.records]
    deciders = Counter(str(o.get("decided_by", "dead letter")) for o in outcomes)
    # The first verdict is not inside the measured window: n-1 intervals.
    run = KnownRun(label, total, seconds, (total - 1) / seconds, int(calls), dict(deciders))
    print(
        f"    {run.events_per_s:.2f} events/s ({total} in {seconds:.1f} s), "
        f"{run.model_calls} model calls, decided by {dict(deciders)}",
        flush=True,
    )
    return run


async def benchmark(args: argparse.Namespace, state: stack.StackState, workdir: Path) -> str:
    events = stream(args.events, args.unique, args.duplicates)
    kinds = Counter(kind for kind, _ in events)
    outgoing = [
        Outgoing(
            key=f"e{i}".encode(),
            value=encode_event(image_event(f"known-{i:05d}", image=image)),
            headers=[],
        )
        for i, (_, image) in enumerate(events)
    ]
    await publish(state.bootstrap_servers, INPUT, outgoing, idempotent=False)
    print(f"published {len(outgoing)} events: {dict(kinds)}", flush=True)
    runs = [
        await run_once(state, workdir, "reuse off", len(events), {"REUSE": "off"}),
        await run_once(state, workdir, "reuse exact", len(events), {"REUSE": "memory"}),
        await run_once(
            state,
            workdir,
            "reuse near",
            len(events),
            {"REUSE": "memory", "REUSE_PDQ_DISTANCE": str(args.near_distance)},
        ),
    ]
    return report(runs, dict(kinds))


def report(runs: list[KnownRun], kinds: dict[str, int]) -> str:
    base = runs[0]
    lines = [
        f"stream: {sum(kinds.values())} events, {kinds}; machine load {os.getloadavg()[0]:.2f}",
        "",
        "| run | events/s | x reuse off | model calls | calls saved | decided by |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        saved = 1 - run.model_calls / base.model_calls if base.model_calls else 0.0
        lines.append(
            f"| {run.label} | {run.events_per_s:.2f} | {run.events_per_s / base.events_per_s:.2f} "
            f"| {run.model_calls} | {saved:.0%} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(run.decided_by.items()))
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300, help="[%(default)s]")
    parser.add_argument("--unique", type=float, default=0.6, help="[%(default)s]")
    parser.add_argument("--duplicates", type=float, default=0.3, help="[%(default)s]")
    parser.add_argument(
        "--near-distance", type=int, default=24, help="PDQ bits for near reuse [%(default)s]"
    )
    parser.add_argument("--broker", default="tansu", choices=["tansu", "noida-db"])
    args = parser.parse_args(argv)
    return print_cpu_guard_table(
        args.broker, INPUT, lambda state, workdir: benchmark(args, state, workdir)
    )


if __name__ == "__main__":
    raise SystemExit(main())
