"""The eval report (JSON, terminal, HTML) and `--compare`'s paired bootstrap.

The HTML must stand alone (no external resource) and its plots must show the data: each PNG
decodes, is not blank, and changes when the counts change. The bootstrap must call a change a
move only when its interval excludes 0.
"""

from __future__ import annotations

import base64
import io
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from service.compare import compare, compare_lines, resampled_sums, write_compare_html
from service.core.evaluation import Judged, Rating
from service.reports import SCHEMA, report_document, terminal_lines, write_html
from tests.support.judged import dead_letter, judged
from tests.test_eval_metrics import ITEMS

META = {"manifest": "val.jsonl", "policy": "llavaguard", "model": "tiny"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.pictures: list[bytes] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)
                if value.startswith("data:image/png;base64,"):
                    self.pictures.append(base64.b64decode(value.split(",", 1)[1]))


def page(path: Path) -> _Page:
    parsed = _Page()
    parsed.feed(path.read_text())
    parsed.close()
    return parsed


def pictures(path: Path) -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)).convert("L") for data in page(path).pictures]


def html_of(items: list[Judged], path: Path) -> Path:
    write_html(report_document(items, META), path)
    return path


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-made items' page, drawn once for the tests that only read it."""
    return html_of(ITEMS, tmp_path_factory.mktemp("report") / "report.html")


def test_the_html_report_is_one_self_contained_page(report_html: Path) -> None:
    path = report_html
    parsed = page(path)
    assert not [link for link in parsed.links if re.match(r"https?://", link)]
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", path.read_text())
    # confusion matrix, per-category recall, category confusion, reliability diagram
    assert len(parsed.pictures) == 4


def test_every_plot_decodes_shows_something_and_has_a_page_sized_picture(
    report_html: Path,
) -> None:
    for picture in pictures(report_html):
        width, height = picture.size
        assert 150 <= width <= 3000
        assert 150 <= height <= 3000
        assert float(np.asarray(picture).std()) > 10  # a blank picture is one flat grey


def test_the_confusion_matrix_picture_follows_the_counts(report_html: Path, tmp_path: Path) -> None:
    flipped = [judged(i.id, i.expected_rating, i.expected_rating) for i in ITEMS]
    first = pictures(report_html)[0]
    second = pictures(html_of(flipped, tmp_path / "b.html"))[0]
    assert first.tobytes() != second.tobytes()


@pytest.mark.parametrize(
    "items",
    [
        [],
        [dead_letter("x", "Unsafe", "unparseable_model_output", expected_category="O1")],
        [judged("u", "Unsafe", "Unsafe", expected_category="O3", category="O3")],
        [judged("s", "Safe", "Safe"), judged("t", "Unsafe", "Safe")],
    ],
    ids=["no items", "only dead letters", "one class, one category", "no categories"],
)
def test_reports_render_without_verdicts_classes_confidences_or_actions(
    items: list[Judged], tmp_path: Path
) -> None:
    report = report_document(items, META)
    assert terminal_lines(report)
    write_html(report, tmp_path / "report.html")
    assert all(p.size[0] > 0 for p in pictures(tmp_path / "report.html"))
    assert "reported no confidence" in (tmp_path / "report.html").read_text()


def test_the_json_report_round_trips_and_carries_every_item() -> None:
    report = report_document(ITEMS, META)
    assert orjson.loads(orjson.dumps(report)) == report
    assert report["schema"] == SCHEMA
    assert report["meta"] == META
    assert [item["id"] for item in report["items"]] == [i.id for i in ITEMS]
    assert report["metrics"]["confusion"] == {"tp": 3, "fp": 1, "tn": 4, "fn": 2, "invalid": 2}


def test_the_terminal_summary_names_the_headline_figures() -> None:
    text = "\n".join(terminal_lines(report_document(ITEMS, META)))
    for expected in (
        "balanced accuracy    0.7000",
        "ICM accuracy         0.6667 (8/12)",
        "unparseable answers  0.0833 (1/12)",
        "calibration ECE      0.2456",
        "p99 118.9",
        "O2",
    ):
        assert expected in text


