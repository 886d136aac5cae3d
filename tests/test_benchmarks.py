"""The throughput benchmark: its arithmetic, its inputs, and one tiny run so that it cannot rot.

The benchmark itself (`make bench`) takes minutes and its figures are read by people; here it
runs on a few hundred events with the service alone, and only its machinery is checked, never
its timings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from skimage import data as photos

from service.core.events import EventLimits, parse_event
from service.core.hashing import pdq_distance
from service.core.images import ImageLimits, decode_image
from tests.benchmarks import banks_index, decide, known_content, pdq_cost, throughput
from tests.benchmarks.images import KINDS, MIX
from tests.benchmarks.images import kind as image_kind
from tests.benchmarks.report import (
    ceiling,
    frame_name,
    latencies_ms,
    markdown_table,
    mix_mean,
    mix_rate,
    number,
    percentiles,
    profile_top,
    ratio,
)
from tests.benchmarks.throughput import Events, Latency, Run, SizeResult, jpeg_of_size


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50),
    st.lists(st.floats(0, 100), min_size=1, max_size=5),
)
def test_percentiles_interpolate_between_ranks_like_numpy(
    values: list[float], wanted: list[float]
) -> None:
    expected = np.percentile(np.array(values), wanted)
    assert percentiles(values, wanted) == pytest.approx(list(expected), rel=1e-9, abs=1e-6)


def test_percentiles_of_nothing_are_unknown_and_out_of_range_is_refused() -> None:
    assert all(math.isnan(p) for p in percentiles([], (50, 99)))
    assert percentiles([3.0, 1.0, 2.0], (0, 50, 100)) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentiles([1.0], (101,))


def test_latency_is_each_sent_keys_first_outcome_minus_its_send_time() -> None:
    sent = {b"a": 1000, b"b": 1010}
    outputs = [(b"a", 1004), (b"x", 1005), (None, 1006), (b"b", 1019), (b"a", 1500)]
    # b"x" was not sent in this run, None has no key, the second b"a" is a redelivery.
    assert latencies_ms(sent, outputs) == [4.0, 9.0]


def test_ratios_and_the_ceiling_say_unknown_rather_than_guess() -> None:
    assert ratio(80, 100) == 0.8
    assert math.isnan(ratio(80, 0))
    assert math.isnan(ratio(math.nan, 100))
    assert ceiling([600.0, 2900.0]) == 600.0
    assert ceiling([math.nan, 2900.0]) == 2900.0
    assert math.isnan(ceiling([]))
    assert number(math.nan) == "-"
    assert number(1234.5, 1) == "1,234.5"


def test_the_mix_rate_is_the_harmonic_mean_by_share_of_the_kinds_measured() -> None:
    # 10 events of a kind at 100/s and 10 at 10/s take 0.1 + 1 s: 20 / 1.1 events/s.
    assert mix_rate({"a": 0.5, "b": 0.5}, {"a": 100, "b": 10}) == pytest.approx(20 / 1.1)
    # A kind not measured is left out, the other shares renormalised.
    assert mix_rate({"a": 0.3, "b": 0.7}, {"a": 100}) == pytest.approx(100)
    assert math.isnan(mix_rate({"a": 1.0}, {"a": math.nan}))
    assert mix_mean({"a": 0.25, "b": 0.75}, {"a": 4.0, "b": 8.0}) == pytest.approx(7.0)
    assert mix_mean({"a": 0.25, "b": 0.75}, {"a": 4.0}) == pytest.approx(4.0)
    assert math.isnan(mix_mean({"a": 1.0}, {}))


def test_the_mix_covers_every_kind_and_adds_up_to_one() -> None:
    assert set(MIX) == set(KINDS)
    assert sum(MIX.values()) == pytest.approx(1.0)
    assert image_kind("jpeg-12mp").by_url
    assert image_kind("jpeg-20000").label == "20 KB JPEG"
    with pytest.raises(ValueError, match="unknown image kind"):
        image_kind("gif")


def test_profile_frames_lose_their_lines_and_aggregate_own_and_total_samples() -> None:
    assert frame_name("decode_image (/w/service/core/images.py:140)") == (
        "decode_image (service/core/images.py)"
    )
    assert frame_name("_read (/v/lib/python3.11/site-packages/aiokafka/conn.py:7)") == (
        "_read (aiokafka/conn.py)"
    )
    assert frame_name("run (/usr/lib/python3.11/asyncio/base_events.py:12)") == (
        "run (stdlib asyncio/base_events.py)"
    )
    assert frame_name("ImagingJpegDecode (libImaging.so)") == "ImagingJpegDecode (libImaging.so)"
    assert frame_name("0x7f17064a3f16 (libc.so.6)") == "? (libc.so.6)"
    raw = [
        "main (/w/service/app.py:1);decode (/w/service/core/images.py:5) 30\n",
        "main (/w/service/app.py:1);decode (/w/service/core/images.py:9) 20\n",
        "main (/w/service/app.py:2) 10\n",
        "not a stack line\n",
    ]
    samples, top = profile_top(raw, top=2)
    assert samples == 60
    assert top == [
        ("decode (service/core/images.py)", 50, 50),
        ("main (service/app.py)", 10, 60),
    ]


def test_markdown_table_aligns_number_columns_right() -> None:
    assert markdown_table(["row", "events/s"], [["a", "1"], ["b", "22"]]) == (
        "| row | events/s |\n| --- | ---: |\n| a | 1 |\n| b | 22 |"
    )


def test_images_are_jpegs_of_about_the_asked_size() -> None:
    for target in (20_000, 60_000):
        encoded = jpeg_of_size(photos.astronaut(), target)
        assert encoded[:2] == b"\xff\xd8"
        assert abs(len(encoded) - target) < 0.05 * target


def test_events_are_valid_image_events_with_unique_ids_and_trace_context() -> None:
    events = list(Events([b"\xff\xd8first", "https://example.com/second.jpg"], "run1").take(3))
    limits = EventLimits(max_event_bytes=1 << 20, max_metadata_bytes=4096)
    parsed = [parse_event(e.value, limits) for e in events]
    assert [p.event_id for p in parsed] == [e.key.decode() for e in events]
    assert len({p.event_id for p in parsed}) == 3
    assert parsed[0].image != parsed[1].image
    assert parsed[0].image == parsed[2].image
    assert all(dict(e.headers)["traceparent"].startswith(b"00-") for e in events)


def _run(mode: str, per_s: float, overrides: dict[str, str] | None = None) -> Run:
    return Run(
        mode=mode,
        size="jpeg-50k",
        overrides=overrides or {},
        in_flight=int((overrides or {}).get("MAX_IN_FLIGHT", 64))
        if mode in ("guardstream", "essential")
        else 4,
        events=1000,
        seconds=10,
        events_per_s=per_s,
        cpu_s_per_1000=2.0,
        triton_cpu_s_per_1000=1.0,
        broker_cpu_s_per_1000=0.5,
        others_percent=3,
        peak_rss_mib=150,
        latency=Latency(per_s / 2, 100, 4.0, 6.0, 9.5, 12.0, 0.5, 0),
    )


def test_report_has_every_row_the_ratios_and_the_scaling_table() -> None:
    best = _run("guardstream", 480, {"MAX_IN_FLIGHT": "256"})
    result = SizeResult(
        size="jpeg-50k",
        label="50 KB JPEG",
        image_bytes=[50_000],
        record_bytes_mean=67_000,
        backlog=6000,
        publish_s=2,
        runs=[
            _run("kafka", 3000),
            _run("triton", 600),
            _run("essential", 500, {"MAX_IN_FLIGHT": "16"}),
            _run("naive", 60),
            _run("guardstream", 400),
            best,
        ],
        triton_levels=[_run("triton", 600)],
        essential_levels=[_run("essential", 500, {"MAX_IN_FLIGHT": "16"})],
        profile_samples=200,
        profile=[("decode_image (service/core/images.py)", 50, 120)],
    )
    text = throughput.report([result], wall_s=123)
    # What main writes to the JSON reads back into the same report.
    document = json.loads(json.dumps({"sizes": [dataclasses.asdict(result)]}))
    assert throughput.report(throughput.load_results(document), wall_s=123) == text
    for row in (
        "ceiling A: aiokafka loop",
        "ceiling B: tritonclient loop, 4 in flight",
        "ceiling C: essential loop, 16 in flight",
        "baseline: naive loop",
        "guardstream defaults",
        "guardstream max_in_flight=256 (best)",
    ):
        assert f"| {row} |" in text
    # best: 480 / min(3000, 600) and 480 / 60; defaults: 400 / 600 and 400 / 60.
    # best: 480 / C's 500 = 0.96; the mix of one kind is that kind.
    assert "guardstream max_in_flight=256: 0.96 x C, 0.80 x min(A, B), 8.0 x baseline" in text
    assert "guardstream defaults: 0.80 x C, 0.67 x min(A, B), 6.7 x baseline" in text
    assert "| 50 KB JPEG | 15% | 500 | 480 | 0.96 | 2.00 | 2.00 | 150 | 0 |" in text
    assert "| weighted mix (of the 15% judged) | 15% | 500 | 480 | 0.96 |" in text
    assert "| `decode_image (service/core/images.py)` | 25.0 | 60.0 |" in text
    assert "| jpeg-50k | 256 | 480 | 2.00 | 150 | - | 0 |" in text
    assert "| jpeg-50k | 16 | 500 | 2.00 | 150 | 0 |" in text
    assert "benchmark wall time 123 s" in text


@pytest.mark.stack
def test_the_benchmark_runs_on_a_few_hundred_events(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    argv = ["--sizes", "jpeg-20000", "--events", "300", "--modes", "guardstream"]
    argv += ["--in-flight", "64", "--paced-seconds", "1", "--json", str(out)]
    assert throughput.main(argv) == 0
    document = json.loads(out.read_text())
    (size,) = document["sizes"]
    runs = {run["mode"] + ("-paced" if run["latency"] else ""): run for run in size["runs"]}
    assert set(runs) == {"guardstream-paced"}
    for run in runs.values():
        assert run["events"] > 0
        assert run["events_per_s"] > 0
        assert run["exit_code"] == 0
        assert run["dead_letters"] == 0
        assert run["peak_rss_mib"] > 0
        assert run["cpu_s_per_1000"] > 0
        assert run["latency"]["missing"] == 0
        assert run["latency"]["p99_ms"] >= 0


def test_the_decide_benchmark_runs_and_reports_every_figure() -> None:
    figures = decide.main(["--events", "20"])

    assert len(figures) == len(decide.RULE_SETS) + 1
    assert all(us > 0 for us in figures.values())


def test_the_bank_index_benchmark_finds_every_planted_near_duplicate() -> None:
    figures = banks_index.main(["--size", "3000", "--queries", "82"])

    assert figures["recall, planted at d <= 31"] == 1.0
    assert figures["matches of queries at d > 31"] == 0
    assert figures["Banks.match p50 (ms)"] > 0


def test_the_pdq_cost_benchmark_times_every_image_both_ways() -> None:
    figures = pdq_cost.main(["--repeats", "1"])

    assert list(figures) == ["~50 KB JPEG", "~500 KB JPEG", "12 MP JPEG"]
    assert all(plain > 0 and hashed > 0 for plain, hashed in figures.values())


def test_the_known_content_stream_mixes_new_images_copies_and_near_copies() -> None:
    events = known_content.stream(60, unique=0.6, duplicates=0.3)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "new"
    assert {"new", "duplicate", "near"} == set(kinds)
    limits = ImageLimits(10**8, 10**8, 10**5, 1024, pdq=True)
    decoded = [(kind, decode_image(image, limits)) for kind, image in events]
    new = {image.sha256: image.pdq for kind, image in decoded if kind == "new"}
    for kind, image in decoded:
        assert image.pdq is not None
        assert image.pdq.usable
        if kind == "duplicate":
            assert image.sha256 in new
        elif kind == "near":
            nearest = min(pdq_distance(image.pdq.hex, p.hex) for p in new.values() if p)
            assert 0 < nearest <= 31
    distinct = [p.hex for p in new.values() if p]
    assert min(pdq_distance(a, b) for a in distinct for b in distinct if a != b) > 31
