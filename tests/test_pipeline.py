"""Pipeline.judge with a scripted guard: what becomes a verdict, a dead letter, or a retry."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web
from PIL import Image

from service.adapters.fetch import Fetcher, FetchLimits, IPAddress, parse_allowed_networks
from service.client import encode_event, image_event
from service.core.breaker import Breaker
from service.core.errors import GuardError, GuardUnavailable
from service.core.guard import ServedModel
from service.core.policies import PolicyRegistry
from service.core.verdicts import Verdict, serialize
from tests.support.pipeline import (
    SAFE,
    ScriptedGuard,
    dead,
    event_record,
    jpeg,
    judge,
    make_pipeline,
    record,
)


async def test_a_parsed_answer_becomes_a_verdict_with_full_provenance() -> None:
    guard = ScriptedGuard(SAFE)
    outcome = await judge(guard, event_record(metadata={"user": "u"}))
    assert isinstance(outcome, Verdict)
    assert (outcome.rating, outcome.category, outcome.category_code) == (
        "Safe",
        "NA: None applying",
        "NA",
    )
    assert outcome.rationale == "a cat"
    assert (outcome.policy_id, outcome.policy_version) == ("llavaguard-v1.2", "1.2.1+281cc87e3207")
    assert outcome.model.model_dump() == {
        "name": "guard",
        "version": "7",
        "triton_model": "guard",
        "triton_version": "7",
    }
    assert outcome.metadata == {"user": "u"}
    assert outcome.source.model_dump() == {"topic": "images", "partition": 2, "offset": 41}
    assert outcome.timings.total_ms >= outcome.timings.guard_ms >= 0


async def test_the_guard_gets_the_policy_prompt_and_downscaled_rgb_pixels() -> None:
    guard = ScriptedGuard(SAFE)
    await judge(guard, event_record(image=jpeg(640, 480)))
    prompt, shape = guard.calls[0]
    assert prompt == PolicyRegistry.load().get("llavaguard-v1.2").render_prompt()
    # resize side 32 (tests/support/pipeline.py): DCT 1/8 to 80x60, then a box reduce by 3.
    assert shape == (20, 27, 3)


async def test_a_model_that_names_itself_is_named_in_the_verdict() -> None:
    answer = json.dumps(
        {
            "rating": "Unsafe",
            "category": "O4",
            "rationale": "r",
            "model": {"name": "nudenet-320n-rules", "version": "3.4.2+rules.x"},
        }
    )
    outcome = await judge(ScriptedGuard(answer), event_record())
    assert isinstance(outcome, Verdict)
    assert (outcome.model.name, outcome.model.version) == ("nudenet-320n-rules", "3.4.2+rules.x")
    assert (outcome.model.triton_model, outcome.model.triton_version) == ("guard", "7")
    assert (outcome.category, outcome.category_code) == ("O4: Nudity Content", "O4")


async def test_a_model_without_a_name_in_its_answer_is_named_by_its_triton_config() -> None:
    served = ServedModel(outputs=("text_output",), name="LlavaGuard-v1.2-0.5B-OV-hf", version="a1")
    outcome = await judge(ScriptedGuard(SAFE, served=served), event_record())
    assert isinstance(outcome, Verdict)
    assert (outcome.model.name, outcome.model.version) == ("LlavaGuard-v1.2-0.5B-OV-hf", "a1")
    assert (outcome.model.triton_model, outcome.model.triton_version) == ("guard", "7")


async def test_the_confidence_is_the_probability_of_the_deciding_token() -> None:
    outcome = await judge(ScriptedGuard(SAFE, rating_log_prob=math.log(0.8)), event_record())
    assert isinstance(outcome, Verdict)
    assert outcome.confidence == pytest.approx(0.8)


async def test_the_confidence_is_null_when_the_model_does_not_say() -> None:
    outcome = await judge(ScriptedGuard(SAFE), event_record())
    assert isinstance(outcome, Verdict)
    assert outcome.confidence is None
    assert b'"confidence":null' in serialize(outcome)


async def test_an_unavailable_guard_is_retried_and_then_answers() -> None:
    guard = ScriptedGuard(GuardUnavailable("down"), GuardUnavailable("down"), SAFE)
    outcome = await judge(guard, event_record())
    assert isinstance(outcome, Verdict)
    assert len(guard.calls) == 3


async def test_retries_are_bounded_and_end_as_guard_unavailable() -> None:
    guard = ScriptedGuard(GuardUnavailable("Triton: StatusCode.UNAVAILABLE"))
    letter = dead(await judge(guard, event_record()))
    assert letter.error.code == "guard_unavailable"
    assert len(guard.calls) == 3


async def test_a_refused_request_is_not_retried() -> None:
    guard = ScriptedGuard(GuardError("StatusCode.INVALID_ARGUMENT: bad shape"))
    letter = dead(await judge(guard, event_record()))
    assert (letter.error.code, letter.error.message) == (
        "guard_error",
        "StatusCode.INVALID_ARGUMENT: bad shape",
    )
    assert len(guard.calls) == 1


async def test_an_unparseable_answer_is_dead_lettered_with_the_raw_answer() -> None:
    letter = dead(await judge(ScriptedGuard("I think it is fine."), event_record()))
    assert letter.error.code == "unparseable_model_output"
    assert letter.error.model_output == "I think it is fine."


async def test_url_events_are_dead_lettered_when_fetching_is_off() -> None:
    guard = ScriptedGuard(SAFE)
    letter = dead(
        await judge(guard, record(encode_event(image_event("u", url="https://x.test/a"))))
    )
    assert letter.error.code == "url_not_supported"
    assert guard.calls == []


async def test_a_fetched_image_is_judged_and_its_fetch_timed() -> None:
    served = jpeg()

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=served, content_type="application/octet-stream")

    async def images_test(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("127.0.0.2")]

    app = web.Application()
    app.router.add_get("/u/1.jpg", image)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", 0).start()
    port = runner.addresses[0][1]
    limits = FetchLimits(max_bytes=100_000, allowed_networks=parse_allowed_networks("127.0.0.2/32"))
    fetcher = Fetcher(limits, resolve=images_test)
    guard = ScriptedGuard(SAFE)
    try:
        with ThreadPoolExecutor(1) as pool:
            outcome = await make_pipeline(guard, pool, fetcher=fetcher).judge(
                record(encode_event(image_event("u", url=f"http://images.test:{port}/u/1.jpg")))
            )
    finally:
        await fetcher.close()
        await runner.cleanup()

    assert isinstance(outcome, Verdict), outcome
    assert outcome.image_sha256 == hashlib.sha256(served).hexdigest()
    assert outcome.timings.fetch_ms is not None
    assert len(guard.calls) == 1


async def test_a_forbidden_url_is_dead_lettered_without_fetching_or_asking_the_guard() -> None:
    guard = ScriptedGuard(SAFE)
    fetcher = Fetcher(FetchLimits(max_bytes=1000))
    url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    with ThreadPoolExecutor(1) as pool:
        outcome = await make_pipeline(guard, pool, fetcher=fetcher).judge(
            record(encode_event(image_event("u", url=url)))
        )
    await fetcher.close()

    letter = dead(outcome)
    assert letter.error.code == "url_forbidden"
    assert "link-local" in letter.error.message
    assert guard.calls == []


async def test_a_raw_image_record_is_judged_under_its_header_id() -> None:
    guard = ScriptedGuard(SAFE)
    headers = (("content-type", b"image/jpeg"), ("event-id", b"raw-1"))
    outcome = await judge(guard, record(jpeg(), headers))

    assert isinstance(outcome, Verdict), outcome
    assert (outcome.event_id, outcome.metadata, outcome.timings.fetch_ms) == ("raw-1", {}, None)
    assert len(guard.calls) == 1


async def test_a_raw_record_that_is_not_an_image_is_dead_lettered() -> None:
    headers = (("content-type", b"image/png"),)
    letter = dead(await judge(ScriptedGuard(SAFE), record(b'{"event_id": "x"}', headers)))

    assert (letter.error.code, letter.event_id) == ("image_decode_failed", "k")  # the key


UNSAFE = json.dumps(
    {"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "frame shows nudity"}
)


def animation(frames: int) -> bytes:
    images = [Image.new("RGB", (16, 16), (i * 30, 0, 0)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=50)
    return out.getvalue()


@pytest.mark.parametrize(
    ("answers", "rating", "frame", "asked"),
    [
        ((SAFE, UNSAFE, SAFE), "Unsafe", 3, 2),
        ((UNSAFE, UNSAFE, SAFE), "Unsafe", 0, 1),
        ((SAFE, SAFE, SAFE), "Safe", 0, 3),
    ],
)
async def test_an_animation_judged_by_frames_takes_the_first_unsafe_frame(
    answers: tuple[str, ...], rating: str, frame: int, asked: int
) -> None:
    guard = ScriptedGuard(*answers)
    with ThreadPoolExecutor(1) as pool:
        pipeline = make_pipeline(guard, pool, animation_frames=3)
        outcome = await pipeline.judge(event_record(image=animation(7)))

    assert isinstance(outcome, Verdict), outcome
    assert (outcome.rating, outcome.frame, outcome.frames_judged) == (rating, frame, 3)
    assert len(guard.calls) == asked


async def test_a_bug_becomes_an_internal_error_dead_letter_not_a_crash() -> None:
    letter = dead(await judge(ScriptedGuard(RuntimeError("boom")), event_record()))
    assert letter.error.code == "internal_error"
    assert "RuntimeError: boom" in letter.error.message
    assert letter.event_id == "ev-1"


async def test_dead_letters_keep_a_capped_copy_of_the_original_and_its_headers() -> None:
    value = b'{"event_id": "ev-9", "image": {"data": "' + b"A" * 500 + b'"}, "x": 1}'
    letter = dead(await judge(ScriptedGuard(SAFE), record(value, (("h", b"\xff\x00"),))))
    assert letter.error.code == "invalid_event"
    assert letter.event_id == "ev-9"
    assert (letter.original_size, letter.original_truncated) == (len(value), True)
    assert letter.original is not None
    assert len(letter.original) == 136
    assert [h.model_dump(exclude_none=True) for h in letter.original_headers] == [
        {"key": "h", "value_base64": "/wA="}
    ]


@pytest.mark.parametrize(
    ("value", "headers", "expected"),
    [
        (b"not json", (("event-id", b"from-header"),), "from-header"),
        (b'{"event_id": 5}', (), None),
        (b'{"event_id": "from-body", "image": 1}', (), "from-body"),
        (b"[]", (), None),
        (None, (), None),
    ],
)
async def test_invalid_events_carry_the_producers_event_id_when_it_can_be_seen(
    value: bytes | None, headers: tuple[tuple[str, bytes], ...], expected: str | None
) -> None:
    letter = dead(await judge(ScriptedGuard(SAFE), record(value, headers)))
    assert letter.event_id == expected


class Outage:
    """A Triton that is down until `seconds` have passed, as the breaker's probe sees it."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    async def ready(self) -> bool:
        return time.monotonic() >= self.until


