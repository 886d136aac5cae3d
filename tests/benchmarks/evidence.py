"""Benchmark: what evidence costs — eval's throughput, and shadow mode's toll on the live path.

    .venv/bin/python -m tests.benchmarks.evidence

A script, not a test. It starts its own broker and a Triton serving the CPU guard (NudeNet:
real inference on this machine's CPU), publishes one stream of ~50 KB photo-like JPEGs (no
duplicates: every event is a model call), and measures, in the same process tree:

- the live service alone (`python -m service run`, reuse off);
- the live service with shadow mode on, the candidate being the default policy on the same
  Triton: every event judged twice on the same two cores, the worst case for the live path
  (in production the candidate runs on its own GPU or Triton);
- the same with shadow sampling 10 % of events;
- the same with the candidate down (its Triton address refuses): the live path must not slow;
- `python -m service eval` on the same images written as a labelled manifest, in this process.

Events/s counts verdicts from the first to the last, as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from service.client import encode_event, image_event
from service.config import Settings
from service.dev import stack
from service.evaluate import Options, evaluate
from tests.benchmarks.harness import Outgoing, print_cpu_guard_table, publish
from tests.benchmarks.known_content import INPUT, KnownRun, run_once, stream
from tests.support.stack import free_port


async def benchmark(args: argparse.Namespace, state: stack.StackState, workdir: Path) -> str:
    images = [image for _, image in stream(args.events, unique=1.0, duplicates=0.0)]
    outgoing = [
        Outgoing(f"e{i}".encode(), encode_event(image_event(f"ev-{i:05d}", image=image)), [])
        for i, image in enumerate(images)
    ]
    await publish(state.bootstrap_servers, INPUT, outgoing, idempotent=False)
    print(f"published {len(outgoing)} events of ~{len(images[0]) // 1000} KB", flush=True)
    total = len(images)
    await stack.create_topics(state.bootstrap_servers, ["sh-all", "sh-10", "sh-down"], 3)
    shadow = {"SHADOW_POLICY": "llavaguard-v1.2", "SHADOW_MAX_IN_FLIGHT": "64"}
    dead = f"127.0.0.1:{free_port()}"
    runs = [
        await run_once(state, workdir, "shadow off", total, {}),
        await run_once(state, workdir, "shadow all", total, shadow | {"SHADOW_TOPIC": "sh-all"}),
        await run_once(
            state,
            workdir,
            "shadow 10 pct",
            total,
            shadow | {"SHADOW_SAMPLE": "0.1", "SHADOW_TOPIC": "sh-10"},
        ),
        await run_once(
            state,
            workdir,
            "shadow down",
            total,
            shadow
            | {"SHADOW_TRITON_URL": dead, "SHADOW_TOPIC": "sh-down", "SHADOW_TIMEOUT_S": "2"},
        ),
    ]
    eval_rate = await eval_throughput(state, workdir, images, args.concurrency)
    return report(runs, eval_rate, args.concurrency)


async def eval_throughput(
    state: stack.StackState, workdir: Path, images: list[bytes], concurrency: int
) -> float:
    folder = workdir / "eval"
    folder.mkdir()
    rows = []
    for i, image in enumerate(images):
        (folder / f"{i:05d}.jpg").write_bytes(image)
        rows.append(f'{{"image": "{i:05d}.jpg", "expected_rating": "Safe"}}\n')
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(rows))
    settings = Settings(triton_url=state.triton_grpc, log_level="WARNING")
    started = time.perf_counter()
    document = await evaluate(
        settings, manifest, folder / "out", Options(concurrency=concurrency, progress=False)
    )
    elapsed = time.perf_counter() - started
    rate = float(document["meta"]["items_per_s"])
    print(f"  eval: {len(images)} items, {rate:.2f} items/s judging ({elapsed:.1f} s in all)")
    return rate


def report(runs: list[KnownRun], eval_rate: float, concurrency: int) -> str:
    base = runs[0]
    lines = [
        f"machine load {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores",
        "",
        "| live run | events/s | x shadow off |",
        "|---|---:|---:|",
    ]
    for run in runs:
        ratio = run.events_per_s / base.events_per_s
        lines.append(f"| {run.label} | {run.events_per_s:.2f} | {ratio:.2f} |")
    lines += ["", f"eval (concurrency {concurrency}): {eval_rate:.2f} items/s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="[%(default)s]")
    parser.add_argument("--concurrency", type=int, default=4, help="eval's [%(default)s]")
    parser.add_argument("--broker", default="tansu", choices=["tansu", "noida-db"])
    args = parser.parse_args(argv)
    return print_cpu_guard_table(
        args.broker, INPUT, lambda state, workdir: benchmark(args, state, workdir)
    )


if __name__ == "__main__":
    raise SystemExit(main())
