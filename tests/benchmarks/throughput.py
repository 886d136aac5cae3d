"""Benchmark: guardstream's throughput, latency, CPU and memory against its ceilings.

    make bench        # = .venv/bin/python -m tests.benchmarks.throughput

A script, not a test: its numbers are read by people. It starts its own Tansu broker and a
Triton serving the fixed-answer guard of `triton_models/bench` (the guard's tensor contract, no
inference), so that what is measured is the service and what it is compared with, not a model.

The images are the mix users upload (`tests/benchmarks/images.py`), each kind measured on its
own (`--sizes` picks some):

    jpeg-50k         50 KB JPEGs, inline (base64)                          15% of the mix
    jpeg-500k        500 KB JPEGs, inline                                  10%
    jpeg-12mp        12 MP phone JPEGs (4032x3024, ~3.4 MB), by URL        35%
    heic-12mp        12 MP HEIC (~2 MB), by URL                            20%
    avif-12mp        12 MP AVIF (~2 MB), by URL                             5%
    webp-1080p       1080p WebP (~250-300 KB), inline                      10%
    png-screenshot   1920x1080 PNG of an app's UI and text (~140 KB)        5%

The 12 MP images are bigger than a Kafka record may be, so they go as `image.url` events to a
static HTTP server this script starts on 127.0.0.1 (every program measured runs with
GUARDSTREAM_FETCH_ALLOWED_NETWORKS=127.0.0.1/32). The weighted mix (the shares above) is
reported from the per-kind figures: its events/s is 1 / (sum of share / events/s), its CPU per
event the weighted mean. An image the service refuses (HEIC and AVIF before it decodes them) is
a dead letter: dead letters are counted per kind and reported, and do not fail the run; a kind
mostly dead-lettered is left out of the mix (refusing is not judging), the shares renormalised.

A full run (every kind, the defaults) takes about 20 minutes on 2 shared cores;
`--modes essential guardstream --paced-seconds 0` measures only the ratio to ceiling C, and
`--report JSON` prints the tables of an earlier run's JSON again without measuring.

For each kind it publishes one backlog and measures, each as a child process with a consumer
group and output topics of its own:

- ceiling A: a bare aiokafka loop that consumes the records and produces a verdict-sized
  record for each (no decoding, no Triton): the most Kafka can move for this mix;
- ceiling B: a bare `tritonclient.grpc.aio` loop sending the same pixel tensors (decoded once)
  at several concurrencies, the best of which counts: the most Triton can take;
- ceiling C: a hand-written loop doing only the work that cannot be skipped: consume, the
  service's own fetch and decode, the request tensors to Triton, produce, commit, at several
  concurrencies (`--essential-in-flight`), the best of which counts: guardstream's events/s is
  reported as a fraction of it (the target is 0.8), which is the service's overhead;
- baseline: a naive loop, one record at a time: consume, judge, publish, wait, commit;
- guardstream: `python -m service run`, at several in-flight limits (the scaling table); the
  run with no overrides is "defaults", the fastest is "best".

Throughput (events/s) is measured on the backlog: outcomes (verdicts and dead letters) counted
by a reader of the output topics, from the first until `--events` of them (or
`--max-seconds`). CPU seconds per 1000 events are the child's own (utime + stime from /proc),
over the same window; Triton's and the broker's are reported beside them. Peak RSS is the
child's VmHWM.

Latency is measured separately, at half of each row's own throughput: a fresh topic, a
warm-up, then events published at a fixed rate for `--paced-seconds`. An event's latency is
its outcome record's timestamp minus its own, both set by the producers when they are handed
the record (milliseconds, the same clock); the time this script's reader saw the outcome is
reported too. "model ms" is Triton's mean compute time per request meanwhile, from its metrics.

The benchmark runs on a shared, small machine: the "others" column is the CPU that processes
not part of the measurement used meanwhile (% of one core; the image server's part of it for
the URL kinds), so a disturbed row can be seen.

`--profile [KIND ...]` adds, per kind named (every kind when none is), one more guardstream
run (defaults, not counted) sampled by py-spy (`py-spy record --native --format raw` for
`--profile-seconds`), and prints its top functions by own samples with their total share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

from service.client import encode_event, image_event
from service.dev import stack
from tests.benchmarks.harness import (
    BENCH_DIR,
    SERVICE_COMMAND,
    BenchmarkFailed,
    CpuTimes,
    MiB,
    Outgoing,
    OutputReader,
    check_running,
    end_offsets,
    image_server,
    in_own_stack,
    peak_rss,
    publish,
    run_settings,
    start_child,
    stop_child,
    tail,
    triton_metric,
    uninterrupted,
)
from tests.benchmarks.images import KINDS, MIX, Kind, images_of, jpeg_of_size, kind
from tests.benchmarks.report import (
    ceiling,
    latencies_ms,
    markdown_table,
    mix_mean,
    mix_rate,
    number,
    percentiles,
    profile_top,
    ratio,
)

__all__ = ["jpeg_of_size"]

DEFAULT_JSON = BENCH_DIR / "throughput.json"
LOOPS = (sys.executable, "-m", "tests.benchmarks.loops")
PY_SPY = Path(sys.executable).with_name("py-spy")
PROFILE_RATE = 100
DEFAULT_IN_FLIGHT = 64
MODES = ("kafka", "triton", "essential", "naive", "guardstream")
IN_FLIGHT_MODES = ("guardstream", "essential")
WARM_UP_EVENTS = 20
# Tansu holds a fetch for fetch.max.wait.ms even when records arrive meanwhile (Kafka answers at
# once), which would add up to Kafka's default 500 ms to every latency measured here. Every
# program that consumes is given this instead, the same for all.
FETCH_MAX_WAIT_MS = 5
_ID_PLACEHOLDER = "@@event-id@@"


@dataclass(frozen=True)
class Latency:
    offered_per_s: float
    events: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    seen_p99_ms: float
    """When this script's reader had the outcome, not when it was written."""
    model_ms: float
    """Triton's mean compute time per request during the run (NaN: no requests)."""
    missing: int
    """Events published whose outcome did not arrive in time."""


