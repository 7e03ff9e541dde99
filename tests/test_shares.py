"""Cluster-wide quota shares from the replicas' demand reports (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.control import DemandReport, parse_control
from gateway.records import admin_record
from gateway.shares import Demand, ShareBook, Shares


def book(replica: str = "a") -> ShareBook:
    return ShareBook(replica, peer_timeout_s=3.0, floor=0.05)


def test_alone_a_replica_has_the_whole_quota() -> None:
    assert book().shares({"t": Demand(10, 2)}, ["t"], 0.0) == {"t": Shares(1.0, 1.0)}


def test_all_of_a_tenants_work_on_one_replica_gets_all_of_its_quota() -> None:
    # Records keyed by tenant land in one partition, so on one replica.
    owner, idle = book("a"), book("b")
    owner.observe("b", 0.0, {})
    idle.observe("a", 0.0, {"t": Demand(500, 4)})
    assert owner.shares({"t": Demand(500, 4)}, ["t"], 1.0)["t"] == Shares(1.0, 1.0)
    assert idle.shares({}, ["t"], 1.0)["t"] == Shares(0.0, 0.0)


def test_shares_follow_where_the_backlog_is() -> None:
    mine = book("a")
    mine.observe("b", 0.0, {"t": Demand(90, 8)})
    shares = mine.shares({"t": Demand(10, 2)}, ["t"], 1.0)["t"]
    assert shares.rate == pytest.approx(0.1)
    assert shares.concurrency == pytest.approx(12 / 110)


def test_work_that_just_arrived_gets_the_floor() -> None:
    mine = book("a")
    mine.observe("b", 0.0, {"t": Demand(10_000, 8)})
    assert mine.shares({"t": Demand(1, 0)}, ["t"], 1.0)["t"].rate == 0.05


def test_a_peer_that_stops_reporting_drops_out() -> None:
    mine = book("a")
    mine.observe("b", 0.0, {"t": Demand(10, 0)})
    assert mine.peers(2.0) == ["b"]
    assert mine.even(2.0) == Shares(0.5, 0.5)
    assert mine.shares({"t": Demand(10, 0)}, ["t"], 5.0)["t"] == Shares(1.0, 1.0)
    mine.forget_stale(5.0)
    assert mine.peers(5.0) == []


def test_own_and_older_reports_are_ignored() -> None:
    mine = book("a")
    mine.observe("a", 0.0, {"t": Demand(99, 0)})
    mine.observe("b", 2.0, {"t": Demand(1, 0)})
    mine.observe("b", 1.0, {"t": Demand(99, 0)})  # arrives late, is older
    assert mine.shares({"t": Demand(1, 0)}, ["t"], 2.5)["t"].rate == pytest.approx(0.5)


@given(
    demands=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), min_size=1, max_size=5)
)
def test_property_rate_shares_sum_to_one_where_there_is_a_backlog(
    demands: list[tuple[int, int]],
) -> None:
    books = [ShareBook(f"r{i}", peer_timeout_s=3.0, floor=0.0) for i in range(len(demands))]
    for i, peer_book in enumerate(books):
        for j, (waiting, running) in enumerate(demands):
            if i != j:
                peer_book.observe(f"r{j}", 0.0, {"t": Demand(waiting, running)})
    shares = [
        peer_book.shares({"t": Demand(*demands[i])}, ["t"], 1.0)["t"]
        for i, peer_book in enumerate(books)
    ]
    assert sum(s.rate for s in shares) == pytest.approx(1.0)
    assert sum(s.concurrency for s in shares) == pytest.approx(1.0)


def _cluster(demands: list[tuple[int, int]], floor: float, cap: int) -> list[Shares]:
    """Every replica's shares of tenant `t`, each computed from the others' reports."""
    books = [ShareBook(f"r{i}", peer_timeout_s=3.0, floor=floor) for i in range(len(demands))]
    for i, peer_book in enumerate(books):
        for j, (waiting, running) in enumerate(demands):
            if i != j:
                peer_book.observe(f"r{j}", 0.0, {"t": Demand(waiting, running)})
    return [
        peer_book.shares({"t": Demand(*demands[i])}, ["t"], 1.0, slots={"t": cap})["t"]
        for i, peer_book in enumerate(books)
    ]


def test_a_skewed_backlog_splits_whole_slots_that_add_up_to_the_quota() -> None:
    # 90% of a tenant's records on one replica, 5% on each of two others: the floors of
    # the small ones come out of the big one's share, and the slots add up to 6 (not
    # 6 + 1 + 1, one rounded up per replica).
    shares = _cluster([(900, 0), (50, 0), (50, 0)], floor=0.05, cap=6)
    assert [s.slots for s in shares] == [4, 1, 1]
    assert sum(s.rate for s in shares) == pytest.approx(1.0)
    assert [s.rate for s in shares] == pytest.approx([0.9, 0.05, 0.05])
    tiny = _cluster([(10_000, 0), (1, 0), (1, 0)], floor=0.05, cap=6)
    assert [s.rate for s in tiny] == pytest.approx([0.9, 0.05, 0.05])  # floors, from r0


@given(
    demands=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), min_size=1, max_size=6),
    cap=st.integers(1, 64),
    floor=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_property_floors_and_slots_keep_the_cluster_within_the_quota(
    demands: list[tuple[int, int]], cap: int, floor: float
) -> None:
    shares = _cluster(demands, floor=floor, cap=cap)
    if any(waiting for waiting, _ in demands):
        assert sum(s.rate for s in shares) == pytest.approx(1.0)
    busy = [s for s, (waiting, running) in zip(shares, demands, strict=True) if waiting + running]
    if len(demands) == 1 or not busy:
        return  # alone: the whole quota; nobody busy: an even split
    slots = [s.slots for s in busy]
    assert all(n is not None and n >= 1 for n in slots)
    # Whole slots add up to the quota, unless more replicas are busy than it has slots
    # (each still gets one, so that its work can start).
    assert sum(n or 0 for n in slots) == max(cap, len(busy))
    idle = [
        s for s, (waiting, running) in zip(shares, demands, strict=True) if not waiting + running
    ]
    assert all(s.slots is None for s in idle)


def test_demand_reports_round_trip_through_jobs_control() -> None:
    record = admin_record(
        "jobs.control",
        op="demand",
        tenant="-",
        at=1_800_000_000.5,
        by="gateway",
        replica="host-1",
        demand={"acme": [3, 2, 7]},
    )
    assert record.key == b"demand:host-1"
    parsed = parse_control(record.value, record.headers, 0)
    assert parsed == DemandReport("host-1", 1_800_000_000.5, {"acme": Demand(3, 2, 7)})
