"""Ask the guard about one image, turn after turn: the reviewer's follow-up questions.

A reviewer holding a doubtful verdict wants what ICM-Assistant's README demonstrates: "is it
sexy?", "which rule?", "why?". This is that conversation, through the same Triton model the
service judges with (its `messages` input carries the earlier turns, rendered with the
checkpoint's own chat template):

    subject_for         a file, an http(s) URL (fetched as the service fetches: SSRF-safe,
                        bounded) or an event id (found in the input topic) -> the decoded image
                        and, for an event, the policy it was judged by
    Conversation.judge  the policy prompt as the first question -> the guard's judgement
    Conversation.ask    a question -> the guard's answer; the history goes along each time
    check_question      the caps: questions per conversation, characters per question

The Python API for review tooling:

    async with open_conversation(settings, subject.image.pixels) as chat:
        first = await chat.judge(policy)
        why = await chat.ask("Which rule does the picture match, and why?")

The CPU guard is a detector, not a language model: it answers a follow-up with its judgement
and says it cannot answer the question itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.adapters.kafka.lookup import FoundEvent, find_event
from service.adapters.rules_source import RulesFiles
from service.adapters.triton import GuardClient
from service.app import fetcher_from, limits_from, sampling_from
from service.config import Settings
from service.core.events import ImageUrl, InlineImage
from service.core.guard import Turn
from service.core.images import DecodedImage, ImageLimits, decode_image, decode_inline
from service.core.policies import Policy


class QuestionRefused(ValueError):
    """A question over one of the caps: nothing was sent to the guard."""


@dataclasses.dataclass(frozen=True)
class AskLimits:
    max_questions: int
    max_question_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AskLimits:
        return cls(settings.ask_max_questions, settings.ask_max_question_chars)


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    confidence: float | None
    """The probability of the answer at the token that decided it, when the model reports one
    and the answer has a deciding token (a Yes/No, or a LlavaGuard rating)."""
    model_name: str
    model_version: str


@dataclasses.dataclass(frozen=True)
class Subject:
    """The image a conversation is about, and where it came from."""

    image: DecodedImage
    source: str
    event: FoundEvent | None = None


def check_question(question: str, asked: int, limits: AskLimits) -> str:
    """The question as it will be sent, or QuestionRefused saying which cap it is over."""
    text = question.strip()
    if not text:
        raise QuestionRefused("the question is empty")
    if len(text) > limits.max_question_chars:
        raise QuestionRefused(
            f"the question has {len(text)} characters, over the limit of "
            f"{limits.max_question_chars} (GUARDSTREAM_ASK_MAX_QUESTION_CHARS)"
        )
    if asked >= limits.max_questions:
        raise QuestionRefused(
            f"this conversation has had its {limits.max_questions} questions "
            "(GUARDSTREAM_ASK_MAX_QUESTIONS); start a new one"
        )
    return text


class Conversation:
    """One image, the turns so far, and the guard that answers them."""

    def __init__(
        self, guard: GuardClient, pixels: npt.NDArray[np.uint8], limits: AskLimits
    ) -> None:
        self._guard = guard
        self._pixels = pixels
        self._limits = limits
        self._turns: tuple[Turn, ...] = ()

    @property
    def turns(self) -> tuple[Turn, ...]:
        return self._turns

    async def ask(self, question: str) -> Answer:
        """The guard's answer to a question of the conversation's user (capped)."""
        return await self._send(check_question(question, len(self._turns) // 2, self._limits))

    async def judge(self, policy: Policy) -> Answer:
        """The guard's judgement under `policy`, as the conversation's first turn.

        The prompt is ours, not the user's, and longer than any question (LlavaGuard's is 5.5k
        characters), so the question cap does not apply to it; it counts as a question.
        """
        if self._turns:
            raise QuestionRefused("the policy prompt can only be the first question")
        return await self._send(policy.render_prompt())

    async def _send(self, text: str) -> Answer:
        reply = await self._guard.ask(text, self._pixels, history=self._turns)
        self._turns += (Turn("user", text), Turn("assistant", reply.text))
        served = reply.served
        return Answer(
            text=reply.text,
            confidence=None if reply.rating_log_prob is None else math.exp(reply.rating_log_prob),
            model_name=(served and served.name) or reply.model_name,
            model_version=(served and served.version) or reply.model_version,
        )


@contextlib.asynccontextmanager
async def open_guard(settings: Settings) -> AsyncIterator[GuardClient]:
    """The guard the settings name, once its model is ready, for any number of conversations."""
    guard = GuardClient(
        settings.triton_url,
        settings.guard_model,
        # A conversation's answers are prose, longer than a verdict's: a cap of their own.
        dataclasses.replace(sampling_from(settings), max_tokens=settings.ask_max_tokens),
        version=settings.guard_model_version,
        timeout_s=settings.guard_timeout_s,
    )
    try:
        await guard.wait_ready(settings.guard_startup_timeout_s)
        yield guard
    finally:
        await guard.close()


@contextlib.asynccontextmanager
async def open_conversation(
    settings: Settings, pixels: npt.NDArray[np.uint8]
) -> AsyncIterator[Conversation]:
    """One conversation with the guard the settings name, once its model is ready."""
    async with open_guard(settings) as guard:
        yield Conversation(guard, pixels, AskLimits.from_settings(settings))


async def subject_for(source: str, settings: Settings, *, events: bool = True) -> Subject:
    """The image named by `source`: a file, an http(s) URL, or (with `events`) an event id of
    the input topic; FileNotFoundError when it is none of those.

    Every path goes through the service's own limits: the encoded size, the pixel count and
    the downscale of `decode_image`, and for URLs the fetcher's SSRF checks and timeouts.
    """
    limits = limits_from(settings).image
    if source.startswith(("http://", "https://")):
        return Subject(decode_image(await _fetch(source, settings), limits), source)
    encoded = await asyncio.to_thread(_read_file, Path(source), limits)
    if encoded is not None:
        return Subject(decode_image(encoded, limits), source)
    if not events:
        raise FileNotFoundError(f"{source}: no such image file")
    found = await find_event(settings, source)
    image = found.event.image
    if isinstance(image, InlineImage):
        decoded = decode_inline(image.data, limits)
    elif isinstance(image, ImageUrl):
        decoded = decode_image(await _fetch(image.url, settings), limits)
    else:
        decoded = decode_image(image, limits)
    return Subject(decoded, f"event {source} at {found.where}", found)


def _read_file(path: Path, limits: ImageLimits) -> bytes | None:
    """The file's bytes, None when there is no such file (the source is then an event id);
    one byte over the limit at most, which decode_image refuses saying so."""
    if not path.is_file():
        return None
    with path.open("rb") as file:
        return file.read(limits.max_image_bytes + 1)


async def _fetch(url: str, settings: Settings) -> bytes:
    fetcher = fetcher_from(settings)
    if fetcher is None:
        raise QuestionRefused(
            f"{url}: fetching URLs is turned off here (GUARDSTREAM_FETCH_URLS=false)"
        )
    try:
        return await fetcher.fetch(url)
    finally:
        await fetcher.close()


async def converse(
    settings: Settings, source: str, questions: list[str], *, policy_id: str | None, policy: bool
) -> None:
    """`python -m service ask`: each question in turn, printed with its answer.

    With `policy`, the first question is the policy prompt (`policy_id`, else the event's own
    policy as the service chose it, else the default), so that the guard's first answer is its
    judgement and the questions after it are about that judgement.
    """
    subject = await subject_for(source, settings)
    image = subject.image
    print(f"image   {subject.source}: {image.width}x{image.height} {image.format}")
    chosen = _policy(settings, subject, policy_id) if policy else None
    async with open_conversation(settings, image.pixels) as chat:
        if chosen is not None:
            print(f"policy  {chosen.id} {chosen.full_version}: its prompt is the first question")
            answer = await chat.judge(chosen)
            _show(1, f"<the prompt of policy {chosen.id}>", answer)
        for question in questions:
            answer = await chat.ask(question)
            _show(len(chat.turns) // 2, question, answer)
    print(f"\nmodel   {answer.model_name} {answer.model_version}")


def _policy(settings: Settings, subject: Subject, policy_id: str | None) -> Policy:
    """`policy_id`, else the one the service would judge the subject's event by."""
    rules = RulesFiles.from_settings(settings).load()
    event = subject.event.event if subject.event is not None else None
    if event is None:
        return rules.policy_for(None, policy_id)
    return rules.policy_for(event.tenant, policy_id or event.policy_id)


def _show(number: int, question: str, answer: Answer) -> None:
    confidence = "" if answer.confidence is None else f" (confidence {answer.confidence:.3f})"
    print(f"\n[{number}] you:   {question}\n    guard: {answer.text}{confidence}")