@dataclass(frozen=True)
class Run:
    mode: str
    size: str
    """The image kind (a name of images.KINDS)."""
    overrides: dict[str, str]
    """GUARDSTREAM_* settings given (names without the prefix); defaults for the rest."""
    in_flight: int | None
    events: int
    seconds: float
    events_per_s: float
    cpu_s_per_1000: float
    triton_cpu_s_per_1000: float
    broker_cpu_s_per_1000: float
    others_percent: float
    """CPU used meanwhile by processes not part of the measurement, % of one core."""
    peak_rss_mib: float
    triton_batch_mean: float = math.nan
    """Requests per model execution: the batches Triton's dynamic batcher formed."""
    dead_letters: int = 0
    exit_code: int = 0
    latency: Latency | None = None

    @property
    def label(self) -> str:
        if self.mode == "kafka":
            return "ceiling A: aiokafka loop"
        if self.mode == "triton":
            return f"ceiling B: tritonclient loop, {self.in_flight} in flight"
        if self.mode == "naive":
            return "baseline: naive loop"
        if self.mode == "essential":
            return f"ceiling C: essential loop, {self.in_flight} in flight"
        settings = " ".join(f"{k.lower()}={v}" for k, v in sorted(self.overrides.items()))
        return f"guardstream {settings or 'defaults'}"


