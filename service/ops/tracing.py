"""OpenTelemetry: the tracer provider, W3C context in Kafka headers, and the spans we make.

Configured only from the standard variables, so it behaves like every other OTel service:

    OTEL_SERVICE_NAME               service.name (default "guardstream")
    OTEL_RESOURCE_ATTRIBUTES        extra resource attributes
    OTEL_TRACES_EXPORTER            otlp | console | none; default otlp when an OTLP endpoint
                                    is set, none otherwise
    OTEL_EXPORTER_OTLP_ENDPOINT     (and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) collector address
    OTEL_EXPORTER_OTLP_PROTOCOL     grpc (default) | http/protobuf
    OTEL_TRACES_SAMPLER[_ARG]       sampling, as the SDK defines it

`console` writes one JSON span per line on standard output (logs go to standard error).
Each consumed record gets a `<topic> process` CONSUMER span, parented on the producer's
`traceparent` header when there is one, with children for decoding, the guard call and the
publish; the publish span's context goes into the outgoing record's headers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, Tracer

KafkaHeaders = Sequence[tuple[str, bytes]]

TRACER_NAME = "guardstream"


def setup_tracing(default_service_name: str = "guardstream") -> TracerProvider:
    """Install the global tracer provider that the OTEL_* variables describe."""
    attributes = (
        {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": default_service_name}
    )
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def describe_exporter() -> str:
    """Where spans go, in words, for start-up logs and the demo."""
    kind = _exporter_kind()
    if kind == "otlp":
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "the default collector (localhost:4317)"
        )
        return f"OTLP ({_otlp_protocol()}) to {endpoint}"
    if kind == "console":
        return "standard output, one JSON span per line"
    return "nowhere (set OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER=console)"


def _exporter_kind() -> str:
    configured = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if configured:
        return configured
    # An empty variable (a ConfigMap key left blank) is no endpoint.
    has_endpoint = any(
        os.environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    return "otlp" if has_endpoint else "none"


def _otlp_protocol() -> str:
    return os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )


def _exporter_from_env() -> SpanExporter | None:
    kind = _exporter_kind()
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter(out=sys.stdout, formatter=one_line)
    if kind == "otlp":
        if _otlp_protocol().startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            return HttpExporter()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r} is not one of otlp, console, none")


def one_line(span: ReadableSpan) -> str:
    """A span as one JSON line, for the console exporter."""
    return str(span.to_json(indent=None)) + "\n"


class _HeaderGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == key and v is not None]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


def extract(headers: KafkaHeaders) -> Context:
    """The producer's context from a record's headers (an empty context when absent)."""
    return propagate.extract(headers, getter=_GETTER)


def inject(context: Context | None = None) -> list[tuple[str, bytes]]:
    """Headers carrying `context` (default: the current one) to the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


def grpc_metadata() -> dict[str, str]:
    """The current context as gRPC metadata, so Triton's own tracing joins the trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_id_of(span: Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def get_tracer() -> Tracer:
    return trace.get_tracer(TRACER_NAME)
