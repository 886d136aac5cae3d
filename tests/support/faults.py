"""Fault-injection harness: a stack to break, consumers to kill, and an exact count of outcomes.

A scenario runs real processes only: the Kafka-protocol broker and tritonserver of
`service.dev.stack` (each in its own process group, so one signal reaches every process of it) and
one or more `python -m service run` children. It produces events, breaks something, waits until
every event has an outcome, and counts by `event_id` what the service delivered:

    scenario = await Scenario.open(fault_stack, "broker-restart")
    ids = await produce(fault_stack.bootstrap, scenario.topics.input, 250, "br-")
    started = time.monotonic()
    async with scenario.service("a") as consumer:
        ...  # fault_stack.kill_broker(); await fault_stack.start_broker(); consumer.sigkill() ...
        await wait_for_outcomes(fault_stack.bootstrap, scenario.topics, ids, timeout_s=120)
        assert await consumer.sigterm() == 0, consumer.log_tail()
    result = await scenario.result(AT_LEAST_ONCE, ids, time.monotonic() - started)

Every result goes into `RESULTS`; the session prints them as one markdown table and writes it to
`.guardstream/fault-table.md` (the `pytest_terminal_summary` hook in `tests/conftest.py`).

The review topic is accounted too: every produced id whose verdict belongs there (its action is
review: `for_review_topic`) must have a record there (exactly once: one, equal to the verdict).
Every `REVIEW_EVERY`th event names the review policy, whose verdicts go to review: see "review
verdicts" below, the one place that says how, until the decision rules land and after.

What the broker does to a fault matters when reading a row: noida-db keeps records in memory
and rewrites a JSON snapshot of its data directory about once a second, so a SIGKILL loses what
it acknowledged since the last snapshot, while SIGTERM saves everything. Its group
coordinator (0.2.3) never completes a rebalance once a group has had a second member: a second
consumer joining, or a consumer restarted after SIGKILL into the same group, stays unassigned
(seen for 90 s with plain aiokafka consumers) until the broker restarts, which forgets the members.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from PIL import Image

from service.client import encode_event, image_event
from service.dev import stack
from tests.support.stack import Topics, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_PATH = REPO_ROOT / ".guardstream" / "fault-table.md"

AT_LEAST_ONCE = "at-least-once"
EXACTLY_ONCE = "exactly-once"

IsolationLevel = Literal["read_committed", "read_uncommitted"]
Outcomes = dict[str, list[dict[str, Any]]]
"""Parsed verdicts and dead letters by `event_id`, in the order they were read."""

NO_EVENT_ID = "<no event_id>"
"""The key of outcomes that carry no `event_id` (a dead letter of an unreadable record)."""

_SHM_PREFIX = "triton_python_backend_shm_region_"


# --- process groups -------------------------------------------------------------------------


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    """Signal a process group: started with start_new_session=True, its id is the leader's pid.

    One signal then reaches every process of the server (tritonserver and its Python-backend
    stubs), as `kill -9 -<pgid>` would. False when the group is gone.
    """
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_members(pgid: int) -> list[int]:
    """Pids in a process group, read from /proc (the group outlives its reaped leader)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _shm_regions(pgid: int) -> list[Path]:
    """Shared-memory files of Triton's Python-backend stubs: a SIGKILL leaves them in /dev/shm.

    Each stub is given its region's name on its command line, so they are read from there.
    """
    regions = []
    for pid in _group_members(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions += [
            Path("/dev/shm") / arg.decode()
            for arg in argv
            if arg.startswith(_SHM_PREFIX.encode()) and b"/" not in arg
        ]
    return regions


def _kill_group(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL the whole group and reap the leader; returns its exit status."""
    _signal_group(process.pid, signal.SIGKILL)
    return process.wait(timeout=30)


def _stop_group(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM the group (SIGCONT too, in case it is paused), SIGKILL it if it outlives timeout."""
    _signal_group(process.pid, signal.SIGTERM)
    _signal_group(process.pid, signal.SIGCONT)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return _kill_group(process)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# --- the stack ------------------------------------------------------------------------------


class FaultStack:
    """A broker and a Triton of our own, on free ports, that a test may kill, pause and restart.

    Built on `service.dev.stack` (the same start-up code as `python -m service stack up`), but it
    keeps the `Popen` of each server, so it can signal and reap them itself. The broker's data
    directory and both ports stay the same across restarts, so clients reconnect to the same
    address and the broker finds its data again. Starting is blocking code (it polls ports and
    Triton's readiness), so it runs in a thread: consumers and readers keep being served.
    """

    def __init__(self, config: stack.StackConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._broker: subprocess.Popen[bytes] | None = None
        self._triton: subprocess.Popen[bytes] | None = None
        self._paused: set[str] = set()

    @classmethod
    async def start(
        cls,
        state_dir: Path,
        *,
        broker: stack.Broker = "noida-db",
        model_repository: Path = stack.DEFAULT_MODEL_REPOSITORY,
        startup_timeout_s: float = 120.0,
    ) -> FaultStack:
        """Start both servers at once (they do not depend on each other): about 2 s here."""
        made = cls(
            stack.StackConfig(
                state_dir=state_dir,
                broker=broker,
                model_repository=model_repository,
                kafka_port=free_port(),
                triton_http_port=free_port(),
                triton_grpc_port=free_port(),
                triton_metrics_port=free_port(),
                topics=(),
                startup_timeout_s=startup_timeout_s,
            )
        )
        started = await asyncio.gather(
            made.start_broker(), made.start_triton(), return_exceptions=True
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            made.close()
            raise failures[0]
        return made

    @property
    def bootstrap(self) -> str:
        return f"{self.config.host}:{self.config.kafka_port}"

    @property
    def triton_grpc(self) -> str:
        return f"{self.config.host}:{self.config.triton_grpc_port}"

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def broker_running(self) -> bool:
        return self._broker is not None and self._broker.poll() is None

    @property
    def triton_running(self) -> bool:
        return self._triton is not None and self._triton.poll() is None

    def _deadline(self) -> float:
        return time.monotonic() + self.config.startup_timeout_s

    # broker

    async def start_broker(self) -> None:
        """Start the broker on the same port and data directory; returns once it listens."""
        if self.broker_running:
            raise RuntimeError("the broker is already running")
        self._broker = await asyncio.to_thread(stack.start_broker, self.config, self._deadline())
        self._paused.discard("broker")

    def kill_broker(self) -> int:
        """SIGKILL: loses what the broker acknowledged since its last snapshot (about 1 s)."""
        broker = self._require(self._broker, "broker")
        self._paused.discard("broker")
        return _kill_group(broker)

    async def stop_broker(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the broker saves its data before it exits."""
        broker = self._require(self._broker, "broker")
        self._paused.discard("broker")
        return await asyncio.to_thread(_stop_group, broker, timeout_s)

    async def restart_broker(self) -> None:
        await self.stop_broker()
        await self.start_broker()

    def pause_broker(self) -> None:
        """SIGSTOP: the port stays open and connections hang, as with a stalled broker."""
        self._freeze("broker", self._broker, frozen=True)

    def resume_broker(self) -> None:
        self._freeze("broker", self._broker, frozen=False)

    # Triton

    async def start_triton(self) -> None:
        """Start tritonserver on the same ports; returns once the guard model is ready."""
        if self.triton_running:
            raise RuntimeError("tritonserver is already running")
        self._triton = await asyncio.to_thread(stack.start_triton, self.config, self._deadline())
        self._paused.discard("triton")

    def kill_triton(self) -> int:
        """SIGKILL tritonserver and its Python-backend stubs, and free their shared memory."""
        triton = self._require(self._triton, "tritonserver")
        regions = _shm_regions(triton.pid)
        self._paused.discard("triton")
        returncode = _kill_group(triton)
        for region in regions:
            region.unlink(missing_ok=True)
        return returncode

    async def stop_triton(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: Triton finishes what it holds (up to its 10 s exit timeout)."""
        triton = self._require(self._triton, "tritonserver")
        self._paused.discard("triton")
        return await asyncio.to_thread(_stop_group, triton, timeout_s)

    async def restart_triton(self) -> None:
        self.kill_triton()
        await self.start_triton()

    async def serve(self, model_repository: Path) -> None:
        """Serve another model repository: tritonserver restarted on it, on the same ports."""
        if self.config.model_repository == model_repository and self.triton_running:
            return
        if self.triton_running:
            self.kill_triton()
        self.config = dataclasses.replace(self.config, model_repository=model_repository)
        await self.start_triton()

    def pause_triton(self) -> None:
        """SIGSTOP the whole group: a hung server whose ports accept but never answer."""
        self._freeze("triton", self._triton, frozen=True)

    def resume_triton(self) -> None:
        self._freeze("triton", self._triton, frozen=False)

    def _freeze(self, which: str, process: subprocess.Popen[bytes] | None, *, frozen: bool) -> None:
        """SIGSTOP or SIGCONT a process group, remembering what is paused for ensure_running."""
        _signal_group(
            self._require(process, which).pid, signal.SIGSTOP if frozen else signal.SIGCONT
        )
        if frozen:
            self._paused.add(which)
        else:
            self._paused.discard(which)

    # both

    async def ensure_running(self) -> None:
        """Resume what is paused and start what is down: a shared stack left as a test broke it
        must not become the next scenario's fault."""
        if "broker" in self._paused:
            self.resume_broker()
        if "triton" in self._paused:
            self.resume_triton()
        if not self.broker_running:
            await self.start_broker()
        if not self.triton_running:
            await self.start_triton()

    def log_tails(self, lines: int = 20) -> str:
        return (
            f"--- broker log ---\n{_tail(self.state_dir / 'kafka.log', lines)}\n"
            f"--- triton log ---\n{_tail(self.state_dir / 'triton.log', lines)}"
        )

    def close(self) -> None:
        """Kill both servers (their data is thrown away with the test's directory, and a
        graceful stop would only cost seconds) and free Triton's shared memory. Idempotent."""
        if self._triton is not None and self._triton.returncode is None:
            self.kill_triton()
        if self._broker is not None and self._broker.returncode is None:
            _kill_group(self._broker)
        self._paused.clear()

    @staticmethod
    def _require(process: subprocess.Popen[bytes] | None, what: str) -> subprocess.Popen[bytes]:
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{what} is not running")
        return process


# --- topics ---------------------------------------------------------------------------------


async def new_topics(bootstrap: str, name: str, partitions: int = 3) -> Topics:
    """Fresh input, verdict, dead-letter and review topics and a fresh group, named after the
    scenario."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "scenario"
    return await Topics.create(bootstrap, f"{slug}-{uuid.uuid4().hex[:6]}", partitions)


# --- review verdicts -----------------------------------------------------------------------
#
# Which verdicts go to review is the decision rules' choice; the suite makes some, to prove the
# review topic's delivery under every fault: every REVIEW_EVERY-th event produced names the
# review policy (REVIEW_POLICY_ID, written by `review_policy` into GUARDSTREAM_POLICY_DIR),
# whose own rules send what the bench and CPU guards answer (Safe, NA) to review.

REVIEW_EVERY = 5
REVIEW_POLICY_ID = "fault-review"


def for_review(index: int) -> bool:
    """Whether the index-th event produced names the review policy."""
    return index % REVIEW_EVERY == REVIEW_EVERY - 1


def review_policy() -> str:
    """The review policy file: LlavaGuard's, deciding review for a Safe answer."""
    return (
        f'id = "{REVIEW_POLICY_ID}"\nversion = "1.0.0"\nextends = "llavaguard-v1.2"\n\n'
        '[decision]\nsafe = "review"\n'
    )


def review_policy_dir(state_dir: Path) -> Path:
    """A policy directory holding the review policy (GUARDSTREAM_POLICY_DIR)."""
    directory = state_dir / "policies"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{REVIEW_POLICY_ID}.toml").write_text(review_policy())
    return directory


# --- the service under test -----------------------------------------------------------------


def service_env(
    fault_stack: FaultStack,
    topics: Topics,
    *,
    name: str,
    delivery: str = AT_LEAST_ONCE,
    transactional_id: str | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's environment: addresses, topics, group, delivery mode, then the overrides.

    Settings the service does not know yet (GUARDSTREAM_DELIVERY before exactly-once lands) are
    ignored by it, so they can be passed unconditionally. In exactly-once mode each consumer
    gets a transactional id made of its group and name, stable across its restarts, so a
    restarted consumer fences its former self.
    """
    env = {
        **os.environ,
        "GUARDSTREAM_BOOTSTRAP_SERVERS": fault_stack.bootstrap,
        "GUARDSTREAM_TRITON_URL": fault_stack.triton_grpc,
        "GUARDSTREAM_INPUT_TOPIC": topics.input,
        "GUARDSTREAM_VERDICT_TOPIC": topics.verdicts,
        "GUARDSTREAM_DEAD_LETTER_TOPIC": topics.dead_letters,
        "GUARDSTREAM_REVIEW_TOPIC": topics.review,
        "GUARDSTREAM_POLICY_DIR": str(review_policy_dir(fault_stack.state_dir)),
        "GUARDSTREAM_GROUP_ID": topics.group,
        "GUARDSTREAM_CLIENT_ID": f"guardstream-{name}",
        "GUARDSTREAM_DELIVERY": delivery,
        # Tansu refuses idempotent producers (see service/dev/stack.py).
        "GUARDSTREAM_ENABLE_IDEMPOTENCE": str(fault_stack.config.broker != "tansu").lower(),
        "GUARDSTREAM_GUARD_STARTUP_TIMEOUT_S": "60",
        # Commits every 100 ms, not 500: at the bench guard's pace (tests/test_faults.py, "Pace")
        # a fault lands after several commits, with few events.
        "GUARDSTREAM_COMMIT_INTERVAL_MS": "100",
        # Several consumers on one machine: each health/metrics server on a port of its own.
        "GUARDSTREAM_HEALTH_PORT": "0",
        # The faults are about the pipe: every event asks the guard (the events cycle through
        # a few images, which reuse would answer without it), and no decisions or banks topic
        # is read. The Redis scenario turns reuse on itself.
        "GUARDSTREAM_REUSE": "off",
        "GUARDSTREAM_DECISIONS_TOPIC": "",
        "GUARDSTREAM_BANKS_TOPIC": "",
        "OTEL_TRACES_EXPORTER": "none",
    }
    if delivery == EXACTLY_ONCE:
        env["GUARDSTREAM_TRANSACTIONAL_ID"] = transactional_id or f"{topics.group}-{name}"
    elif transactional_id is not None:
        env["GUARDSTREAM_TRANSACTIONAL_ID"] = transactional_id
    env.update(overrides or {})
    return env


class ServiceProcess:
    """One `python -m service run` child, in its own process group, logging to a file.

    It can be started again after it exited (a restart appends to the same log, after a
    marker line). `async with` starts it and SIGKILLs it on the way out if it still runs, so a
    failing test leaves no consumer behind.
    """

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- {self.name}: start {self.starts} ---\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service",
                "run",
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def sigterm(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit status; SIGKILL (status -9) if it outlives timeout_s.

        The default exceeds the service's default drain timeout (20 s).
        """
        process = self._started()
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            _signal_group(process.pid, signal.SIGCONT)  # a paused one could not act on it
            try:
                return await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                return await self.sigkill()
        return process.returncode

    async def sigkill(self) -> int:
        """kill -9: no drain, no commit, no goodbye to the group."""
        process = self._started()
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGKILL)
        return await process.wait()

    def pause(self) -> None:
        """SIGSTOP: alive to the OS, silent to the broker (its session will time out)."""
        _signal_group(self._started().pid, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self._started().pid, signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n{_tail(self.log_path, lines)}"

    def log_since_start(self) -> str:
        """What the current (last) run has logged so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_mark(self) -> int:
        """Where the current run's log ends now: `wait_for_log(..., after=mark)` looks past it."""
        return len(self.log_since_start())

    async def wait_for_log(self, text: str, timeout_s: float = 60.0, *, after: int = 0) -> None:
        """Wait until the current run logs `text` (e.g. "partitions assigned"), after `after`.

        A bounded poll of the log file; fails at once, with the log, if the process exits.
        The service's log lines are not a contract: prefer waiting for outcomes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while text not in self.log_since_start()[after:]:
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited with {self.returncode} before logging {text!r}\n"
                    + self.log_tail()
                )
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name} did not log {text!r} in {timeout_s}s")
            await asyncio.sleep(0.1)

    def _started(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._process

    async def __aenter__(self) -> ServiceProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.running:
            await self.sigkill()


# --- events in ------------------------------------------------------------------------------


@cache
def small_images() -> tuple[bytes, ...]:
    """Eight real 64x64 images (JPEG and PNG of four patterns): decoding and the detector run
    for real, but cost little, and the records stay around 2-4 KB."""
    side = np.arange(64, dtype=np.uint16)
    x, y = np.meshgrid(side, side)
    rng = np.random.default_rng(11)
    patterns = [
        np.dstack([x * 4, y * 4, np.full_like(x, 128)]),
        np.dstack([(x // 8 + y // 8) % 2 * 255] * 3),
        np.dstack([((x - 32) ** 2 + (y - 32) ** 2) % 256, y * 2, x * 3]),
        rng.integers(0, 256, (64, 64, 3)),
    ]
    images = []
    for pattern in patterns:
        picture = Image.fromarray((pattern % 256).astype(np.uint8), "RGB")
        for fmt, options in (("JPEG", {"quality": 85}), ("PNG", {})):
            out = io.BytesIO()
            picture.save(out, fmt, **options)
            images.append(out.getvalue())
    return tuple(images)


def _interleave(
    events: list[tuple[str, bytes]], extra: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    """Spread the extra records evenly among the events, so they meet a running service."""
    mixed = list(events)
    for k, item in enumerate(extra):
        mixed.insert((k + 1) * len(events) // (len(extra) + 1) + k, item)
    return mixed


async def produce(
    bootstrap: str,
    topic: str,
    n: int,
    prefix: str,
    *,
    extra: Mapping[str, bytes] | None = None,
    idempotent: bool = True,
) -> list[str]:
    """Publish `n` valid image events (ids `<prefix>00000`, ...) and return every id sent.

    Every REVIEW_EVERY-th names the review policy (`for_review`), the others none. `extra`
    maps event ids to raw record values (malformed events, say) mixed in evenly; they are sent
    with that id as key and `event-id` header, so even their dead letters carry it. All sends
    are queued before any acknowledgement is awaited: 500 events take ~0.1 s.
    """
    images = small_images()
    events = [
        (
            f"{prefix}{i:05d}",
            encode_event(
                image_event(
                    f"{prefix}{i:05d}",
                    image=images[i % len(images)],
                    policy_id=REVIEW_POLICY_ID if for_review(i) else None,
                )
            ),
        )
        for i in range(n)
    ]
    records = _interleave(events, list((extra or {}).items()))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=idempotent, linger_ms=5
    )
    await producer.start()
    try:
        deliveries = [
            await producer.send(
                topic, value=value, key=event_id.encode(), headers=[("event-id", event_id.encode())]
            )
            for event_id, value in records
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return [event_id for event_id, _ in records]


# --- outcomes out ---------------------------------------------------------------------------


def is_dead_letter(outcome: Mapping[str, Any]) -> bool:
    """Dead letters carry `error`; verdicts carry `rating` (see `service/core/verdicts.py`)."""
    return "error" in outcome


class TopicMissing(LookupError):
    """An outcome topic is unknown to the broker (not created, or lost with its data)."""


class OutcomeReader:
    """Reads the verdict, dead-letter and review topics from the beginning, as a downstream
    consumer with no group would, keeping what it read across calls (so polling costs only new
    records): verdicts and dead letters in `outcomes`, review records apart in `reviews`.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        isolation_level: IsolationLevel = "read_committed",
    ) -> None:
        self._names = (topics.verdicts, topics.dead_letters, topics.review)
        self._review = topics.review
        self.outcomes: Outcomes = {}
        self.reviews: Outcomes = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
            # Fail fast while a broker is down; the callers decide whether to try again.
            request_timeout_ms=5000,
        )
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.topics()  # refreshes the metadata partitions_for_topic reads
        for name in self._names:
            partitions = self._consumer.partitions_for_topic(name)
            if not partitions:
                raise TopicMissing(f"the broker does not know topic {name!r}")
            self._partitions += [TopicPartition(name, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_s: float) -> int:
        """Take what arrives within timeout_s (returns as soon as records do); how many."""
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        count = 0
        for records in batches.values():
            for record in records:
                if record.value is None:
                    continue
                outcome = orjson.loads(record.value)
                kept = self.reviews if record.topic == self._review else self.outcomes
                kept.setdefault(outcome.get("event_id") or NO_EVENT_ID, []).append(outcome)
                count += 1
        return count

    async def drain(self, timeout_s: float = 30.0) -> Outcomes:
        """Read until every partition's position reaches the end offset taken on entry.

        For read_committed the end offset is the last stable offset, so an open transaction
        ends the read where its first record is, as it should.
        """
        ends = await self._consumer.end_offsets(self._partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self._reached(ends):
            if loop.time() > deadline:
                raise TimeoutError(f"outcome topics not drained in {timeout_s}s")
            await self.poll(0.2)
        return self.outcomes

    async def _reached(self, ends: Mapping[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def __aenter__(self) -> OutcomeReader:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def read_outcomes(
    bootstrap: str,
    topics: Topics,
    isolation_level: IsolationLevel = "read_committed",
    timeout_s: float = 30.0,
) -> Outcomes:
    """Every verdict and dead letter now in the topics, from the beginning to the end offsets."""
    return (await read_all(bootstrap, topics, isolation_level, timeout_s))[0]


async def read_all(
    bootstrap: str,
    topics: Topics,
    isolation_level: IsolationLevel = "read_committed",
    timeout_s: float = 30.0,
) -> tuple[Outcomes, Outcomes]:
    """`read_outcomes`, and the review records beside them."""
    async with OutcomeReader(bootstrap, topics, isolation_level) as reader:
        await reader.drain(timeout_s)
        return reader.outcomes, reader.reviews


async def wait_for_outcomes(
    bootstrap: str, topics: Topics, event_ids: Sequence[str], timeout_s: float
) -> Outcomes:
    """Wait until every id has an outcome visible to read_committed; on timeout return what
    there is (the caller's accounting says what is missing).

    Survives broker faults meanwhile: a reader that fails is replaced by a fresh one that reads
    from the beginning again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    missing = set(event_ids)
    outcomes: Outcomes = {}
    while missing and loop.time() < deadline:
        reader = OutcomeReader(bootstrap, topics, "read_committed")
        try:
            await reader.start()
            while missing and loop.time() < deadline:
                await reader.poll(min(0.5, max(deadline - loop.time(), 0.01)))
                missing.difference_update(reader.outcomes)
            outcomes = reader.outcomes
        except (KafkaError, OSError, TopicMissing):
            outcomes = reader.outcomes
            await asyncio.sleep(0.5)  # the broker is down or restarting: try again shortly
        finally:
            await reader.stop()
    return outcomes


# --- accounting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioResult:
    """What one scenario delivered, counted in outcome records by event_id.

    For the produced ids: verdicts + sum(dead_letters) == produced - lost +
    duplicates_committed. `unexpected` counts outcomes for ids that were not produced.

    The review topic, read_committed, against the verdicts that belong there
    (`for_review_topic`; `for_review` of them): their ids' review records number
    for_review - reviews_lost + reviews_duplicates. `reviews_unexpected` counts review records
    of any other id; `reviews_unlike` those equal to none of their id's verdicts (at least
    once, a crash between the two copies' writes leaves such a one behind; exactly once, never).
    """

    name: str
    mode: str
    produced: int
    verdicts: int
    dead_letters: dict[str, int]
    lost: int
    duplicates_committed: int
    duplicates_uncommitted: int
    wall_s: float
    unexpected: int = 0
    lost_ids: tuple[str, ...] = field(default=(), repr=False)
    for_review: int = 0
    reviews_lost: int = 0
    reviews_duplicates: int = 0
    reviews_unexpected: int = 0
    reviews_unlike: int = 0

    HEADER = (
        "| scenario | delivery | produced | verdicts | dead letters | lost "
        "| duplicates (read_committed) | duplicates (read_uncommitted) "
        "| for review | review lost | review duplicates | wall s |\n"
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_letters.values())

    def row(self) -> str:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.dead_letters.items()))
        dead = f"{self.dead_letter_total} ({codes})" if codes else "0"
        return (
            f"| {self.name} | {self.mode} | {self.produced} | {self.verdicts} | {dead} "
            f"| {self.lost} | {self.duplicates_committed} | {self.duplicates_uncommitted} "
            f"| {self.for_review} | {self.reviews_lost} | {self.reviews_duplicates} "
            f"| {self.wall_s:.1f} |"
        )


def _duplicates(produced: Sequence[str], outcomes: Outcomes) -> int:
    return sum(max(len(outcomes.get(event_id, ())) - 1, 0) for event_id in produced)


def account(
    name: str,
    mode: str,
    produced_ids: Sequence[str],
    committed: Outcomes,
    uncommitted: Outcomes,
    wall_s: float,
    reviews: Outcomes | None = None,
) -> ScenarioResult:
    """Count outcomes per produced id: lost = none visible to read_committed; duplicates =
    outcomes beyond the first, whichever topic (a dead letter then a verdict is a duplicate).
    `reviews` (read_committed) are counted against the verdicts that belong on the review topic."""
    if len(set(produced_ids)) != len(produced_ids):
        raise ValueError("produced_ids holds the same id twice: it cannot be accounted by id")
    produced = set(produced_ids)
    lost = tuple(event_id for event_id in produced_ids if not committed.get(event_id))
    kinds: Counter[str] = Counter()
    for event_id in produced_ids:
        for outcome in committed.get(event_id, ()):
            kinds[str(outcome["error"]["code"]) if is_dead_letter(outcome) else ""] += 1
    verdicts = kinds.pop("", 0)
    return ScenarioResult(
        name=name,
        mode=mode,
        produced=len(produced_ids),
        verdicts=verdicts,
        dead_letters=dict(kinds),
        lost=len(lost),
        duplicates_committed=_duplicates(produced_ids, committed),
        duplicates_uncommitted=_duplicates(produced_ids, uncommitted),
        wall_s=wall_s,
        unexpected=sum(len(v) for k, v in committed.items() if k not in produced),
        lost_ids=lost,
        **_account_reviews(produced_ids, committed, reviews or {}),
    )


def for_review_topic(verdict: Mapping[str, Any]) -> bool:
    """Whether a verdict belongs on the review topic: its action is review, or (services whose
    verdicts carry the `review` flag: sampled for review too) it says so."""
    return verdict.get("action") == "review" or verdict.get("review") is True


def _account_reviews(
    produced_ids: Sequence[str], committed: Outcomes, reviews: Outcomes
) -> dict[str, int]:
    """The review fields of a ScenarioResult (see there)."""
    expected = [
        event_id
        for event_id in produced_ids
        if any(for_review_topic(o) for o in committed.get(event_id, ()))
    ]
    wanted = set(expected)
    return {
        "for_review": len(expected),
        "reviews_lost": sum(not reviews.get(event_id) for event_id in expected),
        "reviews_duplicates": _duplicates(expected, reviews),
        "reviews_unexpected": sum(len(v) for k, v in reviews.items() if k not in wanted),
        "reviews_unlike": sum(
            review not in committed.get(event_id, [])
            for event_id in expected
            for review in reviews.get(event_id, ())
        ),
    }


RESULTS: list[ScenarioResult] = []
"""Every recorded scenario of this session, in the order they ran."""


def record(result: ScenarioResult) -> ScenarioResult:
    """Add a result to the session's table (a result with the same name replaces the old one)."""
    RESULTS[:] = [r for r in RESULTS if r.name != result.name]
    RESULTS.append(result)
    return result


def table(results: Sequence[ScenarioResult] | None = None) -> str:
    rows = RESULTS if results is None else results
    return "\n".join([ScenarioResult.HEADER, *(r.row() for r in rows)])


def write_table(path: Path = TABLE_PATH) -> str | None:
    """Write the session's table as markdown; None (and no file) when no scenario recorded."""
    if not RESULTS:
        return None
    text = table()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


# --- a scenario -----------------------------------------------------------------------------


@dataclass
class Scenario:
    """One scenario's topics and consumers on a shared stack; `close` kills what still runs."""

    name: str
    fault_stack: FaultStack
    topics: Topics
    services: list[ServiceProcess] = field(default_factory=list)

    @classmethod
    async def open(cls, fault_stack: FaultStack, name: str) -> Scenario:
        """Heal the stack a former scenario may have broken, then make fresh topics."""
        await fault_stack.ensure_running()
        return cls(name, fault_stack, await new_topics(fault_stack.bootstrap, name))

    def service(
        self,
        name: str = "consumer",
        *,
        delivery: str = AT_LEAST_ONCE,
        transactional_id: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """A consumer in this scenario's group (not started: `await it.start()` or `async with`)."""
        made = ServiceProcess(
            name,
            service_env(
                self.fault_stack,
                self.topics,
                name=name,
                delivery=delivery,
                transactional_id=transactional_id,
                overrides=env,
            ),
            self.fault_stack.state_dir / f"{self.topics.group}-{name}.log",
        )
        self.services.append(made)
        return made

    async def result(self, mode: str, produced_ids: Sequence[str], wall_s: float) -> ScenarioResult:
        """Read both isolation levels to the end, account and record the row."""
        bootstrap = self.fault_stack.bootstrap
        committed, reviews = await read_all(bootstrap, self.topics, "read_committed")
        uncommitted = await read_outcomes(bootstrap, self.topics, "read_uncommitted")
        return record(
            account(self.name, mode, produced_ids, committed, uncommitted, wall_s, reviews)
        )

    def logs(self, lines: int = 30) -> str:
        """Every consumer's log tail and the stack's: for assertion messages."""
        return "\n".join(
            [*(s.log_tail(lines) for s in self.services), self.fault_stack.log_tails()]
        )

    async def close(self) -> None:
        for service in self.services:
            if service.running:
                await service.sigkill()


async def find_in_input(
    bootstrap: str, topic: str, event_ids: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Where lost ids sit in the input topic (partition, offset); absent ids were lost by the
    broker, not by the service."""
    wanted = set(event_ids)
    found: dict[str, tuple[int, int]] = {}
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    try:
        await reader.topics()
        partitions = [
            TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())
        ]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        while any([await reader.position(tp) < end for tp, end in ends.items()]):
            for tp, records in (await reader.getmany(timeout_ms=500)).items():
                for record in records:
                    if record.key is not None and record.key.decode() in wanted:
                        found[record.key.decode()] = (tp.partition, record.offset)
    finally:
        await reader.stop()
    return found