@dataclass
class SizeResult:
    size: str
    image_bytes: list[int]
    record_bytes_mean: float
    backlog: int
    publish_s: float
    label: str = ""
    by_url: bool = False
    runs: list[Run] = field(default_factory=list)
    triton_levels: list[Run] = field(default_factory=list)
    essential_levels: list[Run] = field(default_factory=list)
    profile_samples: int = 0
    profile: list[tuple[str, int, int]] = field(default_factory=list)
    """py-spy's top functions of a guardstream run: (function, own samples, total samples)."""

    def find(self, mode: str) -> Run | None:
        return next((r for r in self.runs if r.mode == mode), None)

    def guardstream(self) -> list[Run]:
        return [r for r in self.runs if r.mode == "guardstream"]

    def defaults(self) -> Run | None:
        return next((r for r in self.guardstream() if not r.overrides), None)

    def best(self) -> Run | None:
        runs = self.guardstream()
        return max(runs, key=lambda r: r.events_per_s) if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.report is not None:
        document = json.loads(args.report.read_text())
        print(report(load_results(document), document["wall_s"]))
        return 0
    try:
        args.kinds = [kind(name) for name in args.sizes]
    except ValueError as exc:
        parser.error(str(exc))
    if args.events is None:
        args.events = [k.events for k in args.kinds]
    if len(args.events) != len(args.sizes):
        parser.error("--events takes one count per size in --sizes")
    if args.profile is not None and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy, not at {PY_SPY}")
    started = time.monotonic()
    results = in_own_stack(
        "tansu", args.partitions, (), lambda state, workdir: _benchmark(args, state, workdir)
    )
    wall_s = time.monotonic() - started
    print()
    print(report(results, wall_s))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "wall_s": wall_s,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "kinds"
        },
        "mix": MIX,
        "sizes": [asdict(r) for r in results],
    }
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwritten to {args.json} ({wall_s:.0f} s)")
    # Dead letters do not fail the run: the service refuses what it cannot decode yet (HEIC,
    # AVIF), which the report shows per kind.
    failed = [r for s in results for r in s.runs if r.exit_code != 0]
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.throughput",
        description="Measure guardstream against a bare Kafka loop, a bare Triton loop and a "
        "naive loop, on the same broker, Triton (fixed-answer guard) and event mix.",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=list(KINDS),
        metavar="KIND",
        help=f"image kinds: {', '.join(KINDS)}, or jpeg-<bytes> [all]",
    )
    parser.add_argument(
        "--events",
        type=int,
        nargs="+",
        help="backlog per kind, and the outcomes a throughput run waits for "
        f"[{', '.join(f'{k.name} {k.events}' for k in KINDS.values())}]",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=6,
        help="a throughput run ends after this long, if its events are not done [%(default)s]",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=[4, 64, 256],
        help="GUARDSTREAM_MAX_IN_FLIGHT values to run (64, the default, runs as 'defaults') "
        "[%(default)s]",
    )
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="another service setting for every guardstream run but the defaults (repeatable)",
    )
    parser.add_argument(
        "--triton-in-flight",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        help="concurrencies of ceiling B [%(default)s]",
    )
    parser.add_argument("--triton-seconds", type=float, default=2, help="per concurrency [2]")
    parser.add_argument(
        "--essential-in-flight",
        type=int,
        nargs="+",
        default=[16, 64],
        help="concurrencies of ceiling C [%(default)s]",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        metavar="KIND",
        help="one more guardstream run of these kinds (all when none is named), sampled by "
        "py-spy: its top functions",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=6, help="py-spy's sampling [%(default)s]"
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        default=4,
        help="latency runs publish at half the throughput for this long; 0: none [%(default)s]",
    )
    parser.add_argument(
        "--paced-max-events",
        type=int,
        default=2500,
        help="fewer seconds for the fastest rows: the broker keeps every record [%(default)s]",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--partitions", type=int, default=3, help="of every topic [3]")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="[%(default)s]")
    parser.add_argument(
        "--report", type=Path, metavar="JSON", help="measure nothing: the tables of a run's JSON"
    )
    return parser


def _run_from(d: dict[str, Any]) -> Run:
    latency = d.pop("latency")
    return Run(**d, latency=Latency(**latency) if latency else None)


def load_results(document: dict[str, Any]) -> list[SizeResult]:
    """The results of a run's JSON (what main wrote), to report again."""
    results = []
    for size in document["sizes"]:
        size = dict(size)
        for name in ("runs", "triton_levels", "essential_levels"):
            size[name] = [_run_from(dict(r)) for r in size.get(name, [])]
        size["profile"] = [tuple(row) for row in size.get("profile", [])]
        results.append(SizeResult(**size))
    return results


# --- images and events ----------------------------------------------------------------------


class Events:
    """Image events for one kind: the images (bytes, sent inline, or URLs) in turn, ids unique
    per benchmark run."""

    def __init__(self, images: Sequence[bytes | str], run: str) -> None:
        self._run = run
        self._templates = [
            encode_event(
                image_event(_ID_PLACEHOLDER, url=image, metadata={"bench": run})
                if isinstance(image, str)
                else image_event(_ID_PLACEHOLDER, image=image, metadata={"bench": run})
            )
            for image in images
        ]
        self._count = 0

    def take(self, count: int) -> Iterator[Outgoing]:
        for _ in range(count):
            event_id = f"bench-{self._run}-{self._count:07d}".encode()
            template = self._templates[self._count % len(self._templates)]
            self._count += 1
            # A sampled W3C trace context, as an upload service sends: the service continues
            # the trace, which is part of its per-event work.
            traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01".encode()
            yield Outgoing(
                key=event_id,
                value=template.replace(_ID_PLACEHOLDER.encode(), event_id, 1),
                headers=[("traceparent", traceparent), ("event-id", event_id)],
            )


# --- runs -----------------------------------------------------------------------------------


class Bench:
    """Runs one measured program at a time against the stack, each with topics of its own."""

    def __init__(self, args: argparse.Namespace, state: stack.StackState, workdir: Path) -> None:
        self._args = args
        self._state = state
        self.workdir = workdir
        self._runs = 0

    async def _topics(self, *names: str) -> None:
        await stack.create_topics(self._state.bootstrap_servers, names, self._args.partitions)

    def _settings(self, tag: str, input_topic: str, overrides: dict[str, str]) -> dict[str, str]:
        fetch = {
            "FETCH_MAX_WAIT_MS": str(FETCH_MAX_WAIT_MS),
            # The 12 MP kinds come from this script's image server on 127.0.0.1.
            "FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
        }
        return run_settings(self._state, tag, input_topic) | fetch | overrides

    def _tag(self, mode: str, size: str) -> str:
        self._runs += 1
        return f"{self._runs:02d}-{mode}-{size}"

    async def throughput(
        self,
        mode: str,
        size: str,
        backlog: str,
        events: int,
        overrides: dict[str, str],
        profile: Path | None = None,
    ) -> Run:
        """Work through the backlog (or until --max-seconds) and measure; with `profile`, the
        run lasts --profile-seconds instead, sampled by py-spy into that file."""
        tag = self._tag(mode if profile is None else f"{mode}-profile", size)
        await self._topics(f"out-{tag}", f"dlq-{tag}", f"review-{tag}")
        settings = self._settings(tag, backlog, overrides)
        log_path = self.workdir / f"{tag}.log"
        command = SERVICE_COMMAND if mode == "guardstream" else (*LOOPS, mode)
        print(f"  {tag}: {' '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
        outputs = [f"out-{tag}", f"dlq-{tag}"]  # a dead letter is an outcome too
        async with OutputReader(self._state.bootstrap_servers, outputs) as reader:
            child = start_child(command, settings, log_path)
            spy: subprocess.Popen[bytes] | None = None
            try:
                await self._first_output(reader, child, log_path)
                cpu_start, count_start = CpuTimes.now(child.pid, self._state), len(reader.records)
                batches = _triton_counts(self._state)
                started = time.monotonic()
                if profile is not None:
                    spy = _py_spy(child.pid, self._args.profile_seconds, profile)
                while (
                    spy.poll() is None
                    if spy is not None
                    else len(reader.records) < events
                    and time.monotonic() - started < self._args.max_seconds
                ):
                    check_running(child, log_path)
                    await asyncio.sleep(0.05)
                cpu = CpuTimes.now(child.pid, self._state).since(cpu_start)
                requests, executions = np.subtract(_triton_counts(self._state), batches)
                seconds = time.monotonic() - started
                counted = len(reader.records) - count_start
                peak = peak_rss(child.pid)
            finally:
                with uninterrupted():
                    exit_code = stop_child(child)
                    if spy is not None:
                        stop_child(spy)
        dead_letters = (await end_offsets(self._state.bootstrap_servers, [f"dlq-{tag}"]))[
            f"dlq-{tag}"
        ]
        run = Run(
            mode=mode,
            size=size,
            overrides=overrides,
            in_flight=int(overrides.get("MAX_IN_FLIGHT", DEFAULT_IN_FLIGHT))
            if mode in IN_FLIGHT_MODES
            else None,
            events=counted,
            seconds=seconds,
            events_per_s=counted / seconds,
            cpu_s_per_1000=1000 * cpu["measured"] / (counted or math.nan),
            triton_cpu_s_per_1000=1000 * cpu["triton"] / (counted or math.nan),
            broker_cpu_s_per_1000=1000 * cpu["broker"] / (counted or math.nan),
            others_percent=100 * cpu["others"] / seconds,
            peak_rss_mib=peak / MiB,
            triton_batch_mean=requests / executions if executions else math.nan,
            dead_letters=dead_letters,
            exit_code=exit_code,
        )
        print(
            f"    {run.events_per_s:.0f} events/s ({counted} in {seconds:.1f} s), "
            f"{run.cpu_s_per_1000:.2f} CPU s per 1000, peak RSS {run.peak_rss_mib:.0f} MiB, "
            f"{dead_letters} dead letters, exit {exit_code}",
            flush=True,
        )
        return run

    async def _first_output(
        self, reader: OutputReader, child: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        deadline = time.monotonic() + 120
        while not reader.records:
            check_running(child, log_path)
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"no output in 120 s:\n{tail(log_path)}")
            await asyncio.sleep(0.02)

    async def latency(self, run: Run, images: Sequence[bytes | str], rate: float) -> Latency:
        """Publish at `rate` events/s to a fresh topic the program reads live; latencies."""
        tag = self._tag(f"{run.mode}-paced", run.size)
        live = f"live-{tag}"
        await self._topics(live, f"out-{tag}", f"dlq-{tag}", f"review-{tag}")
        settings = self._settings(tag, live, run.overrides)
        log_path = self.workdir / f"{tag}.log"
        command = SERVICE_COMMAND if run.mode == "guardstream" else (*LOOPS, run.mode)
        events = Events(images, tag)
        count = max(20, min(self._args.paced_max_events, round(rate * self._args.paced_seconds)))
        print(f"  {tag}: {count} events at {rate:.0f}/s", flush=True)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._state.bootstrap_servers,
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
            max_request_size=8 * MiB,
        )
        await producer.start()
        try:
            outputs = [f"out-{tag}", f"dlq-{tag}"]
            async with OutputReader(self._state.bootstrap_servers, outputs) as reader:
                child = start_child(command, settings, log_path)
                try:
                    for record in events.take(WARM_UP_EVENTS):
                        await producer.send(live, record.value, record.key, headers=record.headers)
                    await self._first_output(reader, child, log_path)
                    await reader.wait_for(WARM_UP_EVENTS, timeout_s=60)
                    computed = triton_metric(self._state, "nv_inference_compute_infer_duration_us")
                    requests = triton_metric(self._state, "nv_inference_request_success")
                    sent_ms = await _paced(producer, live, events.take(count), rate)
                    arrived = await reader.wait_for(WARM_UP_EVENTS + count, timeout_s=60)
                    computed = (
                        triton_metric(self._state, "nv_inference_compute_infer_duration_us")
                        - computed
                    )
                    requests = triton_metric(self._state, "nv_inference_request_success") - requests
                finally:
                    with uninterrupted():
                        stop_child(child)
        finally:
            await producer.stop()
        created = latencies_ms(sent_ms, [(r.key, r.timestamp_ms) for r in reader.records])
        seen = latencies_ms(sent_ms, [(r.key, round(1000 * r.seen)) for r in reader.records])
        p50, p95, p99 = percentiles(created, (50, 95, 99))
        latency = Latency(
            offered_per_s=rate,
            events=len(created),
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            seen_p99_ms=percentiles(seen, (99,))[0],
            model_ms=computed / requests / 1000 if requests else math.nan,
            missing=count - len(created),
        )
        print(
            f"    p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms"
            + ("" if arrived else f"; {latency.missing} outcomes missing"),
            flush=True,
        )
        return latency

    async def triton(self, size: str, paths: Sequence[Path], rate: float | None) -> list[Run]:
        """Ceiling B at each concurrency, or paced at `rate` (one result)."""
        tag = self._tag("triton" if rate is None else "triton-paced", size)
        out = self.workdir / f"{tag}.json"
        log_path = self.workdir / f"{tag}.log"
        command = [*LOOPS, "triton", "--images", *map(str, paths), "--json", str(out)]
        command += ["--triton-pid", str(self._state.triton_pid)]
        if rate is None:
            command += ["--seconds", str(self._args.triton_seconds), "--levels"]
            command += [str(c) for c in self._args.triton_in_flight]
        else:
            command += ["--seconds", str(self._args.paced_seconds), "--rate", str(rate)]
        print(f"  {tag}", flush=True)
        child = start_child(command, self._settings(tag, "unused", {}), log_path)
        try:
            exit_code = await asyncio.to_thread(child.wait, 300)
        finally:
            with uninterrupted():
                stop_child(child)
        if exit_code != 0:
            raise BenchmarkFailed(f"{tag} exited with {exit_code}:\n{tail(log_path)}")
        runs = []
        for level in json.loads(out.read_text()):
            requests = level["requests"]
            runs.append(
                Run(
                    mode="triton",
                    size=size,
                    overrides={},
                    in_flight=level["in_flight"],
                    events=requests,
                    seconds=level["seconds"],
                    events_per_s=level["per_s"],
                    cpu_s_per_1000=1000 * level["cpu_s"] / requests,
                    triton_cpu_s_per_1000=1000 * level["triton_cpu_s"] / requests,
                    broker_cpu_s_per_1000=math.nan,
                    others_percent=math.nan,
                    peak_rss_mib=level["peak_rss_bytes"] / MiB,
                    latency=Latency(
                        offered_per_s=rate,
                        events=requests,
                        p50_ms=level["p50_ms"],
                        p95_ms=level["p95_ms"],
                        p99_ms=level["p99_ms"],
                        seen_p99_ms=math.nan,
                        model_ms=math.nan,
                        missing=0,
                    )
                    if rate is not None
                    else None,
                )
            )
            print(f"    {level['in_flight']} in flight: {level['per_s']:.0f}/s", flush=True)
        return runs


def _triton_counts(state: stack.StackState) -> tuple[float, float]:
    """Requests Triton's guard answered, and the model executions (batches) that did it."""
    return (
        triton_metric(state, "nv_inference_request_success"),
        triton_metric(state, "nv_inference_exec_count"),
    )


def _py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` (and its native frames: Pillow's decoders) into `out`."""
    command = [str(PY_SPY), "record", "--native", "--format", "raw", "--rate", str(PROFILE_RATE)]
    command += ["--duration", str(max(1, round(seconds))), "-o", str(out), "-p", str(pid)]
    with out.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


async def _paced(
    producer: AIOKafkaProducer, topic: str, records: Iterator[Outgoing], rate: float
) -> dict[bytes, int]:
    """Publish at a fixed rate, by the clock (a late send does not delay the next ones); each
    record's timestamp, set here so that it is known exactly."""
    sent: dict[bytes, int] = {}
    deliveries = []
    started = time.monotonic()
    for i, record in enumerate(records):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        timestamp_ms = round(time.time() * 1000)
        deliveries.append(
            await producer.send(
                topic,
                record.value,
                record.key,
                headers=record.headers,
                timestamp_ms=timestamp_ms,
            )
        )
        sent[record.key] = timestamp_ms
    await asyncio.gather(*deliveries)
    return sent


async def _benchmark(
    args: argparse.Namespace, state: stack.StackState, workdir: Path
) -> list[SizeResult]:
    served = workdir / "served"
    served.mkdir()
    async with image_server(served) as base_url:
        return [
            await _kind(args, Bench(args, state, workdir), state, k, events, served, base_url)
            for k, events in zip(args.kinds, args.events, strict=True)
        ]


async def _kind(
    args: argparse.Namespace,
    bench: Bench,
    state: stack.StackState,
    k: Kind,
    backlog_events: int,
    served: Path,
    base_url: str,
) -> SizeResult:
    extra = dict(item.split("=", 1) for item in args.set)
    extra = {k.upper().removeprefix("GUARDSTREAM_"): v for k, v in extra.items()}
    images = await asyncio.to_thread(images_of, k, BENCH_DIR / "images")
    paths = []
    for i, image in enumerate(images):
        paths.append(served / f"{k.name}-{i}{k.suffix}")
        paths[-1].write_bytes(image)
    sources: list[bytes | str] = (
        [f"{base_url}/{path.name}" for path in paths] if k.by_url else list(images)
    )
    backlog = f"images-{k.name}"
    await stack.create_topics(state.bootstrap_servers, [backlog], args.partitions)
    events = Events(sources, secrets.token_hex(4))
    print(
        f"{k.label} ({', '.join(f'{len(i) / 1000:.0f}' for i in images)} KB"
        f"{', by URL' if k.by_url else ''}): publishing {backlog_events} events to "
        f"{backlog!r} ...",
        flush=True,
    )
    started = time.monotonic()
    sent, total = await publish(
        state.bootstrap_servers, backlog, events.take(backlog_events), idempotent=False
    )
    result = SizeResult(
        size=k.name,
        image_bytes=[len(i) for i in images],
        record_bytes_mean=total / sent,
        backlog=sent,
        publish_s=time.monotonic() - started,
        label=k.label,
        by_url=k.by_url,
    )
    for mode in ("kafka", "naive"):
        if mode in args.modes:
            result.runs.append(await bench.throughput(mode, k.name, backlog, sent, {}))
    if "essential" in args.modes:
        for in_flight in args.essential_in_flight:
            overrides = {"MAX_IN_FLIGHT": str(in_flight)}
            result.essential_levels.append(
                await bench.throughput("essential", k.name, backlog, sent, overrides)
            )
        result.runs.append(max(result.essential_levels, key=lambda r: r.events_per_s))
    if "guardstream" in args.modes:
        for in_flight in args.in_flight:
            overrides = (
                {} if in_flight == DEFAULT_IN_FLIGHT else {"MAX_IN_FLIGHT": str(in_flight), **extra}
            )
            result.runs.append(
                await bench.throughput("guardstream", k.name, backlog, sent, overrides)
            )
        if args.profile is not None and (not args.profile or k.name in args.profile):
            raw = bench.workdir / f"profile-{k.name}.txt"
            await bench.throughput("guardstream", k.name, backlog, sent, {}, profile=raw)
            if raw.exists():
                with raw.open() as lines:
                    result.profile_samples, result.profile = profile_top(lines)
            else:
                print(f"    py-spy wrote no profile:\n{tail(raw.with_suffix('.log'))}")
    if "triton" in args.modes:
        result.triton_levels = await bench.triton(k.name, paths, None)
        if result.triton_levels:
            result.runs.append(max(result.triton_levels, key=lambda r: r.events_per_s))
    if args.paced_seconds > 0:
        await _latencies(bench, result, sources, paths)
    return result


async def _latencies(
    bench: Bench, result: SizeResult, images: Sequence[bytes | str], paths: Sequence[Path]
) -> None:
    """Each table row's latency at half its own throughput."""
    rows = [
        result.find("kafka"),
        result.find("essential"),
        result.find("naive"),
        result.defaults(),
        result.best(),
    ]
    for i, run in enumerate(rows):
        if run is None or any(run is other for other in rows[:i]):
            continue  # the defaults may be the best too
        latency = await bench.latency(run, images, run.events_per_s / 2)
        result.runs[result.runs.index(run)] = replace(run, latency=latency)
    b = result.find("triton")
    if b is not None:
        paced = (await bench.triton(result.size, paths, b.events_per_s / 2))[0]
        result.runs[result.runs.index(b)] = replace(b, latency=paced.latency)


# --- the report -----------------------------------------------------------------------------


def report(results: Sequence[SizeResult], wall_s: float) -> str:
    parts = [_summary_table(results)]
    for result in results:
        parts.append(_size_table(result))
        if result.profile:
            parts.append(_profile_table(result))
    parts.append(_scaling_table(results))
    if any(r.triton_levels for r in results):
        parts.append(_triton_table(results))
    if any(r.essential_levels for r in results):
        parts.append(_essential_table(results))
    parts.append(f"benchmark wall time {wall_s:.0f} s")
    return "\n\n".join(parts)


def _summary_table(results: Sequence[SizeResult]) -> str:
    """Per kind and for the weighted mix: guardstream (best) against ceiling C."""
    header = [
        "image kind",
        "share",
        "C events/s",
        "guardstream events/s",
        "x C",
        "C CPU ms/ev",
        "guardstream CPU ms/ev",
        "peak RSS MiB",
        "dead letters",
    ]
    rows = []
    rates: dict[str, dict[str, float]] = {"c": {}, "g": {}, "c_cpu": {}, "g_cpu": {}}
    for result in results:
        c, g = result.find("essential"), result.best()
        c_rate = c.events_per_s if c else math.nan
        g_rate = g.events_per_s if g else math.nan
        rates["c"][result.size] = c_rate
        rates["g"][result.size] = g_rate
        rates["c_cpu"][result.size] = c.cpu_s_per_1000 if c else math.nan
        rates["g_cpu"][result.size] = g.cpu_s_per_1000 if g else math.nan
        dead = [r.dead_letters for r in result.guardstream()]
        rows.append(
            [
                result.label or result.size,
                f"{100 * MIX.get(result.size, 0):.0f}%",
                number(c_rate),
                number(g_rate),
                number(ratio(g_rate, c_rate), 2),
                number(rates["c_cpu"][result.size], 2),
                number(rates["g_cpu"][result.size], 2),
                number(max((r.peak_rss_mib for r in result.guardstream()), default=None)),
                str(max(dead)) if dead else "-",
            ]
        )
    # A kind the service dead-letters (HEIC, AVIF before it decodes them) is not in the mix:
    # refusing is not judging, and it is fast.
    judged = {r.size for r in results if (g := r.best()) and g.dead_letters <= g.events // 2}
    in_mix = [r.size for r in results if MIX.get(r.size) and r.size in judged]
    if in_mix:
        weights = {name: MIX[name] for name in in_mix}
        c_mix, g_mix = mix_rate(weights, rates["c"]), mix_rate(weights, rates["g"])
        share = sum(weights.values())
        rows.append(
            [
                "weighted mix" + ("" if share > 0.999 else f" (of the {100 * share:.0f}% judged)"),
                f"{100 * share:.0f}%",
                number(c_mix),
                number(g_mix),
                number(ratio(g_mix, c_mix), 2),
                number(mix_mean(weights, rates["c_cpu"]), 2),
                number(mix_mean(weights, rates["g_cpu"]), 2),
                "-",
                "-",
            ]
        )
    notes = (
        "- guardstream: its best run of the in-flight limits; C: ceiling C at its best "
        "concurrency; CPU ms per event = CPU s per 1000 events of the measured process alone; "
        "dead letters: the most of any guardstream run of the kind; the weighted mix leaves out "
        "kinds mostly dead-lettered (not judged), its shares renormalised"
    )
    return markdown_table(header, rows) + "\n\n" + notes


def _profile_table(result: SizeResult) -> str:
    header = [f"py-spy: guardstream defaults, {result.label or result.size}", "own %", "total %"]
    rows = [
        [
            f"`{frame}`",
            number(100 * own / result.profile_samples, 1),
            number(100 * total / result.profile_samples, 1),
        ]
        for frame, own, total in result.profile
    ]
    return (
        markdown_table(header, rows)
        + f"\n\n- {result.profile_samples} samples of every thread, {PROFILE_RATE} a second "
        "(py-spy leaves out threads it sees idle); own: the innermost frame, total: anywhere "
        "in the stack; `? (lib)`: native code without symbols"
    )


def _size_table(result: SizeResult) -> str:
    a, b, baseline = result.find("kafka"), result.find("triton"), result.find("naive")
    c = result.find("essential")
    defaults, best = result.defaults(), result.best()
    rows: list[Run] = [r for r in (a, b, c, baseline, defaults) if r is not None]
    if best is not None and best is not defaults:
        rows.append(best)
    lines = [
        [
            run.label + (" (best)" if run is best else ""),
            number(run.events_per_s),
            *(
                number(getattr(run.latency, name) if run.latency else None, 1)
                for name in ("p50_ms", "p95_ms", "p99_ms")
            ),
            number(run.cpu_s_per_1000, 2),
            number(run.triton_cpu_s_per_1000, 2),
            number(run.peak_rss_mib),
            number(run.others_percent),
            str(run.events),
            str(run.dead_letters) if run.mode != "triton" else "-",
        ]
        for run in rows
    ]
    header = [
        result.label or result.size,
        "events/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "CPU s/1000 ev",
        "Triton CPU s/1000",
        "peak RSS MiB",
        "others %",
        "events",
        "dead letters",
    ]
    limit = ceiling([r.events_per_s for r in (a, b) if r is not None])
    notes = [
        f"backlog {result.backlog} events, {result.record_bytes_mean / 1000:.0f} KB per "
        f"record{' (URL events)' if result.by_url else ''} (images of "
        f"{', '.join(f'{n / 1000:.0f}' for n in result.image_bytes)} KB); "
        "latency at half of each row's events/s"
    ]
    for run in (defaults, best if best is not defaults else None):
        if run is None:
            continue
        baseline_rate = baseline.events_per_s if baseline else math.nan
        c_rate = c.events_per_s if c else math.nan
        notes.append(
            f"{run.label}: {number(ratio(run.events_per_s, c_rate), 2)} x C, "
            f"{number(ratio(run.events_per_s, limit), 2)} x min(A, B), "
            f"{number(ratio(run.events_per_s, baseline_rate), 1)} x baseline"
            + (
                f"; p99 at half its throughput {run.latency.p99_ms:.1f} ms, "
                f"minus the model's {run.latency.model_ms:.2f} ms"
                if run.latency
                else ""
            )
        )
    return markdown_table(header, lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _scaling_table(results: Sequence[SizeResult]) -> str:
    """guardstream by in-flight limit, a row per kind and limit ("batch": requests per model
    execution in Triton)."""
    header = ["kind", "in flight", "events/s", "CPU s/1000", "peak RSS MiB", "batch", "dead"]
    rows = [
        [
            s.size,
            str(run.in_flight),
            number(run.events_per_s),
            number(run.cpu_s_per_1000, 2),
            number(run.peak_rss_mib),
            number(run.triton_batch_mean, 1),
            str(run.dead_letters),
        ]
        for s in results
        for run in sorted(s.guardstream(), key=lambda r: r.in_flight or 0)
    ]
    return markdown_table(header, rows, right=1)


def _triton_table(results: Sequence[SizeResult]) -> str:
    header = ["ceiling B", "in flight", "requests/s", "client CPU s/1000", "Triton CPU s/1000"]
    rows = [
        [
            s.size,
            str(run.in_flight),
            number(run.events_per_s),
            number(run.cpu_s_per_1000, 2),
            number(run.triton_cpu_s_per_1000, 2),
        ]
        for s in results
        for run in s.triton_levels
    ]
    return markdown_table(header, rows, right=1)


def _essential_table(results: Sequence[SizeResult]) -> str:
    header = ["ceiling C", "in flight", "events/s", "CPU s/1000", "peak RSS MiB", "dead"]
    rows = [
        [
            s.size,
            str(run.in_flight),
            number(run.events_per_s),
            number(run.cpu_s_per_1000, 2),
            number(run.peak_rss_mib),
            str(run.dead_letters),
        ]
        for s in results
        for run in s.essential_levels
    ]
    return markdown_table(header, rows, right=1)


if __name__ == "__main__":
    sys.exit(main())
