"""Benchmark: the consumer's memory over a large backlog, and its throughput.

    .venv/bin/python -m tests.benchmarks.backlog_memory --events 100000

A script, not a test: it takes minutes and its numbers are read by people. It starts its own
broker and Triton (serving the fixed-answer model of `triton_models/bench`, so the service and
not the guard is measured) on free ports in a temporary directory, publishes the whole backlog
first, then starts `python -m service run` as a child process exactly as a pod runs it, and
samples that process's resident memory while it works through the backlog. Progress is the
consumer group's committed offsets, which is also what "done" means for the service.

The memory is "flat" when the least-squares slope of RSS against events committed, between 25%
and 100% of the backlog, is about 0 MiB per 10k events: what the service holds then depends on
its in-flight window, not on how much it has already processed.

The broker is Tansu by default: like Apache Kafka it stops a fetch at max_partition_fetch_bytes
(1 MiB per partition), so what the consumer buffers is bounded as it would be in production.
It refuses idempotent producers, so the service runs with GUARDSTREAM_ENABLE_IDEMPOTENCE=false
(delivery stays at least once). `--broker noida-db` is the other choice; noida-db 0.2.3 ignores
fetch byte limits and answers with the rest of the partition, so there one fetch holds up to the
whole remaining backlog and the client's memory follows it.

The events are small PNGs, inline, unless `--images KIND` names a kind of the throughput
benchmark's (`tests/benchmarks/images.py`): `--images jpeg-12mp --events 64` is a backlog of 64
URL events of 12 MP phone JPEGs (served by a static HTTP server on 127.0.0.1, which the service
is allowed to fetch from), all of them in flight at once at the default in-flight limit: the
memory the service needs for a window of phone photos. "VmHWM" is the kernel's own peak of the
service's RSS, read before it is stopped (the samples may miss a short peak).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from PIL import Image

from service.client import encode_event, image_event
from service.core.events import ImageEvent
from service.dev import stack
from tests.benchmarks.harness import (
    BENCH_DIR,
    SERVICE_COMMAND,
    BenchmarkFailed,
    CpuTimes,
    MiB,
    Outgoing,
    check_running,
    end_offsets,
    image_server,
    in_own_stack,
    listening_port,
    log_problems,
    partitions_of,
    peak_rss,
    publish,
    rss,
    rss_or_zero,
    start_child,
    stop_child,
    uninterrupted,
)
from tests.benchmarks.images import KINDS, images_of

DEFAULT_JSON = BENCH_DIR / "backlog_memory.json"
INPUT_TOPIC, VERDICT_TOPIC, DEAD_LETTER_TOPIC = "images", "verdicts", "images.dlq"
REVIEW_TOPIC = "verdicts.review"
GROUP = "guardstream-bench"
# While the service starts, memory and its metrics are read this often, so that the "start"
# sample is taken at most this long before the first event.
STARTUP_POLL_S = 0.05


@dataclass(frozen=True)
class Sample:
    t: float
    """Seconds since the service was started."""
    rss_bytes: int
    committed: int
    """Events committed by the group (sum of committed offsets; the topic starts at 0)."""


@dataclass(frozen=True)
class Result:
    events: int
    partitions: int
    record_bytes_mean: float
    produce_s: float
    service_settings: dict[str, str]
    """GUARDSTREAM_* settings given to the service, less the addresses."""
    overrides: dict[str, str]
    """Those of them given on the command line; the service's defaults apply to the rest."""
    wall_s: float
    """From starting the service to every event committed (includes its start-up)."""
    commit_span_s: float
    """From the first commit seen to the last."""
    events_per_s: float
    """Events committed between the first and the last commit, per second of that span."""
    rss_start_mib: float
    """After Triton was ready and the consumer was up, before the first event was taken."""
    rss_peak_mib: float
    rss_hwm_mib: float
    """The kernel's peak of the service's RSS (VmHWM), read when every event was committed."""
    rss_25_mib: float
    rss_50_mib: float
    rss_75_mib: float
    rss_100_mib: float
    slope_mib_per_10k: float
    """Least-squares slope of RSS against events committed, from 25% to 100% of the backlog."""
    cpu_percent: dict[str, float]
    """Percent of one core used by each part from the first event to the last commit."""
    cores: int
    verdicts: int
    dead_letters: int
    exit_code: int
    stop_s: float
    """From SIGTERM to the service's exit."""
    service_log_problems: int
    """Lines of level WARNING or above in the service's log."""
    broker_rss_end_mib: float
    workdir: str
    samples: list[Sample]
    images: str = "tiles"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.events < 4:
        parser.error("--events must be at least 4 (the 25%% steps need events)")
    try:
        args.overrides = _overrides(args)
    except ValueError as exc:
        parser.error(str(exc))
    result = in_own_stack(
        args.broker,
        args.partitions,
        (INPUT_TOPIC, VERDICT_TOPIC, DEAD_LETTER_TOPIC, REVIEW_TOPIC),
        lambda state, workdir: _benchmark(args, state, workdir),
        keep_data=args.keep_data,
    )
    print(_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(result), indent=1) + "\n")
    print(f"\nwritten to {args.json}")
    return 0 if result.exit_code == 0 else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.backlog_memory",
        description="Publish a backlog of small image events, let `python -m service run` "
        "work through it against a fixed-answer guard, and report its memory and throughput.",
    )
    parser.add_argument("--events", type=int, default=100_000, help="backlog size [%(default)s]")
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of the topics [%(default)s]"
    )
    parser.add_argument(
        "--broker",
        choices=["tansu", "noida-db"],
        default="tansu",
        help="tansu honours fetch size limits as Kafka does; noida-db answers every fetch with "
        "all it has, so the client's memory follows the backlog [%(default)s]",
    )
    parser.add_argument("--max-in-flight", type=int, help="GUARDSTREAM_MAX_IN_FLIGHT")
    parser.add_argument(
        "--images",
        choices=["tiles", *KINDS],
        default="tiles",
        help="the events' images: tiles (32x32 PNGs, inline) or a throughput benchmark kind, "
        "by URL where it is one (jpeg-12mp) [%(default)s]",
    )
    parser.add_argument(
        "--delivery", choices=["at-least-once", "exactly-once"], help="GUARDSTREAM_DELIVERY"
    )
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="any other service setting, e.g. --set decode_workers=4 (repeatable)",
    )
    parser.add_argument(
        "--sample-interval", type=float, default=0.25, help="seconds between samples [0.25]"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="give up when the backlog is not committed after this many seconds [%(default)s]",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="[%(default)s]")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the broker's data in the work directory"
    )
    return parser


