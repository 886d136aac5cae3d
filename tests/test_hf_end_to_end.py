"""The consumer end to end on the HF guard: events in, verdicts with a confidence out.

The real broker of the session stack, a real tritonserver serving triton_models/hf filled for
the scripted tiny LLaVA-OneVision checkpoint (tests/support/tiny_llava.py), and the service in this
process. The checkpoint writes one LlavaGuard answer whatever the image, with the rating token
at probability 0.8, so every verdict is Safe with confidence 0.8 — unless the event's policy
cannot hold that answer, and then the raw answer goes to the dead letters.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.app import serve
from service.client import ImageEventProducer
from service.dev import stack
from service.dev.samples import photo_bytes
from service.evaluate import Options, evaluate
from tests.support import tiny_llava
from tests.support.outputs import collect, committed_offsets, outcome_label
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

# A policy whose safe category is not LlavaGuard's "NA: None applying": the scripted answer
# names a category this policy does not have.
OWN_SAFE_LABEL_POLICY = """\
id = "own-safe-label"
version = "0.1.0"
answer_format = "llavaguard-json"
safe_category = "OK"
categories = [
  { code = "O4", label = "O4: Nudity Content" },
  { code = "OK", label = "OK: Nothing to report" },
]
prompt = '''Rate the image. Answer as JSON with rating, category, rationale.'''
"""

# event id -> (photo, policy id or None for the default, expected outcome)
EVENTS = {
    "astronaut": ("astronaut.png", None, "Safe/NA"),
    "coffee": ("coffee.png", None, "Safe/NA"),
    "rocket": ("rocket.jpg", None, "Safe/NA"),
    "own-label": ("chelsea.png", "own-safe-label", "dead:unparseable_model_output"),
}


@dataclass
class Run:
    outcomes: dict[str, list[tuple[str, Any, dict[str, bytes]]]]
    """Outcome records by event id: (topic, parsed value, headers)."""
    topics: Topics
    served_parameters: dict[str, str]
    committed: dict[int, int | None]
    end_offsets: dict[int, int]
    evaluated: dict[str, Any]
    """`python -m service eval`'s report of EVAL_ROWS against the same checkpoint."""


