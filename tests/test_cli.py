"""`python -m service`: help that documents every setting, commands that behave as documented."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from service.__main__ import build_parser
from service.client import ImageEventProducer, image_event
from service.config import Settings
from service.dev import stack
from service.dev.samples import all_samples, known_samples, photo_bytes
from tests.support.cli import cli
from tests.support.outputs import collect, committed_offsets
from tests.support.stack import Topics, free_port


@pytest.mark.parametrize("command", [[], ["run"]])
def test_help_documents_every_setting_and_the_otel_variables(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0
    for name, field in Settings.model_fields.items():
        assert f"GUARDSTREAM_{name.upper()}" in result.stdout
        assert field.description
        assert field.description.split()[0] in result.stdout
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"):
        assert variable in result.stdout


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    top = cli("--help").stdout
    parser = build_parser()  # each command's help in this process: a child each costs a second
    commands = ("run", "stack", "demo", "schemas", "produce", "ask", "eval", "replay", "banks")
    for command in (*commands, "dlq"):
        assert command in top
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([command, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m service {command}")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-commands by name."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices)


def test_every_dlq_action_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    actions = _actions(_actions(parser)["dlq"])
    assert sorted(actions) == ["list", "redrive", "show"]
    for name, action in actions.items():
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["dlq", name, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m service dlq {name}")
        assert action.description
        for option in action._actions:
            assert option.help, (name, option.dest)
    redrive = parser.parse_args(["dlq", "redrive", "--all"])
    assert (redrive.rate, redrive.to, redrive.again, redrive.dry_run) == (10.0, None, False, False)


def test_invalid_settings_are_refused_before_anything_starts() -> None:
    result = cli("run", env={"GUARDSTREAM_MAX_IN_FLIGHT": "0"})
    assert result.returncode == 2
    assert "max_in_flight" in result.stderr


def test_committed_json_schemas_match_the_models() -> None:
    result = cli("schemas", "--check")
    assert (result.returncode, result.stdout) == (0, "")


def test_run_exits_nonzero_with_a_clear_message_when_triton_never_becomes_ready() -> None:
    port = free_port()
    result = cli(
        "run",
        env={
            "GUARDSTREAM_TRITON_URL": f"127.0.0.1:{port}",
            "GUARDSTREAM_GUARD_STARTUP_TIMEOUT_S": "1",
            "GUARDSTREAM_HEALTH_PORT": "0",
        },
    )
    assert result.returncode == 1
    assert f"Triton at 127.0.0.1:{port} not ready after 1s" in result.stderr


@pytest.mark.stack
async def test_run_serves_until_sigterm_then_commits_and_exits_zero(
    embedded_stack: stack.StackState, topics: Topics
) -> None:
    health = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "GUARDSTREAM_BOOTSTRAP_SERVERS": embedded_stack.bootstrap_servers,
        "GUARDSTREAM_TRITON_URL": embedded_stack.triton_grpc,
        "GUARDSTREAM_INPUT_TOPIC": topics.input,
        "GUARDSTREAM_VERDICT_TOPIC": topics.verdicts,
        "GUARDSTREAM_DEAD_LETTER_TOPIC": topics.dead_letters,
        "GUARDSTREAM_REVIEW_TOPIC": topics.review,
        "GUARDSTREAM_GROUP_ID": topics.group,
        "GUARDSTREAM_HEALTH_HOST": "127.0.0.1",
        "GUARDSTREAM_HEALTH_PORT": health.rsplit(":", 1)[1],
        # A window of 2 keeps it paused most of the time: polling and commits must go on.
        "GUARDSTREAM_MAX_IN_FLIGHT": "2",
    }
    service = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "run",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with ImageEventProducer(embedded_stack.bootstrap_servers, topics.input) as producer:
            for i in range(12):
                await producer.send(image_event(f"sigterm-{i}", image=photo_bytes("rocket.jpg")))
        outcomes = await collect(embedded_stack.bootstrap_servers, topics, 12)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{health}/readyz") as response:
                ready = (response.status, await response.json())
            async with http.get(f"{health}/metrics") as response:
                metrics = await response.text()
        service.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(service.communicate(), 60)
    finally:
        if service.returncode is None:
            service.kill()
    log = stderr.decode()
    assert service.returncode == 0, log
    assert "stopped cleanly" in log
    assert sum(map(len, outcomes.values())) == 12
    assert ready[0] == 200, ready
    assert ready[1]["checks"]["partitions"] == {"ok": True, "detail": "3 partitions assigned"}
    assert {name for name, check in ready[1]["checks"].items() if check["ok"]} == {
        "partitions",
        "broker",
        "guard",
        "breaker",
        "known_content",
    }
    assert 'guardstream_verdicts_total{category="NA",rating="Safe"} 12.0' in metrics
    assert "guardstream_guard_breaker_open 0.0" in metrics
    committed, ends = await committed_offsets(embedded_stack.bootstrap_servers, topics)
    assert committed == ends
    assert sum(ends.values()) == 12


@pytest.mark.stack
def test_stack_commands_start_report_and_stop_a_stack(tmp_path: Path) -> None:
    ports = {
        "--kafka-port": free_port(),
        "--triton-http-port": free_port(),
        "--triton-grpc-port": free_port(),
        "--triton-metrics-port": free_port(),
    }
    options = ["--state-dir", str(tmp_path), *(str(x) for kv in ports.items() for x in kv)]
    started = time.monotonic()
    up = cli("stack", "up", *options)
    try:
        assert up.returncode == 0, up.stderr
        assert f"kafka bootstrap   127.0.0.1:{ports['--kafka-port']}" in up.stdout
        assert f"triton grpc       127.0.0.1:{ports['--triton-grpc-port']}" in up.stdout
        status = cli("stack", "status", *options)
        assert status.returncode == 0
        assert "triton ready    ok" in status.stdout
        again = cli("stack", "up", *options)
        assert again.returncode == 0
        assert again.stdout.splitlines()[0] == up.stdout.splitlines()[0]
    finally:
        down = cli("stack", "down", *options)
    assert down.returncode == 0
    assert "stack stopped" in down.stdout
    assert cli("stack", "status", *options).returncode == 1
    assert time.monotonic() - started < 120


@pytest.mark.stack
def test_demo_shows_every_sample_outcome_and_a_trace_then_cleans_up(tmp_path: Path) -> None:
    ports = [
        ("--kafka-port", free_port()),
        ("--triton-http-port", free_port()),
        ("--triton-grpc-port", free_port()),
        ("--triton-metrics-port", free_port()),
    ]
    state_dir = tmp_path / "stack"
    options = ["--state-dir", str(state_dir), *(str(x) for kv in ports for x in kv)]
    result = cli("demo", *options, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = all_samples("x-") + known_samples("x-")[0]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("verdict", "dead"), 23)]
    assert len(rows) == len(samples)
    # The moon sent twice, and the photos the mix already sends twice, are reused.
    decided = re.search(r"decided by: model (\d+), reuse (\d+), bank 1, human 1", result.stdout)
    assert decided is not None, result.stdout
    assert int(decided[2]) >= 1
    assert "(expected" not in result.stdout
    assert f"{len(samples)} of {len(samples)} events answered" in result.stdout
    assert "service stopped on SIGTERM with exit code 0" in result.stdout
    assert "    images process" in result.stdout
    assert (tmp_path / "demo" / "service-traces.jsonl").stat().st_size > 0
    assert stack.read_state(state_dir) is None  # the stack it started is stopped
