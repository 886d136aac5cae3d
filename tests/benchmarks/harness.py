"""What the benchmark scripts share: a stack of their own, child processes, /proc readings.

Every benchmark starts its own broker and Triton (serving the fixed-answer guard of
`triton_models/bench`, so the service and not the model is measured) on free ports in a
temporary directory, runs what it measures as child processes, as a pod runs them, and reads
their CPU time and memory from /proc, so that its own work (publishing, reading outcomes) is
never counted as theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata

from service.dev import stack

BENCH_MODELS = stack.BENCH_MODEL_REPOSITORY
BENCH_DIR = stack.REPO_ROOT / ".guardstream" / "bench"
SERVICE_COMMAND = (sys.executable, "-m", "service", "run")
MiB = 1024 * 1024

Header = tuple[str, bytes]
T = TypeVar("T")


class BenchmarkFailed(Exception):
    """The benchmark could not measure what it should; the message says why."""


# --- the stack ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def bench_stack(
    broker: stack.Broker,
    partitions: int,
    topics: Iterable[str],
    *,
    keep_data: bool = False,
    models: Path = BENCH_MODELS,
) -> Iterator[tuple[stack.StackState, Path]]:
    """A broker and a Triton serving `models` (the benchmark guard unless told), on free ports
    in a new directory.

    SIGTERM (a CI timeout, `kill`) is turned into KeyboardInterrupt for the duration, so that
    it cleans up like Ctrl-C: the servers run in their own sessions and would outlive us.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="guardstream-bench-"))
    config = stack.StackConfig(
        state_dir=workdir,
        kafka_port=free_port(),
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        model_repository=models,
        topics=tuple(topics),
        partitions=partitions,
        broker=broker,
    )
    print(f"work directory {workdir} (logs: kafka.log, triton.log, and one per run)", flush=True)
    print(f"starting {broker} and Triton ({models.name} models) ...", flush=True)
    try:
        state = stack.up(config)
        try:
            yield state, workdir
        finally:
            with uninterrupted():
                print("stopping the stack ...", flush=True)
                stack.down(workdir)
                if not keep_data:
                    # The broker's data is ~ the backlog and its outcomes again; logs stay.
                    shutil.rmtree(workdir / "kafka-data", ignore_errors=True)
                    shutil.rmtree(workdir / "backends", ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def in_own_stack(
    broker: stack.Broker,
    partitions: int,
    topics: Iterable[str],
    benchmark: Callable[[stack.StackState, Path], Coroutine[Any, Any, T]],
    *,
    keep_data: bool = False,
    models: Path = BENCH_MODELS,
) -> T:
    """What `benchmark(state, workdir)` returns, run against a stack of its own. Interrupted
    or failed, it says so and exits (130, 1): then there is nothing to report."""
    try:
        with bench_stack(broker, partitions, topics, keep_data=keep_data, models=models) as (
            state,
            workdir,
        ):
            return asyncio.run(benchmark(state, workdir))
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except (BenchmarkFailed, stack.StackError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def print_cpu_guard_table(
    broker: stack.Broker,
    input_topic: str,
    benchmark: Callable[[stack.StackState, Path], Coroutine[Any, Any, str]],
) -> int:
    """Run `benchmark` against a stack of its own serving the CPU guard (real inference), one
    3-partition input topic, and print the table it returns; the script's exit code."""
    table = in_own_stack(broker, 3, [input_topic], benchmark, models=stack.DEFAULT_MODEL_REPOSITORY)
    print("\n" + table)
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold off Ctrl-C and SIGTERM: an impatient second one must not cut a clean-up short and
    leave processes behind (each clean-up step has its own time limit)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def triton_metric(state: stack.StackState, name: str, model: str = "guard") -> float:
    """The sum of one Triton counter over the model's versions (0 when Triton does not say)."""
    url = f"http://{state.host}:{state.triton_metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f'{name}{{model="{model}"')
    )


# --- child processes ------------------------------------------------------------------------


def run_settings(state: stack.StackState, tag: str, input_topic: str) -> dict[str, str]:
    """The settings of one measured run (names without GUARDSTREAM_): the stack's addresses,
    output topics and a group of its own (`out-<tag>`, ...), quiet logs, and every event
    asked of the guard (no reuse, no decisions topic), as in the loops it is compared with."""
    return {
        "BOOTSTRAP_SERVERS": state.bootstrap_servers,
        "TRITON_URL": state.triton_grpc,
        "INPUT_TOPIC": input_topic,
        "VERDICT_TOPIC": f"out-{tag}",
        "DEAD_LETTER_TOPIC": f"dlq-{tag}",
        "REVIEW_TOPIC": f"review-{tag}",
        "GROUP_ID": f"group-{tag}",
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "REUSE": "off",
        "DECISIONS_TOPIC": "",
        "BANKS_TOPIC": "",
        # Tansu refuses idempotent producers.
        "ENABLE_IDEMPOTENCE": str(state.broker != "tansu").lower(),
    }


def start_child(
    command: Iterable[str], settings: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a measured program with these GUARDSTREAM_* settings (names without the prefix)
    and no others from our environment, its output to `log_path`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GUARDSTREAM_")}
    env.update({f"GUARDSTREAM_{name}": value for name, value in settings.items()})
    # Spans are still made (that work is measured) but not exported anywhere an inherited
    # OTEL_EXPORTER_OTLP_ENDPOINT points.
    env["OTEL_TRACES_EXPORTER"] = "none"
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(command),
            cwd=stack.REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it.
            start_new_session=True,
        )


@contextlib.asynccontextmanager
async def image_server(directory: Path) -> AsyncIterator[str]:
    """A static HTTP server of `directory` on 127.0.0.1 (Python's, threaded, a child process
    of its own); its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    command += ["--directory", str(directory)]
    server = start_child(command, {}, directory.parent / "image-server.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkFailed("the image server did not start") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        yield f"http://127.0.0.1:{port}"
    finally:
        with uninterrupted():
            stop_child(server)


def stop_child(child: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, then SIGKILL if it outlives the timeout; its exit code (the signal's,
    negative, if it was killed)."""
    if child.poll() is not None:
        return child.returncode
    child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def check_running(child: subprocess.Popen[bytes], log_path: Path) -> None:
    if child.poll() is not None:
        raise BenchmarkFailed(f"{log_path.stem} exited with {child.returncode}:\n{tail(log_path)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def log_problems(log_path: Path) -> Iterator[str]:
    """Lines of a service log at WARNING or above (JSON lines, or anything unparsed)."""
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level", "")
        except (ValueError, AttributeError):
            level = "UNPARSED"
        if level != "INFO" and level != "DEBUG":
            yield line


# --- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # After the command name, which may hold spaces: utime and stime are fields 14-15.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Triton's Python-backend stubs are its children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
    return tree


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far (user + system), by whom."""

    measured: float
    """The measured program (the service, or a loop it is compared with)."""
    broker: float
    triton: float
    """tritonserver and its Python-backend stub."""
    benchmark: float
    """This script: publishing, reading outcomes, sampling."""
    machine: float
    """Every process on the machine, all cores."""

    @classmethod
    def now(cls, measured: int, state: stack.StackState) -> CpuTimes:
        return cls(
            measured=cpu_seconds([measured]),
            broker=cpu_seconds(process_tree(state.kafka_pid)),
            triton=cpu_seconds(process_tree(state.triton_pid)),
            benchmark=cpu_seconds([os.getpid()]),
            machine=machine_busy_seconds(),
        )

    def since(self, earlier: CpuTimes) -> dict[str, float]:
        """CPU seconds each used in between; "others" is everyone else on the machine (on a
        shared machine, what competed with the measurement)."""
        used = {
            name: getattr(self, name) - getattr(earlier, name)
            for name in ("measured", "broker", "triton", "benchmark")
        }
        used["others"] = max(0.0, self.machine - earlier.machine - sum(used.values()))
        return used


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise BenchmarkFailed(f"no {field} for pid {pid}")


def rss(pid: int) -> int:
    """Resident memory of `pid` in bytes (VmRSS; the kernel reports kB)."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """The most resident memory `pid` has had, in bytes (VmHWM), while it still runs."""
    return _status_kib(pid, "VmHWM") * 1024


def rss_or_zero(pid: int) -> int:
    try:
        return rss(pid)
    except (OSError, BenchmarkFailed):
        return 0


def listening_port(pid: int) -> int | None:
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


# --- Kafka ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    key: bytes
    value: bytes
    headers: list[Header]


async def publish(
    bootstrap: str, topic: str, records: Iterable[Outgoing], *, idempotent: bool
) -> tuple[int, int]:
    """Publish a backlog, pipelined; the records and bytes of values the broker acknowledged.

    Like the project's producer helper (acks=all), but sends are not awaited one by one:
    batches of many records per request are what make a large backlog take seconds.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=20,
        max_batch_size=1024 * 1024,
        max_request_size=8 * MiB,
    )
    await producer.start()
    sent = total = 0
    ends: dict[int, int] = {}
    try:
        pending: list[asyncio.Future[RecordMetadata]] = []
        for record in records:
            pending.append(
                await producer.send(
                    topic, value=record.value, key=record.key, headers=record.headers
                )
            )
            sent += 1
            total += len(record.value)
            if len(pending) >= 2000:
                _note_ends(ends, await asyncio.gather(*pending))
                pending.clear()
        _note_ends(ends, await asyncio.gather(*pending))
    finally:
        await producer.stop()
    # From the acknowledgements, not ListOffsets: Tansu 0.6 answers ListOffsets with the base
    # offset of a partition's last batch, short of its end by up to a batch.
    if sum(ends.values()) != sent:
        raise BenchmarkFailed(f"the broker acknowledged offsets up to {ends}, not {sent} records")
    return sent, total


def _note_ends(ends: dict[int, int], acks: list[RecordMetadata]) -> None:
    for ack in acks:
        ends[ack.partition] = max(ends.get(ack.partition, 0), ack.offset + 1)


async def partitions_of(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    await consumer.topics()  # loads the metadata partitions_for_topic reads
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Records in each topic: the sum of its partitions' log end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await partitions_of(consumer, topics))
    finally:
        await consumer.stop()
    return {topic: sum(o for tp, o in ends.items() if tp.topic == topic) for topic in topics}


@dataclass(frozen=True)
class Seen:
    """One output record as a downstream consumer sees it."""

    key: bytes | None
    timestamp_ms: int
    """The record's timestamp: its producer's, taken when the record was handed to it."""
    seen: float
    """time.time() when the reader got it."""
    value: bytes | None


class OutputReader:
    """Reads output topics from the beginning in the background, as a downstream consumer with
    no group would, keeping every record's key and timestamp (and value, when asked)."""

    def __init__(self, bootstrap: str, topics: list[str], *, keep_values: bool = False) -> None:
        self._topics = topics
        self._keep_values = keep_values
        self.records: list[Seen] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Seen soon after it is written: the time a record is seen is a measurement.
            fetch_max_wait_ms=5,
        )
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> OutputReader:
        await self._consumer.start()
        partitions = await partitions_of(self._consumer, self._topics)
        if not partitions:
            raise BenchmarkFailed(f"the broker does not know {self._topics}")
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batches.values():
                self.records += [
                    Seen(r.key, r.timestamp, now, r.value if self._keep_values else None)
                    for r in records
                ]
            if batches:
                self._arrived.set()

    async def wait_for(self, count: int, timeout_s: float) -> bool:
        """Whether `count` records have arrived within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.records) < count:
            if self._task is not None and self._task.done():
                self._task.result()  # the reader failed: say why
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))
        return True