@pytest.fixture(scope="module")
async def run(embedded_stack: stack.StackState, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("hf-e2e")
    checkpoint = tiny_llava.build(root / "LlavaGuard-tiny-scripted", "scripted")
    repository = tiny_llava.fill_hf_repository(checkpoint, root / "models")
    config = text_format.Parse(
        (repository / "guard" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    (root / "policies").mkdir()
    (root / "policies" / "own-safe-label.toml").write_text(OWN_SAFE_LABEL_POLICY)
    tag = uuid.uuid4().hex[:8]
    topics = await Topics.create(embedded_stack.bootstrap_servers, tag)
    with tiny_llava.served(repository, root / "triton") as triton_url:
        settings = topics.settings(
            embedded_stack, triton_url=triton_url, policy_dir=root / "policies"
        )
        await produce(embedded_stack.bootstrap_servers, topics.input)
        stop = asyncio.Event()
        service = asyncio.create_task(serve(settings, stop))
        try:
            found = await collect(embedded_stack.bootstrap_servers, topics, len(EVENTS))
        finally:
            stop.set()
            await asyncio.wait_for(service, 60)
        evaluated = await evaluate(
            settings, eval_manifest(root / "eval"), root / "eval-out", Options(progress=False)
        )
    committed, ends = await committed_offsets(embedded_stack.bootstrap_servers, topics)
    outcomes = {key.decode(): records for key, records in found.items()}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return Run(outcomes, topics, parameters, committed, ends, evaluated)


# The checkpoint answers Safe/NA at 0.8 whatever it is shown; the labels say otherwise for
# two photos, and one row's policy cannot read the answer (a dead letter, unparseable).
EVAL_ROWS = [
    {"id": "a", "image": "astronaut.png", "expected_rating": "Unsafe", "expected_category": "O1"},
    {"id": "b", "image": "coffee.png", "expected_rating": "Unsafe", "expected_category": "O4"},
    {"id": "c", "image": "rocket.jpg", "expected_rating": "Safe"},
    {"id": "d", "image": "chelsea.png", "expected_rating": "Safe", "exceptions": ["O4"]},
    {"id": "e", "image": "camera.png", "expected_rating": "Unsafe", "policy_id": "own-safe-label"},
]


def eval_manifest(folder: Path) -> Path:
    folder.mkdir()
    for row in EVAL_ROWS:
        (folder / str(row["image"])).write_bytes(photo_bytes(str(row["image"])))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS))
    return manifest


async def produce(bootstrap: str, topic: str) -> None:
    async with ImageEventProducer(bootstrap, topic, max_request_size=2_000_000) as producer:
        for event_id, (photo, policy_id, _) in EVENTS.items():
            content_type = "image/jpeg" if photo.endswith(".jpg") else "image/png"
            await producer.send_image(
                photo_bytes(photo), event_id, content_type=content_type, policy_id=policy_id
            )


def test_every_event_ends_as_exactly_one_expected_outcome(run: Run) -> None:
    labels = {
        event_id: [outcome_label(topic, value, run.topics) for topic, value, _ in records]
        for event_id, records in run.outcomes.items()
    }
    assert labels == {event_id: [expect] for event_id, (_, _, expect) in EVENTS.items()}
    # A partition that got no event has nothing committed.
    assert {partition: offset or 0 for partition, offset in run.committed.items()} == (
        run.end_offsets
    )
    assert sum(run.end_offsets.values()) == len(EVENTS)


def test_verdicts_carry_the_rating_tokens_probability_as_confidence(run: Run) -> None:
    for event_id in EVENTS:
        topic, verdict, _ = run.outcomes[event_id][0]
        if topic != run.topics.verdicts:
            continue
        assert verdict["confidence"] == pytest.approx(
            tiny_llava.SCRIPTED_RATING_PROBABILITY, abs=1e-4
        )
        assert verdict["rationale"] == (
            "Scripted tiny model: this answer does not depend on the image."
        )


def test_verdicts_name_the_checkpoint_the_served_config_names(run: Run) -> None:
    verdicts = [
        value
        for records in run.outcomes.values()
        for topic, value, _ in records
        if topic == run.topics.verdicts
    ]
    assert verdicts
    for verdict in verdicts:
        assert verdict["model"] == {
            "name": "LlavaGuard-tiny-scripted",
            "version": run.served_parameters["guard_model_version"],
            "triton_model": "guard",
            "triton_version": "1",
        }
    assert run.served_parameters["guard_model_name"] == "LlavaGuard-tiny-scripted"


def test_an_answer_the_policy_cannot_hold_is_dead_lettered_with_the_raw_answer(
    run: Run,
) -> None:
    topic, letter, headers = run.outcomes["own-label"][0]
    assert topic == run.topics.dead_letters
    assert headers["error-code"] == b"unparseable_model_output"
    assert letter["error"]["model_output"] == tiny_llava.SCRIPTED_ANSWER
    assert "NA: None applying" in letter["error"]["message"]


def test_eval_reproduces_the_metrics_worked_by_hand_for_the_scripted_answers(run: Run) -> None:
    # Verdicts: a, b, c, d Safe/NA at 0.8; e a dead letter (own-safe-label has no NA).
    # Classified a-d: TP 0, FP 0, TN 2 (c, d), FN 2 (a, b); invalid 1 (e).
    metrics = run.evaluated["metrics"]
    assert metrics["confusion"] == {"tp": 0, "fp": 0, "tn": 2, "fn": 2, "invalid": 1}
    rates = metrics["rates"]
    assert (rates["tpr"], rates["tnr"], rates["fnr"], rates["precision"]) == (0, 1, 1, 0)
    assert (rates["accuracy"], rates["balanced_accuracy"], rates["f1"]) == (0.5, 0.5, 0)
    # Category: a (O1) and b (O4) wrong, c and d (NA) right, over the four classified.
    assert metrics["category_correct"] == {"count": 2, "total": 4, "value": 0.5}
    assert metrics["policy_exceptions"] == {"count": 1, "total": 1, "value": 1.0}  # d: TN
    # ICM: P(violating) = 1 - 0.8 = 0.2 for every verdict: c and d right, of all five.
    assert metrics["icm_accuracy"] == {"count": 2, "total": 5, "value": 0.4}
    assert metrics["unparseable"] == {"count": 1, "total": 5, "value": 0.2}
    # Calibration: four confidences of 0.8, half of those ratings right: ECE |0.5 - 0.8|.
    calibration = metrics["calibration"]
    assert calibration["ece"] == pytest.approx(0.3, abs=1e-4)
    assert sum(b["count"] for b in calibration["bins"]) == 4
    assert run.evaluated["meta"]["model"].startswith("LlavaGuard-tiny-scripted ")