async def test_an_outage_waits_on_the_breaker_instead_of_spending_the_events_retries() -> None:
    outage = Outage(0.3)
    down = GuardUnavailable("StatusCode.UNAVAILABLE")
    guard = ScriptedGuard(down, down, down, down, down, down, SAFE)
    breaker = Breaker(2, outage.ready, probe_interval_s=0.05)
    with ThreadPoolExecutor(1) as pool:
        outcome = await make_pipeline(guard, pool, breaker).judge(event_record())
    await breaker.close()
    assert isinstance(outcome, Verdict), outcome
    assert len(guard.calls) == 7  # six failures, more than the 3 attempts an event has


async def test_a_slow_event_is_dead_lettered_at_its_deadline() -> None:
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        outcome = await make_pipeline(ScriptedGuard(5.0), pool, deadline_s=0.2).judge(
            event_record()
        )
    letter = dead(outcome)
    assert letter.error.code == "deadline_exceeded"
    assert letter.event_id == "ev-1"
    assert time.monotonic() - started < 2


async def test_time_waiting_for_an_open_breaker_does_not_count_against_the_deadline() -> None:
    outage = Outage(0.6)
    down = GuardUnavailable("StatusCode.UNAVAILABLE")
    breaker = Breaker(1, outage.ready, probe_interval_s=0.05)
    with ThreadPoolExecutor(1) as pool:
        pipeline = make_pipeline(ScriptedGuard(down, SAFE), pool, breaker, deadline_s=0.4)
        outcome = await pipeline.judge(event_record())
    await breaker.close()
    assert isinstance(outcome, Verdict), outcome
