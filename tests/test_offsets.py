"""Offset tracker: never commits past an unfinished record; commits everything eventually."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.offsets import OffsetTracker, PartitionOffsets


def test_commit_point_waits_for_the_gap() -> None:
    part = PartitionOffsets()
    for offset in (10, 11, 12):
        part.track(offset)
    part.finish(11)
    part.finish(12)
    assert part.commit_point() == 10
    part.finish(10)
    assert part.commit_point() == 13
    assert part.in_flight == 0


def test_offsets_must_increase() -> None:
    part = PartitionOffsets()
    part.track(5)
    with pytest.raises(ValueError, match="not after"):
        part.track(5)


def test_revoked_tickets_are_inert() -> None:
    tracker = OffsetTracker()
    tracker.assign("p0")
    old = tracker.track("p0", 0)
    tracker.revoke("p0")
    tracker.assign("p0")
    tracker.track("p0", 0)
    tracker.finish(old)  # from before the revocation: must not finish the new record
    assert tracker.due_commits().get("p0", 0) == 0
    assert tracker.in_flight("p0") == 1


def test_due_commits_only_when_moved() -> None:
    tracker = OffsetTracker()
    ticket = tracker.track("p0", 0)
    tracker.finish(ticket)
    assert tracker.due_commits() == {"p0": 1}
    tracker.mark_committed({"p0": 1})
    assert tracker.due_commits() == {}


@given(
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60).flatmap(
        lambda gaps: st.tuples(st.just(gaps), st.permutations(range(len(gaps))))
    )
)
def test_random_completion_orders(case: tuple[list[int], list[int]]) -> None:
    gaps, order = case
    offsets = []
    position = 0
    for gap in gaps:  # offsets with gaps, as after compaction
        position += gap
        offsets.append(position)
    tracker = OffsetTracker()
    tickets = [tracker.track("p", off) for off in offsets]
    finished: set[int] = set()
    for index in order:
        tracker.finish(tickets[index])
        finished.add(offsets[index])
        point = tracker.due_commits().get("p")
        if point is not None:
            tracker.mark_committed({"p": point})
            # Everything below the commit point is finished.
            assert all(off in finished for off in offsets if off < point)
            unfinished = [off for off in offsets if off not in finished]
            if unfinished:
                assert point <= min(unfinished)
    assert tracker.in_flight() == 0
    final = tracker.due_commits().get("p")
    last_committed = final if final is not None else None
    part_point = tracker._partitions["p"].commit_point()  # check the final state
    assert part_point == offsets[-1] + 1
    assert last_committed in (None, offsets[-1] + 1)


@given(
    st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=40).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes),
            st.lists(st.integers(min_value=0, max_value=len(sizes) - 1), max_size=80),
        )
    )
)
def test_in_flight_bytes_count_each_unfinished_record_once(
    case: tuple[list[int], list[int]],
) -> None:
    sizes, finishes = case  # finishes may repeat: finishing is idempotent
    tracker = OffsetTracker()
    tickets = [tracker.track("p", offset, size) for offset, size in enumerate(sizes)]
    done: set[int] = set()
    for index in finishes:
        tracker.finish(tickets[index])
        done.add(index)
        unfinished = [i for i in range(len(sizes)) if i not in done]
        assert tracker.in_flight("p") == len(unfinished)
        assert tracker.in_flight_bytes("p") == sum(sizes[i] for i in unfinished)


@given(
    st.lists(
        st.tuples(st.sampled_from(["park", "unpark", "finish"]), st.integers(0, 19)),
        max_size=120,
    )
)
def test_parked_records_hold_the_commit_but_not_the_memory_bounds(
    steps: list[tuple[str, int]],
) -> None:
    tracker = OffsetTracker()
    tickets = [tracker.track("p", offset, 100) for offset in range(20)]
    parked: set[int] = set()
    done: set[int] = set()
    for action, index in steps:
        ticket = tickets[index]
        if action == "park":
            tracker.park(ticket)
            if index not in done:
                parked.add(index)
        elif action == "unpark":
            assert tracker.unpark(ticket, 100) == (index in parked)
            parked.discard(index)
        else:
            tracker.finish(ticket)
            done.add(index)
            parked.discard(index)
        held = [i for i in range(20) if i not in done and i not in parked]
        assert tracker.in_flight("p") == len(held)
        assert tracker.in_flight_bytes("p") == 100 * len(held)
        unfinished = [i for i in range(20) if i not in done]
        assert tracker.commit_point("p") == (min(unfinished) if unfinished else 20)


def test_a_revoked_partitions_parked_ticket_is_not_read_again() -> None:
    tracker = OffsetTracker()
    ticket = tracker.track("p", 0, 10)
    tracker.park(ticket)
    tracker.revoke("p")
    tracker.assign("p")
    assert not tracker.live(ticket)
    assert not tracker.unpark(ticket, 10)