async def _benchmark(args: argparse.Namespace, state: stack.StackState, workdir: Path) -> Result:
    if args.images == "tiles" or not KINDS[args.images].by_url:
        return await _measure(args, state, workdir, _images(args.images))
    served = workdir / "served"
    served.mkdir()
    k = KINDS[args.images]
    names = []
    for i, image in enumerate(images_of(k, BENCH_DIR / "images")):
        names.append(f"{k.name}-{i}{k.suffix}")
        (served / names[-1]).write_bytes(image)
    async with image_server(served) as base_url:
        return await _measure(args, state, workdir, [f"{base_url}/{name}" for name in names])


async def _measure(
    args: argparse.Namespace,
    state: stack.StackState,
    workdir: Path,
    sources: list[bytes | str],
) -> Result:
    print(f"publishing {args.events} events to {INPUT_TOPIC!r} ...", flush=True)
    produce_started = time.monotonic()
    total_bytes = await _produce(
        state.bootstrap_servers, args.events, args.broker != "tansu", sources
    )
    produce_s = time.monotonic() - produce_started
    print(
        f"published in {produce_s:.1f}s ({args.events / produce_s:.0f}/s, "
        f"{total_bytes / args.events:.0f} B per record)",
        flush=True,
    )
    settings = _service_settings(args, state)
    log_path = workdir / "service.log"
    started = time.monotonic()
    service = start_child(SERVICE_COMMAND, settings, log_path)
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=state.bootstrap_servers)
        await admin.start()
        try:
            samples, rss_start, cpu = await _watch(service, state, admin, args, started, log_path)
        finally:
            await admin.close()
        hwm = peak_rss(service.pid)
        print("all events committed; stopping the service with SIGTERM ...", flush=True)
        stopping = time.monotonic()
        service.send_signal(signal.SIGTERM)
        exit_code = service.wait(timeout=120)
        stop_s = time.monotonic() - stopping
    finally:
        with uninterrupted():
            stop_child(service)
    verdicts, dead_letters = await _published(state.bootstrap_servers)
    return _result(
        args,
        samples,
        rss_start=rss_start,
        rss_hwm=hwm,
        cpu=cpu,
        total_bytes=total_bytes,
        produce_s=produce_s,
        settings=settings,
        verdicts=verdicts,
        dead_letters=dead_letters,
        exit_code=exit_code,
        stop_s=stop_s,
        log_path=log_path,
        broker_pid=state.kafka_pid,
        workdir=workdir,
    )


