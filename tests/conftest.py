"""Session fixtures: the real embedded stack (broker + Triton with the CPU guard) and tracing;
the test tiers.

The stack is started with the same code as `python -m service stack up`, on free ports and in
a temporary directory, once per test session; tests isolate themselves with their own topics
and consumer groups.

Tiers (markers, not directories; `make check` runs `-m "not stack and not slow"`, `make test`
runs everything):

- `stack`: the test starts, or needs, a broker, a tritonserver or a redis-server process.
  Every test whose fixtures include one of `STACK_FIXTURES` is marked here; modules and tests
  that start one by other means carry the marker themselves.
- `slow`: in-process but heavy (torch on tiny checkpoints, 12 MP photos encoded and resampled):
  too slow for the inner loop.

The marker is enforced, not trusted: a test without `stack` that tries to start a broker, a
tritonserver or a redis-server (in this process or as a `python -m service stack up` / `demo`
child) fails at once, saying so, in every run (`_refuse_servers_outside_the_stack_tier`).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.dev import stack
from tests.support.redis import RedisServer
from tests.support.stack import Topics, free_port

STACK_FIXTURES = frozenset(
    {
        "embedded_stack",  # this file: the session's broker + Triton
        "fault_stack",  # tests/test_faults.py: a broker + Triton to break
        "tansu_stack",  # tests/test_faults.py: a Tansu broker + Triton
        "bench_triton",  # tests/test_bench_model.py: a tritonserver on triton_models/bench
        "triton",  # tests/test_hf_guard_model.py: a tritonserver on the filled HF repository
        "redis_server",  # this file: a redis-server of the test's own (the reuse store)
        "monitored_stack",  # tests/test_monitoring_end_to_end.py: + a service and Prometheus
    }
)
"""Fixtures that start a broker, a tritonserver or a redis-server: a test that uses one, directly
or through another fixture (`topics` needs `embedded_stack`), is in the `stack` tier."""

SLOW_FIXTURES = frozenset(
    {
        "checkpoint",  # tests/test_trtllm_repository.py: a tiny LLaVA-OneVision built with torch
        "icm_checkpoint",  # tests/test_trtllm_repository.py: a tiny LLaVA-1.5, the same way
        "checkpoints",  # tests/test_hf_guard_model.py: two of them, and torch engines on them
        "llava15_checkpoints",  # tests/test_hf_guard_model.py: tiny LLaVA-1.5 ones, engines
        "llava15_conversion",  # tests/test_convert_llava.py: one converted from LLaVA's format
        "llava15_tokenizer",  # tests/test_convert_llava.py: transformers, for a chat template
    }
)
"""Fixtures that make a test heavy though it starts no server (torch, on tiny checkpoints built
at test time): a test that uses one is in the `slow` tier, which `make check` leaves out."""

SERVER_PROGRAMS = frozenset({"tritonserver", "noida-db", "tansu", "redis-server", "prometheus"})
"""Executables of the broker and of Triton (see service/dev/stack.py), Redis
(tests/support/redis.py) and Prometheus (tests/support/prometheus.py)."""

SERVER_COMMANDS = (("stack", "up"), ("demo",))
"""`python -m service ...` commands that start a broker and a tritonserver."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tiers by fixture (`fixturenames` holds every fixture a test needs, however
    indirectly), before `-m` selects."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & STACK_FIXTURES:
            item.add_marker(pytest.mark.stack)
        if fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


class ServerOutsideTheStackTier(RuntimeError):
    """A test not marked `stack` tried to start a broker or a tritonserver."""


_current_test: list[pytest.Item] = []
"""The test being set up, run or torn down, while it is not in the stack tier."""


def _starts_a_server(args: Any) -> str | None:
    """What a Popen command line would start, if it is a broker or a tritonserver."""
    argv = [str(args)] if isinstance(args, str | bytes | os.PathLike) else [str(a) for a in args]
    if not argv:
        return None
    if Path(argv[0]).name in SERVER_PROGRAMS:
        return Path(argv[0]).name
    if (
        argv[1:3] == ["-m", "service"]
        and any(tuple(argv[3 : 3 + len(command)]) == command for command in SERVER_COMMANDS)
        and not {"-h", "--help"}.intersection(argv)
    ):
        return " ".join(argv[1:])
    return None


def _refuse_servers_outside_the_stack_tier() -> None:
    """Make subprocess.Popen (which asyncio's subprocesses use too) refuse to start a server
    while a test outside the stack tier runs: the fast tier can then never start one, whatever
    route the test takes to it, and a missing marker fails loudly instead of slowing it down.

    The check sits where Popen executes the child (as a missing executable fails there), so
    the half-made Popen is cleaned up as usual.
    """
    popen: Any = subprocess.Popen
    original = popen._execute_child
    if getattr(original, "guardstream_tiers", False):
        return

    def guarded(self: subprocess.Popen[Any], args: Sequence[Any], *rest: Any, **kw: Any) -> Any:
        what = _starts_a_server(args) if _current_test else None
        if what is not None:
            raise ServerOutsideTheStackTier(
                f"{_current_test[0].nodeid} is not marked `stack` but starts {what}: give it a "
                f"process fixture ({', '.join(sorted(STACK_FIXTURES))}) or mark it "
                "@pytest.mark.stack (see tests/conftest.py)"
            )
        return original(self, args, *rest, **kw)

    guarded.guardstream_tiers = True  # type: ignore[attr-defined]
    popen._execute_child = guarded


def pytest_configure(config: pytest.Config) -> None:
    _refuse_servers_outside_the_stack_tier()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Arm the refusal for the whole of a test outside the stack tier: setup, call, teardown."""
    outside = item.get_closest_marker("stack") is None
    if outside:
        _current_test.append(item)
    try:
        return (yield)
    finally:
        if outside:
            _current_test.clear()


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Every span this test process makes (the global provider can be set only once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "guardstream-tests"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackState]:
    config = stack.StackConfig(
        state_dir=tmp_path_factory.mktemp("stack"),
        kafka_port=free_port(),
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        topics=(),
    )
    state = stack.up(config)
    try:
        yield state
    finally:
        stack.down(config.state_dir)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own, free to kill and restart; stopped after."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def topics(embedded_stack: stack.StackState) -> AsyncIterator[Topics]:
    """Fresh input, verdict, dead-letter and review topics (3 partitions) and a fresh group."""
    return await Topics.create(embedded_stack.bootstrap_servers, uuid.uuid4().hex[:8])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (also written to .guardstream/fault-table.md), if any
    fault scenario recorded a row this session."""
    import sys

    faults = sys.modules.get("tests.support.faults")
    table = faults.write_table() if faults is not None else None
    if table:
        terminalreporter.write_sep("=", "fault injection")
        terminalreporter.write_line(table)
