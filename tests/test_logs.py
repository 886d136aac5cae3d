"""JSON log lines: the keys, the trace ids of the current span, and lines that never get lost."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.ops.logs import HUMAN_FORMAT, JsonFormatter, setup_logging

log = logging.getLogger("service.test_logs")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put pytest's own set-up back afterwards."""
    root = logging.getLogger()
    aiokafka = logging.getLogger("aiokafka")
    handlers, level, aiokafka_level = root.handlers[:], root.level, aiokafka.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    aiokafka.setLevel(aiokafka_level)


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_has_time_level_logger_and_the_formatted_message(out: io.StringIO) -> None:
    log.info("judged %d events", 3)
    (line,) = lines(out)
    assert set(line) == {"time", "level", "logger", "message"}
    assert line["level"] == "INFO"
    assert line["logger"] == "service.test_logs"
    assert line["message"] == "judged 3 events"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    logged = datetime.fromisoformat(line["time"])
    assert abs((datetime.now(UTC) - logged).total_seconds()) < 5


def test_the_time_is_utc_with_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC).timestamp()
    assert json.loads(JsonFormatter().format(record))["time"] == "2026-11-22T10:00:00.123Z"


def test_a_line_inside_a_span_carries_its_trace_and_span_ids(out: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("images process") as span:
        log.info("inside")
    ids = span.get_span_context()
    (line,) = lines(out)
    assert line["trace_id"] == f"{ids.trace_id:032x}"
    assert line["span_id"] == f"{ids.span_id:016x}"
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"])


def test_a_line_outside_any_span_has_no_trace_ids(out: io.StringIO) -> None:
    log.info("outside")
    (line,) = lines(out)
    assert "trace_id" not in line
    assert "span_id" not in line


def test_an_exception_carries_its_traceback(out: io.StringIO) -> None:
    try:
        raise ValueError("bad offset")
    except ValueError:
        log.exception("commit failed")
    (line,) = lines(out)
    assert line["message"] == "commit failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("ValueError: bad offset")


def test_extras_become_fields_and_record_attributes_do_not(out: io.StringIO) -> None:
    log.info("assigned", extra={"partitions": [0, 2], "topic": "images", "lag": {0: 5}})
    (line,) = lines(out)
    assert set(line) == {"time", "level", "logger", "message", "partitions", "topic", "lag"}
    assert line["partitions"] == [0, 2]
    assert line["lag"] == {"0": 5}


def test_an_extra_cannot_replace_a_standard_key(out: io.StringIO) -> None:
    log.info("real", extra={"level": "fake", "time": "fake"})
    (line,) = lines(out)
    assert line["level"] == "INFO"
    assert line["time"] != "fake"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    __repr__ = __str__


def test_unserialisable_extras_degrade_to_text_and_keep_the_line(out: io.StringIO) -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    log.info(
        "kept",
        extra={
            "path": Path("/tmp/x.jpg"),
            "tags": {"a"},
            "broken": Unprintable(),
            "cycle": cycle,
            "surrogate": "name-\udcff",
            "fine": 1,
        },
    )
    (line,) = lines(out)
    assert line["message"] == "kept"
    assert line["path"] == "/tmp/x.jpg"
    assert line["tags"] == "{'a'}"
    assert line["broken"] == "<unprintable Unprintable>"
    assert line["cycle"] == "[[...]]"
    assert line["surrogate"] == "name-\\udcff"
    assert line["fine"] == 1


def test_a_message_that_cannot_be_formatted_is_still_logged() -> None:
    # Formatted directly: pytest's own capture handler would raise on this record first.
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d events", ("many",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"].startswith("%d events (args ('many',) not formatted: ")


def test_a_record_already_formatted_by_a_human_handler_adds_nothing() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m %s", ("a",), None)
    logging.Formatter(HUMAN_FORMAT).format(record)
    line = json.loads(JsonFormatter().format(record))
    assert set(line) == {"time", "level", "logger", "message"}


def test_stack_info_is_kept(out: io.StringIO) -> None:
    log.info("where am I", stack_info=True)
    (line,) = lines(out)
    assert line["stack"].startswith("Stack (most recent call last):")
    assert "test_stack_info_is_kept" in line["stack"]


def test_every_record_is_exactly_one_line(out: io.StringIO) -> None:
    log.info("first\nsecond\r\nthird")
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("multi\nline")
    assert len(out.getvalue().splitlines()) == 2
    assert lines(out)[0]["message"] == "first\nsecond\r\nthird"


def test_records_below_the_level_are_dropped() -> None:
    stream = io.StringIO()
    setup_logging("warning", stream=stream)
    log.info("dropped")
    log.warning("kept")
    assert [line["message"] for line in lines(stream)] == ["kept"]


def test_aiokafka_info_is_held_back_unless_debugging() -> None:
    chatty = logging.getLogger("aiokafka.consumer.group_coordinator")
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    chatty.info("rejoining group")
    chatty.warning("heartbeat failed")
    setup_logging("DEBUG", stream=stream)
    chatty.debug("fetch request")
    assert [line["message"] for line in lines(stream)] == ["heartbeat failed", "fetch request"]


def test_calling_setup_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", stream=first)
    setup_logging("INFO", stream=second)
    log.info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_the_human_format_for_local_runs() -> None:
    stream = io.StringIO()
    setup_logging("INFO", json_format=False, stream=stream)
    log.info("judged %d events", 3)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO service.test_logs: judged 3 events\n",
        stream.getvalue(),
    )


def test_the_default_stream_is_standard_error_at_call_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("INFO")
    log.info("to stderr")
    assert json.loads(capsys.readouterr().err)["message"] == "to stderr"
