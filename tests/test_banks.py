"""Hash banks: exact and PDQ matches of real photos, the strictest bank wins, removals count at
once, banks-topic records are taken or refused with their position, and matching from threads
while entries change never misses a standing entry."""

from __future__ import annotations

import json
import logging
import random
import threading

import pytest

from service.core.banks import BankEntry, BankMatch, Banks, BankSpec, entry_key
from service.core.hashing import Pdq, pdq_distance
from service.core.pdq_index import PdqIndex
from tests.support.photos import digests, jpeg, pdq_of_jpeg

ORIGINAL = jpeg("astronaut")
COPY = jpeg("astronaut", quality=40, scale=0.6)
"""Re-encoded at another quality and resized: other bytes, a near PDQ hash."""
ORIGINAL_PDQ = pdq_of_jpeg(ORIGINAL)
COPY_PDQ = pdq_of_jpeg(COPY)
COPY_DISTANCE = pdq_distance(ORIGINAL_PDQ.hex, COPY_PDQ.hex)
OTHER = jpeg("coffee")


def specs(*banks: BankSpec) -> dict[str, BankSpec]:
    return {spec.name: spec for spec in banks}


BAD = BankSpec("known-bad", "block", "O2")
DOUBTFUL = BankSpec("doubtful", "review", "O1")
HARMLESS = BankSpec("harmless", "allow", "NA")


def look_up(banks: Banks, encoded: bytes, pdq: Pdq | None = None) -> BankMatch | None:
    sha256, md5 = digests(encoded)
    return banks.match(sha256, md5, pdq_of_jpeg(encoded) if pdq is None else pdq)


def test_the_same_bytes_match_by_sha256_and_by_md5() -> None:
    sha256, md5 = digests(ORIGINAL)
    banks = Banks(specs(BAD, DOUBTFUL))
    banks.add(BankEntry("known-bad", "sha256", sha256, "e1"))
    banks.add(BankEntry("doubtful", "md5", md5, "e2", "from a partner"))
    found = look_up(banks, ORIGINAL)
    assert found is not None
    assert (found.spec.name, found.entry.kind, found.distance) == ("known-bad", "sha256", 0)
    banks.remove("known-bad", "sha256", sha256)
    found = look_up(banks, ORIGINAL)
    assert found is not None
    assert (found.entry.kind, found.entry.note) == ("md5", "from a partner")
    assert look_up(banks, COPY) is None  # other bytes, and no bank holds a PDQ hash


def test_a_reencoded_resized_copy_matches_by_pdq_within_the_banks_threshold() -> None:
    banks = Banks(specs(BAD))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e1"))
    assert 0 < COPY_DISTANCE <= 31
    found = look_up(banks, COPY)
    assert found is not None
    assert (found.entry.entry_id, found.distance) == ("e1", COPY_DISTANCE)
    assert look_up(banks, OTHER) is None


def test_a_copy_further_than_the_banks_threshold_does_not_match() -> None:
    tight = BankSpec("tight", "block", "O2", pdq_threshold=COPY_DISTANCE - 1)
    exact_enough = BankSpec("loose", "review", "O2", pdq_threshold=COPY_DISTANCE)
    banks = Banks(specs(tight, exact_enough))
    banks.add(BankEntry("tight", "pdq", ORIGINAL_PDQ.hex, "t1"))
    banks.add(BankEntry("loose", "pdq", ORIGINAL_PDQ.hex, "l1"))
    found = look_up(banks, COPY)
    assert found is not None
    assert found.spec.name == "loose"  # the tight bank's block would win if it matched


def test_a_bank_with_threshold_zero_matches_the_same_pdq_hash_only() -> None:
    banks = Banks(specs(BankSpec("same-only", "review", "O1", pdq_threshold=0)))
    banks.add(BankEntry("same-only", "pdq", COPY_PDQ.hex, "e1"))
    assert look_up(banks, jpeg("astronaut", quality=40, scale=0.6)).distance == 0  # type: ignore[union-attr]
    assert look_up(banks, ORIGINAL) is None


