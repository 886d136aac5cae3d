"""A real Prometheus server (Debian's `prometheus`, installed by `make tools`) of a test's own,
scraping given targets every second and evaluating given rules every second."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.stack import free_port

JOB = "guardstream-metrics"
"""The job name the ServiceMonitor gives the consumers' series (the metrics Service's name), which
the alert rules select `up` by."""


class PrometheusServer:
    def __init__(self, directory: Path, targets: list[str], rules: dict[str, Any]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `make tools`")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    # Exemplars are scraped only with this (Prometheus 2.x).
                    "--enable-feature=exemplar-storage",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout_s}s: {self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with the error."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/api/v1/{path}", params=params) as response,
        ):
            body = await response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def alert_state(self, name: str) -> str | None:
        """`pending` or `firing` for an active alert named `name`, None when none is."""
        states = {
            a["state"]
            for a in (await self.api("alerts"))["alerts"]
            if a["labels"]["alertname"] == name
        }
        return "firing" if "firing" in states else (states.pop() if states else None)

    async def wait_for_alert(self, name: str, state: str | None, timeout_s: float) -> float:
        """Seconds until the alert is in `state` (None: inactive); AssertionError past the
        timeout."""
        started = time.monotonic()
        while (now := await self.alert_state(name)) != state:
            assert time.monotonic() - started < timeout_s, f"{name} still {now!r}, not {state!r}"
            await asyncio.sleep(0.5)
        return time.monotonic() - started
