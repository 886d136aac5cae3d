"""`python -m service eval` on the embedded stack's CPU guard: the sample photos' manifest.

The labels (`service.dev.samples.write_eval_samples`) call every photo Safe; the CPU guard
takes the colour wheel for nudity (O4), and honours O4 declared an exception. By hand: 8 items,
TP 0, FP 1 (the wheel), TN 7 (the other six photos and the wheel under the O4 exception),
FN 0; specificity 7/8; category correct 7/8 (the wheel's O4 against NA); the exception row
right, 1/1; ICM accuracy 7/8 (no confidence: scored on the rating).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from service.config import Settings
from service.dev import stack
from service.dev.samples import write_eval_samples
from service.evaluate import EvalRefused, Options, evaluate

pytestmark = pytest.mark.stack


def settings(state: stack.StackState) -> Settings:
    return Settings(triton_url=state.triton_grpc, guard_startup_timeout_s=60)


async def test_the_sample_manifest_gives_the_metrics_worked_by_hand(
    embedded_stack: stack.StackState, tmp_path: Path
) -> None:
    manifest = write_eval_samples(tmp_path / "samples")
    document = await evaluate(
        settings(embedded_stack), manifest, tmp_path / "out", Options(progress=False)
    )
    metrics = document["metrics"]
    assert metrics["confusion"] == {"tp": 0, "fp": 1, "tn": 7, "fn": 0, "invalid": 0}
    assert metrics["rates"]["tnr"] == 7 / 8
    assert metrics["category_correct"] == {"count": 7, "total": 8, "value": 7 / 8}
    assert metrics["policy_exceptions"] == {"count": 1, "total": 1, "value": 1.0}
    assert metrics["icm_accuracy"]["value"] == 7 / 8
    wheel = next(item for item in document["items"] if item["id"] == "color.png")
    assert (wheel["rating"], wheel["category"], wheel["action"]) == ("Unsafe", "O4", "block")
    exempt = next(item for item in document["items"] if item["id"] == "color.png+O4")
    assert (exempt["rating"], exempt["policy"]) == ("Safe", "llavaguard-v1.2.except-O4")
    written = orjson.loads((tmp_path / "out" / "report.json").read_bytes())
    assert written == document
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()


async def test_a_run_cut_short_resumes_with_what_it_had_judged(
    embedded_stack: stack.StackState, tmp_path: Path
) -> None:
    manifest = write_eval_samples(tmp_path / "samples")
    out = tmp_path / "out"
    full = await evaluate(settings(embedded_stack), manifest, out, Options(progress=False))
    results = out / "results.jsonl"
    kept = results.read_bytes().splitlines()[:3]
    results.write_bytes(b"\n".join(kept) + b'\n{"id": "cut short')  # a crash mid-write
    resumed = await evaluate(settings(embedded_stack), manifest, out, Options(progress=False))
    assert (resumed["meta"]["resumed"], resumed["meta"]["judged_this_run"]) == (3, 5)
    assert resumed["metrics"]["confusion"] == full["metrics"]["confusion"]
    assert sorted(item["id"] for item in resumed["items"]) == sorted(
        item["id"] for item in full["items"]
    )
    manifest.write_text(manifest.read_text() + manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(EvalRefused, match="another manifest or model"):
        await evaluate(settings(embedded_stack), manifest, out, Options(progress=False))


async def test_bad_rows_are_counted_with_their_lines_and_the_rest_judged(
    embedded_stack: stack.StackState, tmp_path: Path
) -> None:
    manifest = write_eval_samples(tmp_path / "samples")
    good = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join([good[0], '{"image": "gone.jpg", "expected_rating": "Safe"}', good[0], good[1]])
        + "\n"
    )
    document = await evaluate(
        settings(embedded_stack), manifest, tmp_path / "out", Options(progress=False)
    )
    assert document["meta"]["rows"] == 4
    assert [(r["line"], r["why"]) for r in document["meta"]["rejected"]] == [
        (2, "image: no file 'gone.jpg'"),
        (3, "duplicate id 'astronaut.png'"),
    ]
    assert document["metrics"]["confusion"]["tn"] == 2