def test_a_low_quality_pdq_hash_matches_nothing() -> None:
    banks = Banks(specs(BAD))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e1"))
    flat = Pdq(COPY_PDQ.hex, quality=49)
    assert look_up(banks, COPY, flat) is None
    assert banks.match(*digests(COPY), None) is None


@pytest.mark.parametrize(
    ("banks_matching", "winner"),
    [
        (("harmless", "doubtful", "known-bad"), "known-bad"),
        (("harmless", "doubtful"), "doubtful"),
        (("harmless",), "harmless"),
    ],
)
def test_the_strictest_action_wins_whatever_the_hash_kind(
    banks_matching: tuple[str, ...], winner: str
) -> None:
    banks = Banks(specs(BAD, DOUBTFUL, HARMLESS))
    sha256, _ = digests(COPY)
    kinds = {"harmless": ("sha256", sha256), "doubtful": ("pdq", ORIGINAL_PDQ.hex)}
    for name in banks_matching:
        kind, value = kinds.get(name, ("pdq", ORIGINAL_PDQ.hex))
        banks.add(BankEntry(name, kind, value, f"{name}-1"))  # type: ignore[arg-type]
    found = look_up(banks, COPY)
    assert found is not None
    assert found.spec.name == winner


def test_among_equally_strict_banks_the_nearest_match_wins() -> None:
    banks = Banks(specs(BAD, BankSpec("also-bad", "block", "O3")))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "far"))
    banks.add(BankEntry("also-bad", "pdq", COPY_PDQ.hex, "near"))
    found = look_up(banks, COPY)
    assert found is not None
    assert (found.entry.entry_id, found.distance, found.spec.category_code) == ("near", 0, "O3")


def test_a_removed_pdq_entry_stops_matching_at_once_before_and_after_a_rebuild() -> None:
    banks = Banks(specs(BAD))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e1"))
    assert banks.remove("known-bad", "pdq", ORIGINAL_PDQ.hex)
    assert look_up(banks, COPY) is None
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e2"))
    banks.rebuild()  # now in the FAISS snapshot, not the pending rows
    assert look_up(banks, COPY).entry.entry_id == "e2"  # type: ignore[union-attr]
    assert banks.remove("known-bad", "pdq", ORIGINAL_PDQ.hex)
    assert look_up(banks, COPY) is None
    assert not banks.remove("known-bad", "pdq", ORIGINAL_PDQ.hex)
    assert banks.counts() == {"known-bad": 0}


def test_counts_name_every_bank_and_a_replaced_entry_counts_once() -> None:
    banks = Banks(specs(BAD, HARMLESS))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e1"))
    banks.add(BankEntry("known-bad", "pdq", ORIGINAL_PDQ.hex, "e1-renamed", "new note"))
    assert banks.counts() == {"known-bad": 1, "harmless": 0}
    assert look_up(banks, COPY).entry.entry_id == "e1-renamed"  # type: ignore[union-attr]


def test_an_entry_for_an_unknown_bank_or_a_malformed_hash_cannot_be_made() -> None:
    banks = Banks(specs(BAD))
    with pytest.raises(KeyError):
        banks.add(BankEntry("nope", "md5", "0" * 32, "e1"))
    for kind, value in [("md5", "0" * 64), ("sha256", "A" * 64), ("crc32", "0" * 8)]:
        with pytest.raises(ValueError, match="hash"):
            BankEntry("known-bad", kind, value, "e1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "action", "category", "threshold"),
    [
        ("Known-Bad", "block", "O2", 31),
        ("a/b", "block", "O2", 31),
        ("ok", "delete", "O2", 31),
        ("ok", "block", "", 31),
        ("ok", "block", "O2", 257),
    ],
)
def test_a_bank_spec_out_of_its_rules_is_refused(
    name: str, action: str, category: str, threshold: int
) -> None:
    with pytest.raises(ValueError, match=r"bank name|action|category|pdq_threshold"):
        BankSpec(name, action, category, threshold)  # type: ignore[arg-type]


def record(**fields: object) -> bytes:
    return json.dumps({"entry_id": "e1", **fields}).encode()


