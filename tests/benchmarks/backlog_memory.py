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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata
from PIL import Image

from service import stack
from service.client import encode_event, image_event

BENCH_MODELS = stack.REPO_ROOT / "triton_models" / "bench"
DEFAULT_JSON = stack.REPO_ROOT / ".guardstream" / "bench" / "backlog_memory.json"
INPUT_TOPIC, VERDICT_TOPIC, DEAD_LETTER_TOPIC = "images", "verdicts", "images.dlq"
GROUP = "guardstream-bench"
MiB = 1024 * 1024
# While the service starts, memory and its metrics are read this often, so that the "start"
# sample is taken at most this long before the first event.
STARTUP_POLL_S = 0.05


class BenchmarkFailed(Exception):
    """The benchmark could not measure what it should; the message says why."""


@dataclass(frozen=True)
class Sample:
    t: float
    """Seconds since the service was started."""
    rss_bytes: int
    committed: int
    """Events committed by the group (sum of committed offsets; the topic starts at 0)."""


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far (user + system), by whom."""

    service: float
    broker: float
    triton: float
    """tritonserver and its Python-backend stub."""
    benchmark: float
    """This script: producing is over by then, so this is its sampling."""
    machine: float
    """Every process on the machine, all cores."""

    @classmethod
    def now(cls, service: int, state: stack.StackState) -> CpuTimes:
        return cls(
            service=_cpu_seconds([service]),
            broker=_cpu_seconds(_process_tree(state.kafka_pid)),
            triton=_cpu_seconds(_process_tree(state.triton_pid)),
            benchmark=_cpu_seconds([os.getpid()]),
            machine=_machine_busy_seconds(),
        )

    def percent_since(self, earlier: CpuTimes, seconds: float) -> dict[str, float]:
        """Percent of one core each used in between; "others" is everyone else on the machine
        (on a shared machine, what competed with the measurement)."""
        used = {
            name: getattr(self, name) - getattr(earlier, name)
            for name in ("service", "broker", "triton", "benchmark")
        }
        used["others"] = max(0.0, self.machine - earlier.machine - sum(used.values()))
        return {name: 100 * value / seconds for name, value in used.items()}


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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.events < 4:
        parser.error("--events must be at least 4 (the 25%% steps need events)")
    try:
        args.overrides = _overrides(args)
    except ValueError as exc:
        parser.error(str(exc))
    # SIGTERM (a CI timeout, `kill`) must clean up like Ctrl-C: the child processes run in
    # their own sessions and would otherwise outlive us.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="guardstream-bench-"))
    config = stack.StackConfig(
        state_dir=workdir,
        kafka_port=_free_port(),
        triton_http_port=_free_port(),
        triton_grpc_port=_free_port(),
        triton_metrics_port=_free_port(),
        model_repository=BENCH_MODELS,
        topics=(INPUT_TOPIC, VERDICT_TOPIC, DEAD_LETTER_TOPIC),
        partitions=args.partitions,
        broker=args.broker,
    )
    print(f"work directory {workdir} (logs: kafka.log, triton.log, service.log)", flush=True)
    try:
        print(f"starting {args.broker} and Triton (benchmark guard) ...", flush=True)
        state = stack.up(config)
        try:
            result = asyncio.run(_benchmark(args, state, workdir))
        finally:
            with _uninterrupted():
                print("stopping the stack ...", flush=True)
                stack.down(workdir)
                if not args.keep_data:
                    # The broker's data is ~ the backlog and its verdicts again; logs stay.
                    shutil.rmtree(workdir / "kafka-data", ignore_errors=True)
                    shutil.rmtree(workdir / "backends", ignore_errors=True)
    except KeyboardInterrupt:
        print(f"interrupted; processes stopped, logs in {workdir}", file=sys.stderr)
        return 130
    except (BenchmarkFailed, stack.StackError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM: an impatient second one must not cut a clean-up short and
    leave processes behind (each clean-up step has its own time limit)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _benchmark(args: argparse.Namespace, state: stack.StackState, workdir: Path) -> Result:
    print(f"publishing {args.events} events to {INPUT_TOPIC!r} ...", flush=True)
    produce_started = time.monotonic()
    total_bytes = await _produce(state.bootstrap_servers, args.events, args.broker != "tansu")
    produce_s = time.monotonic() - produce_started
    print(
        f"published in {produce_s:.1f}s ({args.events / produce_s:.0f}/s, "
        f"{total_bytes / args.events:.0f} B per record)",
        flush=True,
    )
    settings = _service_settings(args, state)
    log_path = workdir / "service.log"
    started = time.monotonic()
    service = _start_service(settings, log_path)
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=state.bootstrap_servers)
        await admin.start()
        try:
            samples, rss_start, cpu = await _watch(service, state, admin, args, started, log_path)
        finally:
            await admin.close()
        print("all events committed; stopping the service with SIGTERM ...", flush=True)
        stopping = time.monotonic()
        service.send_signal(signal.SIGTERM)
        exit_code = service.wait(timeout=120)
        stop_s = time.monotonic() - stopping
    finally:
        with _uninterrupted():
            _stop(service)
    verdicts, dead_letters = await _published(state.bootstrap_servers)
    return _result(
        args,
        samples,
        rss_start=rss_start,
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


def _images() -> list[bytes]:
    """Four small, real PNGs: 32x32 mosaics of 6x6 random colour tiles, ~280 bytes each.

    Tiles rather than noise or smooth gradients: noise makes kilobytes of PNG, gradients a
    hundred bytes; tiles give records of ~0.5 KB, so the broker holds 100k of them easily.
    """
    rng = np.random.default_rng(20_240_601)  # the same images on every run
    encoded = []
    for _ in range(4):
        tiles = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        pixels = np.repeat(np.repeat(tiles, 6, axis=0), 6, axis=1)[:32, :32]
        out = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(out, format="PNG", optimize=True)
        encoded.append(out.getvalue())
    return encoded


async def _produce(bootstrap: str, events: int, idempotent: bool) -> int:
    """Publish the backlog, pipelined; the total bytes of record values."""
    images = _images()
    run = secrets.token_hex(4)
    # Like the project's producer helper (acks=all, idempotent), but sends are not awaited one
    # by one: batches of many records per request are what make 100k events take seconds.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    total = 0
    try:
        pending: list[asyncio.Future[RecordMetadata]] = []
        ends: dict[int, int] = {}
        for i in range(events):
            event_id = f"bench-{run}-{i:07d}"
            value = encode_event(
                image_event(event_id, image=images[i % len(images)], metadata={"bench": run})
            )
            total += len(value)
            # A sampled W3C trace context, as an upload service sends: the service continues
            # the trace, which is part of its per-event work.
            traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            pending.append(
                await producer.send(
                    INPUT_TOPIC,
                    value=value,
                    key=event_id.encode(),
                    headers=[
                        ("traceparent", traceparent.encode()),
                        ("event-id", event_id.encode()),
                    ],
                )
            )
            if len(pending) >= 5000:
                _note_ends(ends, await asyncio.gather(*pending))
                pending.clear()
        _note_ends(ends, await asyncio.gather(*pending))
    finally:
        await producer.stop()
    # From the acknowledgements, not ListOffsets: Tansu 0.6 answers ListOffsets with the base
    # offset of a partition's last batch, short of its end by up to a batch.
    if sum(ends.values()) != events:
        raise BenchmarkFailed(f"the broker acknowledged offsets up to {ends}, not {events} records")
    return total


def _note_ends(ends: dict[int, int], acks: list[RecordMetadata]) -> None:
    for ack in acks:
        ends[ack.partition] = max(ends.get(ack.partition, 0), ack.offset + 1)


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
        "GROUP_ID": GROUP,
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": "0",
        "LOG_LEVEL": "WARNING",
        # Tansu refuses idempotent producers.
        "ENABLE_IDEMPOTENCE": str(args.broker != "tansu").lower(),
    }
    overrides: dict[str, str] = args.overrides
    return settings | overrides


def _start_service(settings: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GUARDSTREAM_")}
    env.update({f"GUARDSTREAM_{name}": value for name, value in settings.items()})
    # Spans are still made (that work is measured) but not exported anywhere an inherited
    # OTEL_EXPORTER_OTLP_ENDPOINT points.
    env["OTEL_TRACES_EXPORTER"] = "none"
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run"],
            cwd=stack.REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it.
            start_new_session=True,
        )


def _stop(service: subprocess.Popen[bytes]) -> None:
    """Make sure the service is gone (it is already, unless something failed)."""
    if service.poll() is not None:
        return
    service.send_signal(signal.SIGTERM)
    try:
        service.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


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
        _check_running(service, log_path)
        # Committed offsets trail the work by up to the service's commit interval (500 ms by
        # default), so a sample's count is a little behind the memory it is paired with.
        rss = _rss(service.pid)
        offsets = await admin.list_consumer_group_offsets(GROUP, coordinator, partitions)
        committed = sum(max(meta.offset, 0) for meta in offsets.values())
        samples.append(Sample(time.monotonic() - started, rss, committed))
        if committed >= events:
            cpu = CpuTimes.now(service.pid, state).percent_since(
                cpu_start, time.monotonic() - cpu_started
            )
            return samples, start, cpu
        now = time.monotonic()
        if now - started > limit_s:
            raise BenchmarkFailed(f"only {committed} of {events} committed after {limit_s:.0f}s")
        if now >= next_report:
            print(f"  {committed:>8} committed, RSS {rss / MiB:.1f} MiB", flush=True)
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
        _check_running(service, log_path)
        port = _listening_port(service.pid)
        ready = port is not None and await asyncio.to_thread(_consumer_up, port)
        rss = _rss(service.pid)
        sample = Sample(time.monotonic() - started, rss, 0)
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


def _check_running(service: subprocess.Popen[bytes], log_path: Path) -> None:
    if service.poll() is not None:
        raise BenchmarkFailed(
            f"the service exited with {service.returncode}:\n{_tail(log_path, 20)}"
        )


def _rss(pid: int) -> int:
    """Resident memory of `pid` in bytes (VmRSS; the kernel reports kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchmarkFailed(f"no VmRSS for pid {pid}")


def _listening_port(pid: int) -> int | None:
    """The TCP port `pid` listens on over IPv4 (its health server), None before it does."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in table:
        fields = line.split()
        # fields: sl, local address (hex ip:port), remote, state (0A = LISTEN), ..., inode
        if fields[3] == "0A" and fields[9] in inodes:
            return int(fields[1].rsplit(":", 1)[1], 16)
    return None


async def _partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    await consumer.topics()  # loads the metadata partitions_for_topic reads
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]


async def _end_offsets(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Records in each topic: the sum of its partitions' log end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await _partitions(consumer, topics))
    finally:
        await consumer.stop()
    return {topic: sum(o for tp, o in ends.items() if tp.topic == topic) for topic in topics}


async def _input_partitions(bootstrap: str) -> list[TopicPartition]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await _partitions(consumer, [INPUT_TOPIC])
    finally:
        await consumer.stop()


async def _published(bootstrap: str) -> tuple[int, int]:
    """Verdicts and dead letters published (log end offsets; under exactly-once these also
    count one transaction marker per partition and transaction)."""
    ends = await _end_offsets(bootstrap, [VERDICT_TOPIC, DEAD_LETTER_TOPIC])
    return ends[VERDICT_TOPIC], ends[DEAD_LETTER_TOPIC]


def _result(
    args: argparse.Namespace,
    samples: list[Sample],
    *,
    rss_start: Sample,
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
        service_log_problems=sum(1 for _ in _log_problems(log_path)),
        broker_rss_end_mib=_rss_or_zero(broker_pid) / MiB,
        workdir=str(workdir),
        samples=samples,
    )


def _rss_or_zero(pid: int) -> int:
    try:
        return _rss(pid)
    except (OSError, BenchmarkFailed):
        return 0


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # After the command name, which may hold spaces: utime and stime are fields 14-15.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Triton's Python-backend stubs are its children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
    return tree


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _log_problems(log_path: Path) -> Iterator[str]:
    """Lines of the service's log at WARNING or above (JSON lines, or anything unparsed)."""
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level", "")
        except (ValueError, AttributeError):
            level = "UNPARSED"
        if level != "INFO" and level != "DEBUG":
            yield line


def _table(r: Result) -> str:
    overrides = " ".join(f"{k.lower()}={v}" for k, v in sorted(r.overrides.items()))
    cpu = ", ".join(f"{name} {percent:.0f}" for name, percent in r.cpu_percent.items())
    rows = [
        (
            "events",
            f"{r.events} ({r.record_bytes_mean:.0f} B per record, {r.partitions} partitions)",
        ),
        ("published in", f"{r.produce_s:.1f} s ({r.events / r.produce_s:.0f}/s)"),
        ("service settings", overrides or "defaults (no overrides given)"),
        ("wall time", f"{r.wall_s:.1f} s (service start to all committed)"),
        ("events/s", f"{r.events_per_s:.0f} (first to last commit, {r.commit_span_s:.1f} s)"),
        ("RSS at start", f"{r.rss_start_mib:.1f} MiB (Triton ready, before the first event)"),
        ("RSS peak", f"{r.rss_peak_mib:.1f} MiB"),
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