def _images(kind: str = "tiles") -> list[bytes | str]:
    """The inline images of a throughput benchmark kind, or (tiles) four small, real PNGs:
    32x32 mosaics of 6x6 random colour tiles, ~280 bytes each.

    Tiles rather than noise or smooth gradients: noise makes kilobytes of PNG, gradients a
    hundred bytes; tiles give records of ~0.5 KB, so the broker holds 100k of them easily.
    """
    if kind != "tiles":
        return list(images_of(KINDS[kind], BENCH_DIR / "images"))
    rng = np.random.default_rng(20_240_601)  # the same images on every run
    encoded: list[bytes | str] = []
    for _ in range(4):
        tiles = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        pixels = np.repeat(np.repeat(tiles, 6, axis=0), 6, axis=1)[:32, :32]
        out = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(out, format="PNG", optimize=True)
        encoded.append(out.getvalue())
    return encoded


async def _produce(bootstrap: str, events: int, idempotent: bool, images: list[bytes | str]) -> int:
    """Publish the backlog (image bytes inline, or URLs), pipelined; the total bytes of record
    values."""
    run = secrets.token_hex(4)

    def records() -> Iterator[Outgoing]:
        for i in range(events):
            event_id = f"bench-{run}-{i:07d}"
            # A sampled W3C trace context, as an upload service sends: the service continues
            # the trace, which is part of its per-event work.
            traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            yield Outgoing(
                key=event_id.encode(),
                value=encode_event(_event(event_id, images[i % len(images)], run)),
                headers=[("traceparent", traceparent.encode()), ("event-id", event_id.encode())],
            )

    _, total = await publish(bootstrap, INPUT_TOPIC, records(), idempotent=idempotent)
    return total


def _event(event_id: str, image: bytes | str, run: str) -> ImageEvent:
    if isinstance(image, str):
        return image_event(event_id, url=image, metadata={"bench": run})
    return image_event(event_id, image=image, metadata={"bench": run})


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """Settings given on the command line (names without the GUARDSTREAM_ prefix)."""
    overrides = {}
    if args.max_in_flight is not None:
        overrides["MAX_IN_FLIGHT"] = str(args.max_in_flight)
    if args.delivery is not None:
        overrides["DELIVERY"] = args.delivery
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set wants NAME=VALUE, got {item!r}")
        overrides[name.upper().removeprefix("GUARDSTREAM_")] = value
    return overrides


def _service_settings(args: argparse.Namespace, state: stack.StackState) -> dict[str, str]:
    settings = {
        "BOOTSTRAP_SERVERS": state.bootstrap_servers,
        "TRITON_URL": state.triton_grpc,
        "INPUT_TOPIC": INPUT_TOPIC,
        "VERDICT_TOPIC": VERDICT_TOPIC,
        "DEAD_LETTER_TOPIC": DEAD_LETTER_TOPIC,
        "REVIEW_TOPIC": REVIEW_TOPIC,
        "GROUP_ID": GROUP,
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": "0",
        "LOG_LEVEL": "WARNING",
        # The pipe is measured: every event asks the guard, as in the loops compared with it
        # (the events cycle through a few photos, which reuse would answer without it).
        "REUSE": "off",
        "DECISIONS_TOPIC": "",
        # Tansu refuses idempotent producers.
        "ENABLE_IDEMPOTENCE": str(args.broker != "tansu").lower(),
        # URL events come from this script's image server.
        "FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
    }
    overrides: dict[str, str] = args.overrides
    return settings | overrides


