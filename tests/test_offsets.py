"""The committable offset never passes a record whose outcome is not yet acknowledged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.adapters.kafka.offsets import PartitionOffsets


def test_nothing_is_committable_before_the_first_record_finishes() -> None:
    offsets = PartitionOffsets()
    offsets.take(5)
    offsets.take(6)
    assert offsets.committable() is None
    offsets.finish(6)
    assert offsets.committable() is None
    assert offsets.in_flight == 2


def test_commit_position_is_one_past_the_contiguous_finished_prefix() -> None:
    offsets = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        offsets.take(offset)
    offsets.finish(10)
    offsets.finish(12)
    assert offsets.committable() == 11
    offsets.finish(11)
    assert offsets.committable() == 13
    offsets.finish(13)
    assert offsets.committable() == 14
    assert offsets.in_flight == 0


def test_gaps_in_offsets_from_compaction_or_transaction_markers_are_not_waited_for() -> None:
    offsets = PartitionOffsets()
    for offset in (3, 7, 8):
        offsets.take(offset)
    offsets.finish(7)
    offsets.finish(3)
    assert offsets.committable() == 8
    offsets.finish(8)
    assert offsets.committable() == 9


def test_offsets_must_be_taken_in_increasing_order() -> None:
    offsets = PartitionOffsets()
    assert offsets.is_new(0)
    offsets.take(4)
    assert not offsets.is_new(4)
    with pytest.raises(ValueError, match="offset 4 is not after"):
        offsets.take(4)
    offsets.finish(4)
    assert not offsets.is_new(2)  # also once nothing is in flight
    assert offsets.is_new(5)
    with pytest.raises(ValueError, match="offset 2 is not after"):
        offsets.take(2)


@given(
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60),
    st.data(),
)
def test_committable_is_always_the_first_unfinished_offset(
    steps: list[int], data: st.DataObject
) -> None:
    offsets = PartitionOffsets()
    taken: list[int] = []
    position = 0
    for step in steps:
        position += step
        offsets.take(position)
        taken.append(position)
    order = data.draw(st.permutations(taken))
    finished: set[int] = set()
    for offset in order:
        offsets.finish(offset)
        finished.add(offset)
        unfinished = [o for o in taken if o not in finished]
        if unfinished:
            earlier = [o for o in taken if o < unfinished[0]]
            expected = earlier[-1] + 1 if earlier else None
        else:
            expected = taken[-1] + 1
        assert offsets.committable() == expected
    assert offsets.in_flight == 0
