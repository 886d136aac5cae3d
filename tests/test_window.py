"""The in-flight window bounds records and bytes, and gives room back as they finish."""

from __future__ import annotations

from aiokafka import TopicPartition

from service.adapters.kafka.consumer import Window
from service.ops.metrics import Metrics

TP0 = TopicPartition("images", 0)
TP1 = TopicPartition("images", 1)


def test_room_is_bounded_by_the_record_count() -> None:
    window = Window(max_records=3, max_bytes=1_000_000, metrics=Metrics())
    assert window.room() == 3
    window.take(TP0, 0, 10)
    window.take(TP1, 5, 10)
    assert window.room() == 1
    window.take(TP0, 1, 10)
    assert window.room() == 0
    window.release(TP0, [0])
    assert window.room() == 1


def test_room_is_zero_once_the_bytes_are_used_but_one_large_record_always_fits() -> None:
    window = Window(max_records=100, max_bytes=1000, metrics=Metrics())
    window.take(TP0, 0, 5000)  # larger than the whole budget: taken alone, never stuck
    assert window.room() == 0
    window.release(TP0, [0])
    assert window.room() == 100
    window.take(TP0, 1, 600)
    assert window.room() == 99
    window.take(TP0, 2, 400)
    assert window.room() == 0


def test_release_below_a_committed_position_and_forget_on_revocation() -> None:
    metrics = Metrics()
    window = Window(max_records=10, max_bytes=10_000, metrics=metrics)
    for offset in (3, 4, 7):
        window.take(TP0, offset, 100)
    window.take(TP1, 0, 100)
    window.release_below(TP0, 5)
    assert (window.records, window.bytes) == (2, 200)
    window.forget(TP0)
    assert (window.records, window.bytes) == (1, 100)
    window.release(TP0, [7])  # already gone: nothing happens twice
    assert (window.records, window.bytes) == (1, 100)
    assert metrics.registry.get_sample_value("guardstream_in_flight_events") == 1
    assert metrics.registry.get_sample_value("guardstream_in_flight_bytes") == 100
