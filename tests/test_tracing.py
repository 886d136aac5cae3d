"""W3C trace context through Kafka headers, and the exporter the OTEL_* variables choose."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import get_current_span

from service.ops import tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_producer_context_is_read_from_a_traceparent_header() -> None:
    context = tracing.extract([("other", b"x"), ("traceparent", TRACEPARENT.encode())])
    span_context = get_current_span(context).get_span_context()
    assert f"{span_context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span_context.span_id:016x}" == "00f067aa0ba902b7"


def test_records_without_context_start_a_new_trace() -> None:
    context = tracing.extract([("traceparent", b"garbage")])
    assert not get_current_span(context).get_span_context().is_valid


def test_the_current_span_is_injected_into_outgoing_headers() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("publish") as span:
        headers = dict(tracing.inject())
        metadata = tracing.grpc_metadata()
    ids = span.get_span_context()
    flags = f"{int(ids.trace_flags):02x}"
    assert headers["traceparent"].decode() == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{flags}"
    assert metadata["traceparent"] == headers["traceparent"].decode()
    assert tracing.trace_id_of(span) == f"{ids.trace_id:032x}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "nowhere"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "OTLP (grpc) to http://c"),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "OTLP (http/protobuf) to http://c:4318/v1/traces",
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, "standard output"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, "nowhere"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, "nowhere"),
    ],
)
def test_the_exporter_follows_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.describe_exporter().startswith(expected)
    exporter = tracing._exporter_from_env()
    assert (exporter is None) == expected.startswith("nowhere")


def test_an_unknown_exporter_is_a_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        tracing._exporter_from_env()
