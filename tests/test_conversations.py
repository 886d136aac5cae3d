"""Conversations with the guard: the `messages` contract every guard shares, the chat messages it
becomes, the caps, and the `ask` client's bookkeeping. In-process, with fakes for Triton; the real
tritonserver holds conversations in tests/test_ask_end_to_end.py."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any, cast

import numpy as np
import orjson
import pytest

from service.adapters.triton import GuardClient, Sampling, request_tensors
from service.ask import AskLimits, Conversation, QuestionRefused, check_question
from service.core.errors import GuardError
from service.core.guard import GuardReply, ServedModel, Turn
from triton_models.common import guard_answer, guard_request


@pytest.fixture(scope="module")
def gr() -> ModuleType:
    return guard_request


def messages(turns: Any) -> np.ndarray:
    raw = turns if isinstance(turns, bytes) else json.dumps(turns).encode()
    return np.array([[raw]], dtype=np.object_)


def exchange(question: str = "Is it safe?", answer: str = "Yes.") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_no_messages_is_a_conversation_of_one_turn(gr: ModuleType) -> None:
    assert gr.history_from_tensor(None) == ()
    assert gr.history_from_tensor(messages([])) == ()


def test_the_history_is_read_turn_by_turn(gr: ModuleType) -> None:
    history = gr.history_from_tensor(messages([*exchange(), *exchange("Why?", "Because.")]))
    assert [tuple(turn) for turn in history] == [
        ("user", "Is it safe?"),
        ("assistant", "Yes."),
        ("user", "Why?"),
        ("assistant", "Because."),
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[{", "not UTF-8 JSON"),
        ({"role": "user"}, "expected a JSON array of turns"),
        (exchange()[:1], "1 turns; the history must end with the guard's answer"),
        (list(reversed(exchange())), r"messages\[0\]: role must be 'user'"),
        ([*exchange()[:1], *exchange()[:1]], r"messages\[1\]: role must be 'assistant'"),
        ([{"role": "user", "content": "x", "name": "a"}, exchange()[1]], "exactly role and"),
        ([{"role": "user", "content": " "}, exchange()[1]], "content must be non-empty text"),
        ([{"role": "user", "content": 3}, exchange()[1]], "content must be non-empty text"),
        (exchange() * 9, "18 earlier turns, over the limit of 16"),
        (exchange("x" * 70_000), r"\d+ bytes, over the limit of 65536"),
    ],
)
def test_a_history_that_breaks_the_contract_is_refused_saying_why(
    gr: ModuleType, raw: Any, message: str
) -> None:
    with pytest.raises(gr.InvalidRequestError, match=message):
        gr.history_from_tensor(messages(raw))


def test_one_turn_renders_as_before_conversations_existed() -> None:
    assert guard_answer.conversation("policy") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "policy"}]}
    ]


def test_the_image_belongs_to_the_first_turn_and_the_question_comes_last() -> None:
    rendered = guard_answer.conversation(
        "Which rule?", [("user", "policy"), ("assistant", "Unsafe.")]
    )
    assert rendered == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "policy"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Unsafe."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which rule?"}]},
    ]


def test_the_client_sends_messages_only_in_a_conversation() -> None:
    pixels = np.zeros((2, 2, 3), np.uint8)
    sampling = Sampling(max_tokens=8, temperature=0.0, top_p=1.0, top_k=0)
    assert "messages" not in [t.name for t in request_tensors("p", pixels, sampling)]
    history = (Turn("user", "p"), Turn("assistant", "No."))
    sent = {t.name: t for t in request_tensors("Why?", pixels, sampling, history)}
    assert sent["messages"].datatype == "BYTES"
    assert orjson.loads(sent["messages"].array[0, 0]) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "No."},
    ]
    assert sent["text_input"].array[0, 0] == b"Why?"


LIMITS = AskLimits(max_questions=3, max_question_chars=20)


@pytest.mark.parametrize(
    ("question", "asked", "message"),
    [
        ("  ", 0, "the question is empty"),
        ("x" * 21, 0, "21 characters, over the limit of 20"),
        ("Why?", 3, "has had its 3 questions"),
    ],
)
def test_a_question_over_a_cap_is_refused_saying_which(
    question: str, asked: int, message: str
) -> None:
    with pytest.raises(QuestionRefused, match=message):
        check_question(question, asked, LIMITS)
    assert check_question(" Why? ", 2, LIMITS) == "Why?"


class FakeGuard:
    """What Conversation calls of GuardClient: records the history of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Turn, ...]]] = []

    async def ask(self, prompt: str, pixels: Any, *, history: tuple[Turn, ...]) -> GuardReply:
        self.calls.append((prompt, history))
        return GuardReply(
            text=f"answer {len(self.calls)}",
            model_name="guard",
            model_version="1",
            rating_log_prob=np.log(0.75) if len(self.calls) == 1 else None,
            served=ServedModel(outputs=(), name="tiny", version="sha256:ab", inputs=("messages",)),
        )


async def test_each_question_carries_the_turns_before_it_and_a_refused_one_sends_nothing() -> None:
    guard = FakeGuard()
    chat = Conversation(cast(GuardClient, guard), np.zeros((2, 2, 3), np.uint8), LIMITS)
    first = await chat.ask("Is it safe?")
    assert (first.text, first.model_name, first.model_version) == ("answer 1", "tiny", "sha256:ab")
    assert first.confidence == pytest.approx(0.75)
    second = await chat.ask("Why?")
    assert second.confidence is None
    await chat.ask("Which rule?")
    assert [history for _, history in guard.calls] == [
        (),
        (Turn("user", "Is it safe?"), Turn("assistant", "answer 1")),
        (
            Turn("user", "Is it safe?"),
            Turn("assistant", "answer 1"),
            Turn("user", "Why?"),
            Turn("assistant", "answer 2"),
        ),
    ]
    with pytest.raises(QuestionRefused):
        await chat.ask("One more?")
    assert len(guard.calls) == 3
    assert len(chat.turns) == 6


async def test_a_model_without_the_messages_input_is_not_sent_a_conversation() -> None:
    # An older model repository: Triton would refuse the unknown input; the client says why.
    client = GuardClient("127.0.0.1:1", "guard", Sampling(8, 0.0, 1.0, 0))
    client._served = ServedModel(outputs=("text_output",), inputs=("text_input",))
    try:
        with pytest.raises(GuardError, match="takes no messages input"):
            await client.ask(
                "Why?", np.zeros((2, 2, 3), np.uint8), history=(Turn("user", "p"),) * 2
            )
    finally:
        await client.close()
