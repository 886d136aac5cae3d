"""Operating the service: `health` (/livez, /readyz, /metrics), `metrics` (Prometheus),
`tracing` (OpenTelemetry, W3C context in Kafka headers and gRPC metadata), `logs` (JSON lines)."""
