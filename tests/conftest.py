"""Session fixtures: the real embedded stack (broker + Triton with the CPU guard) and tracing.

The stack is started with the same code as `python -m service stack up`, on free ports and in
a temporary directory, once per test session; tests isolate themselves with their own topics
and consumer groups.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.dev import stack
from tests.support.stack import Topics, free_port


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
async def topics(embedded_stack: stack.StackState) -> AsyncIterator[Topics]:
    """Fresh input, verdict and dead-letter topics (3 partitions) and a fresh group."""
    run = uuid.uuid4().hex[:8]
    made = Topics(f"images-{run}", f"verdicts-{run}", f"images-{run}.dlq", f"group-{run}")
    await stack.create_topics(
        embedded_stack.bootstrap_servers, [made.input, made.verdicts, made.dead_letters], 3
    )
    return made


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