def test_a_topic_record_adds_replaces_and_a_tombstone_removes() -> None:
    banks = Banks(specs(BAD))
    key = entry_key("known-bad", "pdq", ORIGINAL_PDQ.hex)
    assert banks.apply(key, record(note="seen", added_by="r-1", added_at=None), "b[0]@0")
    assert banks.apply(key, record(entry_id="e2"), "b[0]@1")
    assert look_up(banks, COPY).entry.entry_id == "e2"  # type: ignore[union-attr]
    assert banks.apply(key, None, "b[0]@2")
    assert look_up(banks, COPY) is None
    assert banks.apply(key, None, "b[0]@3")  # removing what is not there changes nothing
    assert banks.counts() == {"known-bad": 0}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (b"other-bank/pdq/" + b"0" * 64, record(), "unknown bank"),
        (b"known-bad/crc32/00000000", record(), "hash kind"),
        (b"known-bad/md5/" + b"0" * 64, record(), "md5 hash is 32"),
        (b"known-bad/sha256/" + b"G" * 64, record(), "sha256 hash is 64"),
        (b"known-bad/md5", record(), "not <bank>/<kind>/<value>"),
        (b"known-bad/md5/" + b"0" * 32 + b"/x", record(), "not <bank>/<kind>/<value>"),
        (b"\xff\xfe", record(), "not UTF-8"),
        (b"known-bad/md5/" + b"0" * 32, b"{", "invalid bank entry"),
        (b"known-bad/md5/" + b"0" * 32, b"[]", "invalid bank entry"),
        (b"known-bad/md5/" + b"0" * 32, b'{"note": "x"}', "entry_id: Field required"),
        (b"known-bad/md5/" + b"0" * 32, record(entry_id=""), "entry_id"),
        (b"known-bad/md5/" + b"0" * 32, record(note="x" * 2001), "note"),
        (b"known-bad/md5/" + b"0" * 32, record(severity=3), "severity: Extra inputs"),
        (b"known-bad/md5/" + b"0" * 32, record(added_at="yesterday"), "added_at"),
    ],
)
def test_a_topic_record_that_is_not_an_entry_is_refused_with_its_position(
    key: bytes, value: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    banks = Banks(specs(BAD))
    banks.add(BankEntry("known-bad", "md5", "f" * 32, "standing"))
    with caplog.at_level(logging.WARNING):
        assert not banks.apply(key, value, "guardstream.banks[1]@17")
    assert "guardstream.banks[1]@17" in caplog.text
    assert message in caplog.text
    assert banks.counts() == {"known-bad": 1}


def test_matching_from_threads_while_entries_change_never_misses_a_standing_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PdqIndex, "pending_limit", 16)  # rebuild often: swaps under the readers
    monkeypatch.setattr(PdqIndex, "removed_limit", 16)
    banks = Banks(specs(BAD, DOUBTFUL))
    banks.add(BankEntry("doubtful", "pdq", ORIGINAL_PDQ.hex, "standing"))
    sha256, md5 = digests(COPY)
    done = threading.Event()
    failures: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                found = banks.match(sha256, md5, COPY_PDQ)
            except Exception as exc:  # a thread's failure must reach the test
                failures.append(repr(exc))
                return
            if found is None or found.spec.name not in ("doubtful", "known-bad"):
                failures.append(f"standing entry missed: {found}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    rng = random.Random(7)
    added = []
    for n in range(3000):
        value = f"{rng.getrandbits(256):064x}"
        banks.add(BankEntry("known-bad", "pdq", value, f"r{n}"))
        added.append(value)
        if n % 3 == 0:
            banks.remove("known-bad", "pdq", added.pop(0))
    done.set()
    for thread in threads:
        thread.join()
    assert failures == []
    banks.remove("doubtful", "pdq", ORIGINAL_PDQ.hex)
    assert banks.match(sha256, md5, COPY_PDQ) is None  # removal counts at once
    banks.rebuild()
    assert banks.counts() == {"known-bad": 2000, "doubtful": 0}
    assert banks.match(sha256, md5, COPY_PDQ) is None