def run(count: int, wrong: set[int]) -> dict[str, object]:
    """`count` items, every other one Unsafe (categories O1, O2), the `wrong` ones misjudged."""
    items = []
    for index in range(count):
        expected: Rating = "Unsafe" if index % 2 else "Safe"
        flipped: Rating = "Safe" if expected == "Unsafe" else "Unsafe"
        code = ("O1", "O2")[index % 4 // 2] if expected == "Unsafe" else "NA"
        rating = flipped if index in wrong else expected
        items.append(judged(f"i{index}", expected, rating, expected_category=code, category=code))
    return report_document(items, META)


def figures(result: dict[str, object]) -> dict[str, dict[str, object]]:
    rows = result["figures"]
    assert isinstance(rows, list)
    return {row["figure"]: row for row in rows}


def test_a_run_compared_with_itself_moves_nothing() -> None:
    report = run(200, set(range(0, 200, 7)))
    result = figures(compare(report, report, resamples=500))
    assert set(result) >= {"balanced accuracy", "F1", "unparseable rate", "recall O1"}
    for row in result.values():
        assert (row["moved"], row["better"]) == (False, None)
        assert row["low"] <= 0 <= row["high"]  # type: ignore[operator]


def test_fixing_many_errors_moves_balanced_accuracy_up() -> None:
    before, after = run(400, set(range(0, 400, 4))), run(400, set(range(0, 400, 20)))
    row = figures(compare(before, after, resamples=1000))["balanced accuracy"]
    assert (row["moved"], row["better"]) == (True, True)
    assert row["delta"] == pytest.approx(0.2)  # 25% wrong → 5% wrong, on both classes
    assert 0 < row["low"] < row["delta"] < row["high"]  # type: ignore[operator]


def test_more_unreadable_answers_are_a_move_for_the_worse() -> None:
    before = run(300, set())
    answers = before["items"]
    assert isinstance(answers, list)
    unreadable = [
        {**item, "rating": None, "category": None, "error": "unparseable_model_output"}
        if index % 5 == 0
        else item
        for index, item in enumerate(answers)
    ]
    after = {**before, "items": unreadable}
    result = figures(compare(before, after, resamples=1000))
    row = result["unparseable rate"]
    assert row["delta"] == pytest.approx(0.2)
    assert (row["moved"], row["better"]) == (True, False)
    assert any(
        line.startswith("unparseable rate") and line.endswith("moved, worse")
        for line in compare_lines(compare(before, after, resamples=200))
    )


def test_one_image_out_of_two_hundred_is_not_a_move() -> None:
    wrong = set(range(1, 200, 10))
    before, after = run(200, wrong), run(200, wrong - {1})
    result = figures(compare(before, after, resamples=2000))
    # one more of the 100 Unsafe items found: recall +0.01, balanced accuracy +0.005
    assert result["recall"]["delta"] == pytest.approx(0.01)
    assert result["balanced accuracy"]["delta"] == pytest.approx(0.005)
    # the draws without that item change nothing, so the interval starts at 0 exactly
    assert result["balanced accuracy"]["low"] == 0
    assert not any(row["moved"] for row in result.values())


def test_items_in_one_report_only_are_counted_and_named_not_paired() -> None:
    before, after = run(10, set()), run(12, set())
    result = compare(after, before, resamples=100)
    assert (result["paired"], result["only_in_a"], result["only_in_b"]) == (10, ["i10", "i11"], [])
    assert any("only in A: i10, i11" in line for line in compare_lines(result))


def test_the_same_seed_gives_the_same_intervals() -> None:
    before, after = run(100, set(range(0, 100, 3))), run(100, set(range(0, 100, 5)))
    assert compare(before, after, 300, seed=7) == compare(before, after, 300, seed=7)
    assert compare(before, after, 300, seed=7) != compare(before, after, 300, seed=8)


def test_each_resample_sums_the_rows_its_draw_picked() -> None:
    table = np.random.default_rng(1).integers(0, 2, size=(50, 7)).astype(np.float64)
    vectorised = resampled_sums(table, 30, np.random.Generator(np.random.PCG64(3)))
    picks = np.random.Generator(np.random.PCG64(3)).integers(0, 50, size=(30, 50))
    assert np.array_equal(vectorised, table[picks].sum(axis=1))


def test_two_thousand_resamples_of_five_thousand_items_take_seconds_not_minutes() -> None:
    before, after = run(5000, set(range(0, 5000, 6))), run(5000, set(range(0, 5000, 7)))
    started = time.perf_counter()
    compare(before, after, resamples=2000)
    # About a second on the 2-core development machine; generous for a loaded one.
    assert time.perf_counter() - started < 6


def test_reports_with_nothing_in_common_compare_without_figures() -> None:
    result = compare(run(3, set()), report_document([], META), resamples=100)
    assert result["paired"] == 0
    assert all(row["delta"] is None and not row["moved"] for row in figures(result).values())


def test_the_compare_page_is_self_contained_with_a_forest_plot(tmp_path: Path) -> None:
    before, after = run(200, set(range(0, 200, 4))), run(200, set(range(0, 200, 9)))
    path = tmp_path / "compare.html"
    write_compare_html(compare(before, after, resamples=300), path)
    parsed = page(path)
    assert not [link for link in parsed.links if re.match(r"https?://", link)]
    (forest,) = pictures(path)
    assert float(np.asarray(forest).std()) > 10
