"""Logging set-up: one JSON object per line, joined to traces by the current span's ids.

A line looks like

    {"time": "2026-11-22T10:00:00.123Z", "level": "INFO",
     "logger": "service.adapters.kafka.consumer", "message": "partitions assigned: images[0]",
     "trace_id": "4bf9…", "span_id": "00f0…", "partitions": 3}

`trace_id` and `span_id` are there when the line is logged inside a valid span (so a log search
finds every line of one event's trace); fields passed with `extra={...}` follow; `exception` holds
the traceback when there is one. Formatting never raises: a value that cannot be serialised is
written as text rather than losing the line.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from opentelemetry import trace

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Whatever a LogRecord carries by itself, plus the time a human-format handler may have cached
# on it (its `message` is shadowed by ours); everything else on a record came from `extra=`.
_BARE_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
_RECORD_ATTRIBUTES = frozenset({*vars(_BARE_RECORD), "asctime"})


def setup_logging(level: str, *, json_format: bool = True, stream: TextIO | None = None) -> None:
    """Replace the root handlers with one writing to `stream` (standard error by default).

    Calling it again replaces that handler, so the set-up can be changed at any time.
    aiokafka logs every rebalance and reconnection at INFO; it is held at WARNING unless
    `level` is DEBUG.
    """
    # No `stream=sys.stderr` default: that would bind the stderr of import time, and miss
    # whatever stands for it when this runs (a test's capture, a redirect). None means "now".
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(HUMAN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("aiokafka").setLevel(logging.NOTSET if debug else logging.WARNING)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON; see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = f"{span.trace_id:032x}"
            line["span_id"] = f"{span.span_id:016x}"
        for key, value in vars(record).items():
            # An extra named like one of our keys must not replace what the record says.
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _dumps(line)


def _rfc3339(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:
        # A wrong %-placeholder is a bug in the call, but the line still says where it was.
        return f"{_text(record.msg)} (args {_text(record.args)} not formatted: {exc})"


def _dumps(line: dict[str, Any]) -> str:
    try:
        return _encode(line).decode()
    except TypeError:
        # Something defeats even str() (a raising __str__, a lone surrogate, a cycle): redo it
        # value by value so only the guilty values degrade to text.
        safe = {_text(key): _value_or_text(value) for key, value in line.items()}
        return _encode(safe).decode()


def _value_or_text(value: object) -> object:
    try:
        _encode(value)
    except TypeError:
        return _text(value)
    return value


def _encode(value: object) -> bytes:
    # Types orjson lacks (sets, Paths, exceptions) become their str(); dicts may have int keys.
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


def _text(value: object) -> str:
    """`str(value)` as valid UTF-8 text, whatever the value does."""
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