async def _watch(
    service: subprocess.Popen[bytes],
    state: stack.StackState,
    admin: AIOKafkaAdminClient,
    args: argparse.Namespace,
    started: float,
    log_path: Path,
) -> tuple[list[Sample], Sample, dict[str, float]]:
    """Samples until every event is committed, the last sample before the first event, and
    the CPU each part used in between."""
    events, interval, limit_s = args.events, args.sample_interval, args.timeout
    samples: list[Sample] = []
    start = await _wait_for_first_event(service, started, log_path, samples)
    cpu_start, cpu_started = CpuTimes.now(service.pid, state), time.monotonic()
    print(
        f"service consuming after {start.t:.1f}s, RSS {start.rss_bytes / MiB:.1f} MiB; "
        "sampling until the whole backlog is committed ...",
        flush=True,
    )
    coordinator = await admin.find_coordinator(GROUP)
    # Named partitions: Tansu 0.6 drops the connection on an OffsetFetch for "all partitions".
    partitions = await _input_partitions(state.bootstrap_servers)
    next_tick = time.monotonic()
    next_report = next_tick + 15
    while True:
        check_running(service, log_path)
        # Committed offsets trail the work by up to the service's commit interval (500 ms by
        # default), so a sample's count is a little behind the memory it is paired with.
        resident = rss(service.pid)
        offsets = await admin.list_consumer_group_offsets(GROUP, coordinator, partitions)
        committed = sum(max(meta.offset, 0) for meta in offsets.values())
        samples.append(Sample(time.monotonic() - started, resident, committed))
        if committed >= events:
            seconds = time.monotonic() - cpu_started
            cpu = {
                "service" if name == "measured" else name: 100 * used / seconds
                for name, used in CpuTimes.now(service.pid, state).since(cpu_start).items()
            }
            return samples, start, cpu
        now = time.monotonic()
        if now - started > limit_s:
            raise BenchmarkFailed(f"only {committed} of {events} committed after {limit_s:.0f}s")
        if now >= next_report:
            print(f"  {committed:>8} committed, RSS {resident / MiB:.1f} MiB", flush=True)
            next_report += 15
        # Fixed ticks, so the time a request takes does not stretch the interval.
        next_tick += interval
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


async def _wait_for_first_event(
    service: subprocess.Popen[bytes], started: float, log_path: Path, samples: list[Sample]
) -> Sample:
    """The last memory sample taken after Triton was ready and before the first event.

    The backlog is already there, so the first event follows the group join within moments;
    the service's health server tells both ends, polled often: /readyz reports its consumer
    only once Triton is ready, and /metrics counts the records taken. Each poll asks /readyz,
    then reads the memory, then asks /metrics, so a sample that passes both lies between the
    two. The server was given port 0; its port is read from the process's listening socket.
    """
    before: Sample | None = None
    while True:
        check_running(service, log_path)
        port = listening_port(service.pid)
        ready = port is not None and await asyncio.to_thread(_consumer_up, port)
        resident = rss(service.pid)
        sample = Sample(time.monotonic() - started, resident, 0)
        consumed = await asyncio.to_thread(_consumed, port) if port is not None else None
        if consumed:
            if before is None:
                raise BenchmarkFailed(
                    "the first event was taken before a sample could be taken between Triton "
                    f"being ready and it (polled every {STARTUP_POLL_S}s); run again"
                )
            return before
        samples.append(sample)
        if ready and consumed == 0:
            before = sample
        if time.monotonic() - started > 300:
            raise BenchmarkFailed(f"the service took no event in 300s; see {log_path}")
        await asyncio.sleep(STARTUP_POLL_S)


def _consumer_up(port: int) -> bool:
    """Whether /readyz reports the consumer, which the service creates once Triton is ready."""
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()  # 503 while not every check passes; the body still says which
    except OSError:
        return False
    try:
        return bool(json.loads(body)["checks"]["partitions"]["ok"])
    except (ValueError, KeyError, TypeError):
        return False


