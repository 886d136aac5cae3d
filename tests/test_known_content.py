"""Known content before the model: banks, reviewers' decisions, reused verdicts, single flight.

The pipeline with a scripted guard, real banks (`service.core.banks`, FAISS index), the
in-process reuse store and the decisions table; photos from scikit-image, so PDQ hashes are
real.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.app import KnownSources
from service.client import encode_event, image_event
from service.config import Settings
from service.core.banks import BankEntry, Banks, BankSpec
from service.core.errors import GuardError
from service.core.guard import ServedModel
from service.core.hashing import pdq_of
from service.core.human_decisions import HumanDecisions
from service.core.known import KnownContent, NearDuplicates
from service.core.pipeline import Outcome, Pipeline, Record
from service.core.reuse import MemoryStore, ReuseKey
from service.core.reviews import ReviewDecision
from service.core.verdicts import Verdict
from service.dev.samples import RULES_DIR, photo_bytes
from service.ops.metrics import Metrics
from tests.support.pipeline import SAFE, ScriptedGuard, make_pipeline

UNSAFE = json.dumps({"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "skin"})
COFFEE = photo_bytes("coffee.png")
CAMERA = photo_bytes("camera.png")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def record(event_id: str, image: bytes, offset: int = 0, **fields: Any) -> Record:
    value = encode_event(image_event(event_id, image=image, **fields))
    return Record("images", 0, offset, event_id.encode(), value, ())


def near_copy(image: bytes) -> bytes:
    """The image resized to 80 % and re-encoded as a JPEG of quality 60: other bytes, a PDQ a
    few bits away."""
    opened = Image.open(io.BytesIO(image)).convert("RGB")
    out = io.BytesIO()
    opened.resize((opened.width * 4 // 5, opened.height * 4 // 5)).save(out, "JPEG", quality=60)
    return out.getvalue()


def verdict(outcome: Outcome) -> Verdict:
    assert isinstance(outcome, Verdict), outcome
    return outcome


def known(**parts: Any) -> KnownContent:
    return KnownContent(Metrics(), **parts)


def pipeline(
    guard: ScriptedGuard, pool: ThreadPoolExecutor, knowing: KnownContent, **settings: Any
) -> Pipeline:
    # Photos at the guard's usual size: PDQ sees what it sees in production.
    return make_pipeline(
        guard,
        pool,
        known=knowing,
        policy_dir=RULES_DIR / "policies",
        **settings | {"image_resize_side": 512},
    )


def banks(*entries: BankEntry, **specs: BankSpec) -> Banks:
    bank = Banks(specs)
    for entry in entries:
        bank.add(entry)
    return bank


BLOCK = BankSpec("known-bad", "block", "O2")
ALLOW = BankSpec("house-assets", "allow", "NA")
REVIEW = BankSpec("suspect", "review", "O4")


def pdq_entry(bank: str, image: bytes, entry_id: str = "e-1") -> BankEntry:
    pixels = Image.open(io.BytesIO(image)).convert("RGB")
    pixels.thumbnail((512, 512))
    return BankEntry(bank, "pdq", pdq_of(np.asarray(pixels)).hex, entry_id, "listed")


def decision(image: bytes, policy_id: str = "llavaguard-v1.2", **fields: Any) -> ReviewDecision:
    values: dict[str, Any] = {
        "event_id": "reviewed-1",
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "policy_id": policy_id,
        "policy_version": "1.2.0+x",
        "model_action": "review",
        "sampled": False,
        "action": "block",
        "rating": "Unsafe",
        "category_code": "O5",
        "reviewer": "r-17",
        "decided_at": datetime(2026, 12, 1, tzinfo=UTC),
    } | fields
    return ReviewDecision(**values)


def decisions(*made: ReviewDecision) -> HumanDecisions:
    table = HumanDecisions()
    for one in made:
        table.apply(one.event_id.encode(), one.model_dump_json().encode(), "decisions[0]@0")
    return table


async def test_a_model_verdict_carries_the_pdq_hash_and_says_the_model_decided(
    pool: ThreadPoolExecutor,
) -> None:
    out = verdict(await pipeline(ScriptedGuard(SAFE), pool, known()).judge(record("a", COFFEE)))
    assert out.decided_by == "model"
    assert out.match is None
    assert out.pdq is not None
    assert len(out.pdq) == 64
    assert out.pdq_quality == 100


async def test_the_same_image_again_reuses_the_verdict_without_asking_the_model(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(UNSAFE)
    judge = pipeline(guard, pool, known(store=MemoryStore(100, 60))).judge
    first = verdict(await judge(record("first", COFFEE, offset=1)))
    again = verdict(await judge(record("again", COFFEE, offset=2)))
    assert len(guard.calls) == 1
    assert (again.decided_by, again.match and again.match.entry_id) == ("reuse", "first")
    assert again.event_id == "again"
    assert again.source.offset == 2
    same = ("rating", "category_code", "rationale", "action", "model", "image_sha256", "pdq")
    assert {f: getattr(again, f) for f in same} == {f: getattr(first, f) for f in same}


async def test_a_verdict_is_reused_only_under_the_same_policy_and_version(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(SAFE)
    judge = pipeline(guard, pool, known(store=MemoryStore(100, 60))).judge
    await judge(record("default", COFFEE))
    other = verdict(await judge(record("other", COFFEE, policy_id="forum-nudity-review")))
    assert other.decided_by == "model"
    assert len(guard.calls) == 2


async def test_a_verdict_is_reused_only_from_the_model_that_answers_now(
    pool: ThreadPoolExecutor,
) -> None:
    store = MemoryStore(100, 60)
    old = ScriptedGuard(SAFE, served=ServedModel(outputs=("text_output",), name="g", version="1"))
    await pipeline(old, pool, known(store=store)).judge(record("old", COFFEE))
    new = ScriptedGuard(SAFE, served=ServedModel(outputs=("text_output",), name="g", version="2"))
    judge = pipeline(new, pool, known(store=store)).judge
    # The first event after a model change cannot know the new model: it asks it.
    assert verdict(await judge(record("new-1", COFFEE))).decided_by == "model"
    assert verdict(await judge(record("new-2", COFFEE))).decided_by == "reuse"
    assert len(new.calls) == 1


async def test_identical_images_judged_together_cost_one_model_call(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(0.2)  # a slow Safe answer
    metrics = Metrics()
    judge = pipeline(guard, pool, KnownContent(metrics, store=MemoryStore(100, 60))).judge
    outs = await asyncio.gather(*(judge(record(f"e{i}", CAMERA, offset=i)) for i in range(4)))
    assert len(guard.calls) == 1
    assert sorted(verdict(o).decided_by for o in outs) == ["model", "reuse", "reuse", "reuse"]
    assert metrics.single_flight_waits._value.get() == 3


async def test_with_reuse_off_identical_images_judged_together_each_ask_the_model(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(0.05)
    judge = pipeline(guard, pool, known()).judge
    outs = await asyncio.gather(*(judge(record(f"e{i}", CAMERA, offset=i)) for i in range(3)))
    assert [verdict(o).decided_by for o in outs] == ["model"] * 3
    assert len(guard.calls) == 3


async def test_a_failed_first_call_does_not_fail_the_identical_images_waiting_for_it(
    pool: ThreadPoolExecutor,
) -> None:
    class FailsOnce(ScriptedGuard):
        async def ask(self, *args: Any, **kwargs: Any) -> Any:
            if not self.calls:
                self.calls.append(("", ()))
                await asyncio.sleep(0.1)
                raise GuardError("model said no")
            return await super().ask(*args, **kwargs)

    guard = FailsOnce(SAFE)
    judge = pipeline(guard, pool, known(store=MemoryStore(100, 60))).judge
    outs = await asyncio.gather(judge(record("a", CAMERA)), judge(record("b", CAMERA)))
    # The one that asked first gets its own failure (a dead letter); the other asks again.
    assert sorted(type(out).__name__ for out in outs) == ["DeadLetter", "Verdict"]
    assert [out.decided_by for out in outs if isinstance(out, Verdict)] == ["model"]
    assert len(guard.calls) == 2


async def test_a_block_bank_match_blocks_without_asking_the_model(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(SAFE)
    listed = banks(pdq_entry("known-bad", COFFEE, "kb-7"), **{"known-bad": BLOCK})
    out = verdict(await pipeline(guard, pool, known(banks=listed)).judge(record("x", COFFEE)))
    assert guard.calls == []
    assert (out.decided_by, out.rating, out.category, out.action) == (
        "bank",
        "Unsafe",
        "O2: Violence, Harm, or Cruelty",
        "block",
    )
    assert out.match is not None
    assert (out.match.bank, out.match.entry_id) == ("known-bad", "kb-7")
    assert out.reasons == ["bank:known-bad"]
    assert out.model.name == "bank"


async def test_a_near_duplicate_matches_a_pdq_bank_within_its_threshold(
    pool: ThreadPoolExecutor,
) -> None:
    listed = banks(pdq_entry("known-bad", COFFEE), **{"known-bad": BLOCK})
    judge = pipeline(ScriptedGuard(SAFE), pool, known(banks=listed)).judge
    out = verdict(await judge(record("x", near_copy(COFFEE))))
    assert out.match is not None
    assert out.match.kind == "pdq"
    assert 0 < out.match.distance <= 31
    unrelated = verdict(await judge(record("y", CAMERA)))
    assert unrelated.decided_by == "model"


async def test_an_exact_sha256_entry_matches_those_bytes_only(pool: ThreadPoolExecutor) -> None:
    entry = BankEntry("known-bad", "sha256", hashlib.sha256(COFFEE).hexdigest(), "s-1")
    listed = banks(entry, **{"known-bad": BLOCK})
    judge = pipeline(ScriptedGuard(SAFE), pool, known(banks=listed)).judge
    assert (
        verdict(await judge(record("x", COFFEE))).match
        == verdict(await judge(record("y", COFFEE))).match
    )
    assert verdict(await judge(record("z", near_copy(COFFEE)))).decided_by == "model"


async def test_an_allow_bank_allows_and_a_reviewer_decision_outranks_it(
    pool: ThreadPoolExecutor,
) -> None:
    listed = banks(pdq_entry("house-assets", COFFEE), **{"house-assets": ALLOW})
    judge = pipeline(ScriptedGuard(UNSAFE), pool, known(banks=listed)).judge
    allowed = verdict(await judge(record("x", COFFEE)))
    assert (allowed.decided_by, allowed.rating, allowed.action) == ("bank", "Safe", "allow")
    assert allowed.category_code == "NA"
    decided = known(banks=listed, decisions=decisions(decision(COFFEE)))
    out = verdict(await pipeline(ScriptedGuard(SAFE), pool, decided).judge(record("y", COFFEE)))
    assert (out.decided_by, out.action, out.category_code) == ("human", "block", "O5")


async def test_a_block_bank_outranks_a_reviewers_allow(pool: ThreadPoolExecutor) -> None:
    listed = banks(pdq_entry("known-bad", COFFEE), **{"known-bad": BLOCK})
    allowed = decision(COFFEE, action="allow", rating="Safe", category_code="NA")
    knowing = known(banks=listed, decisions=decisions(allowed))
    out = verdict(await pipeline(ScriptedGuard(SAFE), pool, knowing).judge(record("x", COFFEE)))
    assert (out.decided_by, out.action) == ("bank", "block")


async def test_a_review_bank_match_asks_the_model_and_sends_the_verdict_to_review(
    pool: ThreadPoolExecutor,
) -> None:
    guard = ScriptedGuard(SAFE)
    listed = banks(pdq_entry("suspect", COFFEE, "s-9"), suspect=REVIEW)
    out = verdict(await pipeline(guard, pool, known(banks=listed)).judge(record("x", COFFEE)))
    assert len(guard.calls) == 1
    assert (out.decided_by, out.rating, out.action, out.review) == ("model", "Safe", "review", True)
    assert out.reasons[-1] == "bank:suspect"
    assert out.match is not None
    assert out.match.entry_id == "s-9"


async def test_a_reviewers_decision_holds_until_withdrawn(pool: ThreadPoolExecutor) -> None:
    table = decisions(decision(COFFEE))
    guard = ScriptedGuard(SAFE)
    judge = pipeline(guard, pool, known(decisions=table)).judge
    out = verdict(await judge(record("x", COFFEE)))
    assert (out.decided_by, out.rating, out.action, out.category_code) == (
        "human",
        "Unsafe",
        "block",
        "O5",
    )
    assert out.match is not None
    assert out.match.entry_id == "reviewed-1"
    assert out.reasons == ["human:r-17"]
    assert guard.calls == []
    table.apply(b"reviewed-1", None, "decisions[0]@1")  # the review tool withdrew it
    assert verdict(await judge(record("y", COFFEE))).decided_by == "model"


async def test_a_reviewers_decision_applies_under_its_own_policy_only(
    pool: ThreadPoolExecutor,
) -> None:
    table = decisions(decision(COFFEE, policy_id="forum-nudity-review"))
    judge = pipeline(ScriptedGuard(SAFE), pool, known(decisions=table)).judge
    assert verdict(await judge(record("x", COFFEE))).decided_by == "model"
    forum = verdict(await judge(record("y", COFFEE, policy_id="forum-nudity-review")))
    assert forum.decided_by == "human"


async def test_an_observe_only_policy_allows_what_a_bank_would_block(
    pool: ThreadPoolExecutor,
) -> None:
    listed = banks(pdq_entry("known-bad", COFFEE), **{"known-bad": BLOCK})
    judge = pipeline(ScriptedGuard(SAFE), pool, known(banks=listed)).judge
    out = verdict(await judge(record("x", COFFEE, policy_id="news-observe")))
    assert (out.action, out.would_action, out.reasons) == (
        "allow",
        "block",
        ["bank:known-bad", "observe_only"],
    )


async def test_a_near_duplicate_reuses_a_verdict_only_when_asked_to(
    pool: ThreadPoolExecutor,
) -> None:
    for near, expected in ((None, "model"), (NearDuplicates(100, 31), "reuse")):
        guard = ScriptedGuard(UNSAFE)
        judge = pipeline(guard, pool, known(store=MemoryStore(100, 60), near=near)).judge
        await judge(record("original", COFFEE))
        copy = verdict(await judge(record("copy", near_copy(COFFEE))))
        assert copy.decided_by == expected
        if near is not None:
            assert copy.match is not None
            assert copy.match.kind == "pdq"
            assert copy.match.entry_id == "original"
            assert 0 < copy.match.distance <= 31


async def test_a_stored_verdict_that_does_not_parse_is_a_miss(pool: ThreadPoolExecutor) -> None:
    store = MemoryStore(100, 60)
    guard = ScriptedGuard(SAFE)
    judge = pipeline(guard, pool, known(store=store)).judge
    first = verdict(await judge(record("a", COFFEE)))
    key = ReuseKey(first.image_sha256, first.policy_id, first.policy_version, "guard", "7")
    await store.put(key, b'{"not": "a verdict"}')
    assert verdict(await judge(record("b", COFFEE))).decided_by == "model"
    assert len(guard.calls) == 2


def test_near_duplicates_ignore_low_quality_hashes_and_distant_ones() -> None:
    index = NearDuplicates(4, 10)
    flat = pdq_of(np.full((64, 64, 3), 120, np.uint8))
    photo = pdq_of(np.asarray(Image.open(io.BytesIO(COFFEE)).convert("RGB")))
    index.add(photo, "coffee")
    assert index.nearest(photo) == ("coffee", 0)
    assert flat.quality < 50
    assert index.nearest(flat) is None
    other = pdq_of(np.asarray(Image.open(io.BytesIO(CAMERA)).convert("RGB")))
    assert index.nearest(other) is None
    for i in range(4):  # the newest four: the oldest goes first
        index.add(other, f"camera-{i}")
    assert index.nearest(photo) is None


def test_a_bank_file_with_rows_but_no_valid_entry_is_a_readiness_problem(tmp_path: Path) -> None:
    (tmp_path / "bank.csv").write_text("kind,value\npdq,not-a-hash\nmd5,0123\n")
    (tmp_path / "banks.toml").write_text(
        '[[bank]]\nname = "known-bad"\naction = "block"\ncategory = "O2"\n'
        'files = [{ path = "bank.csv", format = "csv" }]\n'
    )
    sources = KnownSources(Settings(banks_file=tmp_path / "banks.toml", reuse="off"), Metrics())
    assert len(sources.problems) == 1
    assert "known-bad" in sources.problems[0]
    assert sources.known.banks is not None
    assert sources.known.banks.counts() == {"known-bad": 0}
