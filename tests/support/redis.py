"""A real redis-server of a test's own (service/dev/redis_server.py), on a free loopback port:
`kill()` and `restart()` (same port, empty) are the faults; `stop()` ends it for good."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

from service.dev import redis_server
from tests.support.stack import free_port

HOST = "127.0.0.1"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self._process = redis_server.start(HOST, self.port, self.directory, timeout_s=10.0)

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