def _consumed(port: int) -> int | None:
    """Records the service has taken (guardstream_events_consumed_total); None if no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("guardstream_events_consumed_total{")
    )


async def _input_partitions(bootstrap: str) -> list[TopicPartition]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await partitions_of(consumer, [INPUT_TOPIC])
    finally:
        await consumer.stop()


async def _published(bootstrap: str) -> tuple[int, int]:
    """Verdicts and dead letters published (log end offsets; under exactly-once these also
    count one transaction marker per partition and transaction)."""
    ends = await end_offsets(bootstrap, [VERDICT_TOPIC, DEAD_LETTER_TOPIC])
    return ends[VERDICT_TOPIC], ends[DEAD_LETTER_TOPIC]


def _result(
    args: argparse.Namespace,
    samples: list[Sample],
    *,
    rss_start: Sample,
    rss_hwm: int,
    cpu: dict[str, float],
    total_bytes: int,
    produce_s: float,
    settings: dict[str, str],
    verdicts: int,
    dead_letters: int,
    exit_code: int,
    stop_s: float,
    log_path: Path,
    broker_pid: int,
    workdir: Path,
) -> Result:
    events = args.events
    first = next(s for s in samples if s.committed > 0)
    last = samples[-1]

    def at(fraction: float) -> float:
        return next(s for s in samples if s.committed >= fraction * events).rss_bytes / MiB

    tail = [s for s in samples if s.committed >= 0.25 * events]
    x = np.array([s.committed for s in tail], dtype=np.float64)
    y = np.array([s.rss_bytes / MiB for s in tail], dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0] * 10_000) if np.ptp(x) > 0 else 0.0
    span = last.t - first.t
    shown = {k: v for k, v in settings.items() if k not in ("BOOTSTRAP_SERVERS", "TRITON_URL")}
    return Result(
        events=events,
        partitions=args.partitions,
        record_bytes_mean=total_bytes / events,
        produce_s=produce_s,
        service_settings=shown,
        overrides=args.overrides,
        wall_s=last.t,
        commit_span_s=span,
        events_per_s=(last.committed - first.committed) / span if span > 0 else float("nan"),
        rss_start_mib=rss_start.rss_bytes / MiB,
        rss_peak_mib=max(s.rss_bytes for s in samples) / MiB,
        rss_hwm_mib=rss_hwm / MiB,
        rss_25_mib=at(0.25),
        rss_50_mib=at(0.5),
        rss_75_mib=at(0.75),
        rss_100_mib=at(1.0),
        slope_mib_per_10k=slope,
        cpu_percent=cpu,
        cores=os.cpu_count() or 1,
        verdicts=verdicts,
        dead_letters=dead_letters,
        exit_code=exit_code,
        stop_s=stop_s,
        service_log_problems=sum(1 for _ in log_problems(log_path)),
        broker_rss_end_mib=rss_or_zero(broker_pid) / MiB,
        workdir=str(workdir),
        samples=samples,
        images=args.images,
    )


def _table(r: Result) -> str:
    overrides = " ".join(f"{k.lower()}={v}" for k, v in sorted(r.overrides.items()))
    cpu = ", ".join(f"{name} {percent:.0f}" for name, percent in r.cpu_percent.items())
    rows = [
        (
            "events",
            f"{r.events} of {r.images} ({r.record_bytes_mean:.0f} B per record, "
            f"{r.partitions} partitions)",
        ),
        ("published in", f"{r.produce_s:.1f} s ({r.events / r.produce_s:.0f}/s)"),
        ("service settings", overrides or "defaults (no overrides given)"),
        ("wall time", f"{r.wall_s:.1f} s (service start to all committed)"),
        ("events/s", f"{r.events_per_s:.0f} (first to last commit, {r.commit_span_s:.1f} s)"),
        ("RSS at start", f"{r.rss_start_mib:.1f} MiB (Triton ready, before the first event)"),
        ("RSS peak", f"{r.rss_peak_mib:.1f} MiB sampled, {r.rss_hwm_mib:.1f} MiB VmHWM"),
        ("RSS at 25%", f"{r.rss_25_mib:.1f} MiB"),
        ("RSS at 50%", f"{r.rss_50_mib:.1f} MiB"),
        ("RSS at 75%", f"{r.rss_75_mib:.1f} MiB"),
        ("RSS at 100%", f"{r.rss_100_mib:.1f} MiB"),
        ("slope 25%-100%", f"{r.slope_mib_per_10k:+.2f} MiB per 10k events (least squares)"),
        ("CPU, % of a core", f"{cpu} ({r.cores} cores; first event to last commit)"),
        (
            "outcomes",
            f"{r.verdicts} verdicts, {r.dead_letters} dead letters (log end offsets; Tansu's "
            "fall short by up to a batch per partition)",
        ),
        ("SIGTERM", f"exit code {r.exit_code} after {r.stop_s:.1f} s"),
        ("service log", f"{r.service_log_problems} lines at WARNING or above"),
        ("broker RSS at end", f"{r.broker_rss_end_mib:.0f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
