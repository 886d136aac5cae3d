"""The consumer end to end on the HF guard serving LLaVA-1.5, ICM-Assistant's architecture.

The real broker of the session stack, a real tritonserver serving triton_models/hf filled for the
tiny yes-no LLaVA-1.5 checkpoint (tests/support/tiny_llava15.py: CLIP, LLaMA, the llava_v1
conversation), and the service in this process, with events under the icm-assistant policy. The
checkpoint answers "Yes, the picture matches R01: upper shoulders." whatever the image, its `▁Yes`
at probability 0.6 against 0.3 for `▁No`: every verdict is Unsafe/R01 with ICM's two-way
confidence 0.6 / 0.9, which is under the policy's unsafe_review_below 0.7, so each goes to review.
One tritonserver for the module: it starts slowly on two cores.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.app import serve
from service.ask import open_conversation, subject_for
from service.client import ImageEventProducer
from service.config import Settings
from service.core.policies import PolicyRegistry, parse_answer
from service.dev import stack
from service.dev.samples import decision_label, photo_bytes
from service.evaluate import Options, evaluate
from tests.support import tiny_llava, tiny_llava15
from tests.support.outputs import collect, outcome_label
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

POLICY = "icm-assistant"
CHECKPOINT = "ICM-LLaVA-tiny-yes-no"
# event id -> (photo, policy id; None takes the default policy, set to icm-assistant here)
EVENTS = {
    "astronaut": ("astronaut.png", POLICY),
    "coffee": ("coffee.png", None),
    "rocket": ("rocket.jpg", POLICY),
}
YES_NO = tiny_llava.YES_NO_PROBABILITIES
TWO_WAY_YES = YES_NO["Yes"] / (YES_NO["Yes"] + YES_NO["No"])


@dataclass
class Run:
    outcomes: dict[str, list[tuple[str, Any, dict[str, bytes]]]]
    topics: Topics
    served_parameters: dict[str, str]


@dataclass
class Served:
    triton_url: str
    parameters: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hf-icm-e2e")
    checkpoint = tiny_llava15.build(root / CHECKPOINT, "yes-no")
    repository = tiny_llava15.fill_hf_repository(checkpoint, root / "models")
    config = text_format.Parse(
        (repository / "guard" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    with tiny_llava15.served(repository, root / "triton") as triton_url:
        yield Served(triton_url, parameters)


def icm_settings(state: stack.StackState, topics: Topics, served: Served) -> Settings:
    # Greedy, as ICM's own evaluation decodes; end_id is LLaMA's </s>.
    return topics.settings(
        state, triton_url=served.triton_url, default_policy=POLICY, temperature=0.0, end_id=2
    )


@pytest.fixture(scope="module")
async def run(embedded_stack: stack.StackState, served: Served) -> Run:
    topics = await Topics.create(embedded_stack.bootstrap_servers, uuid.uuid4().hex[:8])
    await produce(embedded_stack.bootstrap_servers, topics.input)
    stop = asyncio.Event()
    service = asyncio.create_task(serve(icm_settings(embedded_stack, topics, served), stop))
    try:
        found = await collect(embedded_stack.bootstrap_servers, topics, len(EVENTS))
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)
    outcomes = {key.decode(): records for key, records in found.items()}
    return Run(outcomes, topics, served.parameters)


async def produce(bootstrap: str, topic: str) -> None:
    async with ImageEventProducer(bootstrap, topic, max_request_size=2_000_000) as producer:
        for event_id, (photo, policy_id) in EVENTS.items():
            content_type = "image/jpeg" if photo.endswith(".jpg") else "image/png"
            await producer.send_image(
                photo_bytes(photo), event_id, content_type=content_type, policy_id=policy_id
            )


def verdicts(run: Run) -> list[dict[str, Any]]:
    return [value for records in run.outcomes.values() for _, value, _ in records]


def test_every_event_is_one_unsafe_r01_verdict_of_the_icm_policy(run: Run) -> None:
    labels = {
        event_id: [outcome_label(topic, value, run.topics) for topic, value, _ in records]
        for event_id, records in run.outcomes.items()
    }
    assert labels == {event_id: ["Unsafe/R01"] for event_id in EVENTS}
    policy = PolicyRegistry.load().get(POLICY)
    answer = parse_answer("".join(tiny_llava.YES_NO_ANSWERS["Yes"]), policy)
    for verdict in verdicts(run):
        assert (verdict["policy_id"], verdict["policy_version"]) == (POLICY, policy.full_version)
        assert (verdict["category"], verdict["rationale"]) == (
            "R01: upper shoulders",
            answer.rationale,
        )


def test_the_confidence_is_icms_two_way_yes_probability_and_sends_it_to_review(run: Run) -> None:
    for verdict in verdicts(run):
        assert verdict["confidence"] == pytest.approx(TWO_WAY_YES, abs=1e-4)
        # Not the whole vocabulary's 0.6, which the third token shares.
        assert verdict["confidence"] > YES_NO["Yes"] + 0.05
        assert decision_label(verdict).startswith("review")
        assert "confidence_below:0.7" in verdict["reasons"]


def test_verdicts_name_the_checkpoint_by_its_identity(run: Run) -> None:
    assert run.served_parameters["guard_model_name"] == CHECKPOINT
    assert run.served_parameters["guard_model_version"].startswith("sha256:")
    for verdict in verdicts(run):
        assert verdict["model"] == {
            "name": CHECKPOINT,
            "version": run.served_parameters["guard_model_version"],
            "triton_model": "guard",
            "triton_version": "1",
        }


ANSWER = "".join(tiny_llava.YES_NO_ANSWERS["Yes"])


async def test_ask_holds_a_three_turn_conversation_with_the_checkpoint(
    embedded_stack: stack.StackState, served: Served, topics: Topics, tmp_path: Path
) -> None:
    photo = tmp_path / "rocket.jpg"
    photo.write_bytes(photo_bytes("rocket.jpg"))
    settings = icm_settings(embedded_stack, topics, served)
    subject = await subject_for(str(photo), settings)
    async with open_conversation(settings, subject.image.pixels) as chat:
        answers = [
            await chat.judge(PolicyRegistry.load().get(POLICY)),
            await chat.ask("Which rule does the picture match?"),
            await chat.ask("Why?"),
        ]
        turns = chat.turns
    # The scripted checkpoint answers every turn alike (its next token depends on the last
    # one, "ASSISTANT:"); what the turns change is the prompt it is given, which the in-process
    # engine test pins (test_a_llava_15_conversation_renders_the_llava_v1_template).
    for answer in answers:
        assert answer.text == ANSWER
        assert answer.confidence == pytest.approx(TWO_WAY_YES, abs=1e-4)
        assert (answer.model_name, answer.model_version) == (
            CHECKPOINT,
            served.parameters["guard_model_version"],
        )
    assert [turn.text for turn in turns[2::2]] == ["Which rule does the picture match?", "Why?"]


async def test_eval_reports_icm_accuracy_and_mqa_from_the_checkpoints_answers(
    embedded_stack: stack.StackState, served: Served, topics: Topics, tmp_path: Path
) -> None:
    (tmp_path / "coffee.png").write_bytes(photo_bytes("coffee.png"))
    manifest = tmp_path / "manifest.jsonl"
    items = [
        {"id": "sexy", "expected": "Yes"},
        {"id": "normal", "expected": "No"},
        {"id": "yes-no", "question": "Is it sexy?", "expected": "Yes."},
        {"id": "choice", "question": "Which? A. x B. y C. z D. w", "expected": "D."},
    ]
    manifest.write_text(
        "".join(json.dumps({**item, "image": "coffee.png"}) + "\n" for item in items)
    )
    document = await evaluate(
        icm_settings(embedded_stack, topics, served),
        manifest,
        tmp_path / "out",
        Options(progress=False),
    )
    judged = {item["id"]: item for item in document["items"]}
    assert {name: item["rating"] for name, item in judged.items()} == {
        "sexy": "Unsafe",
        "normal": "Unsafe",
    }
    assert judged["sexy"]["confidence"] == pytest.approx(TWO_WAY_YES, abs=1e-4)
    assert document["metrics"]["icm_accuracy"] == {"count": 1, "total": 2, "value": 0.5}
    assert document["meta"]["mqa"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert document["meta"]["model"] == (f"{CHECKPOINT} {served.parameters['guard_model_version']}")
