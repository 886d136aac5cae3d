"""`ask` against the real tritonserver of the session stack (the CPU guard) and its real broker:
a three-turn conversation through the Python API, and the command line finding an event by id.

The CPU guard is a detector, not a language model: its first answer is its judgement, and every
follow-up gets that judgement back with a plain statement that it cannot answer the question.
The HF engine's conversations (a generative checkpoint that renders the history with its chat
template) are in tests/test_hf_end_to_end_icm.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from service.adapters.kafka.lookup import EventNotFound, find_event
from service.app import guard_from
from service.ask import open_conversation, subject_for
from service.client import ImageEventProducer, image_event
from service.core.errors import GuardError
from service.core.guard import Turn
from service.core.policies import PolicyRegistry
from service.dev import stack
from service.dev.samples import photo_bytes
from service.evaluate import Options, evaluate
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

QUESTIONS = ("Which rule does the picture break?", "Why?")


async def test_the_cpu_guard_holds_three_turns_and_answers_follow_ups_honestly(
    embedded_stack: stack.StackState, topics: Topics, tmp_path: Path
) -> None:
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(photo_bytes("astronaut.png"))
    settings = topics.settings(embedded_stack)
    subject = await subject_for(str(photo), settings)
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    async with open_conversation(settings, subject.image.pixels) as chat:
        first = await chat.judge(policy)
        follow_ups = [await chat.ask(question) for question in QUESTIONS]
        turns = chat.turns
    judgement = json.loads(first.text)
    assert judgement["rating"] in ("Safe", "Unsafe")
    for question, answer in zip(QUESTIONS, follow_ups, strict=True):
        assert f'cannot answer "{question}"' in answer.text
        assert f"judgement, {judgement['rating']} ({judgement['category']})" in answer.text
        assert judgement["rationale"] in answer.text
    # The CPU guard's config names no guard model (its JSON answer does): Triton's name stands.
    assert first.model_name == follow_ups[-1].model_name == "guard"
    assert judgement["model"]["name"] == "nudenet-320n-rules"
    assert [turn.role for turn in turns] == ["user", "assistant"] * 3
    assert turns[-2] == Turn("user", QUESTIONS[-1])


async def test_a_history_over_the_guards_cap_is_refused_by_the_server(
    embedded_stack: stack.StackState, topics: Topics
) -> None:
    # Past the client's own cap, straight to the guard: the server refuses on its own.
    guard = guard_from(topics.settings(embedded_stack))
    history = (Turn("user", "q"), Turn("assistant", "a")) * 9
    try:
        with pytest.raises(GuardError, match="18 earlier turns, over the limit of 16"):
            await guard.ask("Why?", np.zeros((8, 8, 3), np.uint8), history=history)
    finally:
        await guard.close()


async def test_the_command_line_finds_the_event_by_id_and_asks_after_its_policy(
    embedded_stack: stack.StackState, topics: Topics
) -> None:
    event_id = f"ask-{uuid.uuid4().hex[:8]}"
    async with ImageEventProducer(
        embedded_stack.bootstrap_servers, topics.input, max_request_size=2_000_000
    ) as producer:
        for other in range(3):
            await producer.send(image_event(f"other-{other}", image=photo_bytes("coffee.png")))
        await producer.send(image_event(event_id, image=photo_bytes("astronaut.png")))
    env = {
        **os.environ,
        "GUARDSTREAM_BOOTSTRAP_SERVERS": embedded_stack.bootstrap_servers,
        "GUARDSTREAM_INPUT_TOPIC": topics.input,
        "GUARDSTREAM_TRITON_URL": embedded_stack.triton_grpc,
    }
    done = await ask_command(env, event_id, *QUESTIONS)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"image   event {event_id} at {topics.input}[" in out
    assert "policy  llavaguard-v1.2 " in out
    assert out.count("    guard: ") == 3
    assert f"[3] you:   {QUESTIONS[1]}" in out
    assert f'cannot answer "{QUESTIONS[0]}"' in out
    refused = await ask_command(env, event_id, "x" * 2001)
    assert refused.returncode == 2
    assert "over the limit of 2000" in refused.stderr


async def ask_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "ask", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_an_unknown_event_id_is_not_found_saying_where_it_looked(
    embedded_stack: stack.StackState, topics: Topics
) -> None:
    with pytest.raises(EventNotFound, match=f"no event 'missing' in topic '{topics.input}'"):
        await find_event(topics.settings(embedded_stack), "missing")


async def test_eval_scores_a_manifest_through_the_cpu_guard(
    embedded_stack: stack.StackState, topics: Topics, tmp_path: Path
) -> None:
    for name in ("astronaut.png", "color.png"):
        (tmp_path / name).write_bytes(photo_bytes(name))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        # color.png: NudeNet scores the colour wheel as exposed buttocks (samples.PHOTOS).
        '{"id": "wheel", "image": "color.png", "expected": "Yes"}\n'
        '{"id": "astronaut", "image": "astronaut.png", "expected": "No"}\n'
        '{"id": "wrong", "image": "astronaut.png", "expected": "Unsafe"}\n'
        '{"id": "missing", "image": "nothing-here.png", "expected": "No"}\n'
        '{"id": "mqa", "image": "astronaut.png", "question": "Is it a photo? A. yes B. no",'
        ' "expected": "A."}\n'
    )
    document = await evaluate(
        topics.settings(embedded_stack),
        manifest,
        tmp_path / "out",
        Options(concurrency=2, progress=False),
    )
    ratings = {item["id"]: item["rating"] for item in document["items"]}
    assert ratings == {"wheel": "Unsafe", "astronaut": "Safe", "wrong": "Safe"}
    # ICM accuracy, scored on the rating alone (no confidence): wheel and astronaut right.
    assert document["metrics"]["icm_accuracy"] == {"count": 2, "total": 3, "value": 2 / 3}
    assert document["meta"]["rejected"] == [{"line": 4, "why": "image: no file 'nothing-here.png'"}]
    # A detector answers LlavaGuard JSON: "{" is no choice.
    assert document["meta"]["mqa"] == {"correct": 0, "total": 1, "accuracy": 0.0}
    assert document["meta"]["default_policy"] == "llavaguard-v1.2"
