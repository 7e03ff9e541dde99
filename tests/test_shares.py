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


# -- rises held back (hold_s) -----------------------------------------------------------

ROUND = 0.5  # the replicas' report interval
HOLD = 2 * ROUND


def held_book(replica: str, floor: float = 0.05) -> ShareBook:
    return ShareBook(replica, peer_timeout_s=3.0, floor=floor, hold_s=HOLD)


def _round(
    books: list[ShareBook],
    now_demand: list[dict[str, Demand]],
    heard_demand: list[dict[str, Demand]],
    at: float,
    cap: int | None = None,
) -> list[Shares]:
    """One round: every replica hears its peers' last reports (`heard_demand`, stamped
    a round ago) and computes its shares of `t` from its own demand now."""
    for i, one in enumerate(books):
        for j, demand in enumerate(heard_demand):
            if i != j:
                one.observe(f"r{j}", at - ROUND, demand)
    slots = {"t": cap} if cap is not None else None
    return [
        one.shares(now_demand[i], ["t"], at, slots=slots).get("t", one.even(at))
        for i, one in enumerate(books)
    ]


def test_a_lone_replica_is_not_held_back() -> None:
    alone = held_book("a")
    assert alone.shares({"t": Demand(10, 0)}, ["t"], 0.0) == {"t": Shares(1.0, 1.0)}


def test_after_a_rebalance_stale_empty_peers_do_not_add_up_to_three_quotas() -> None:
    # A rebalance emptied every buffer (nobody waiting: an even split); then each replica
    # refills from its new partitions and, before the next reports, sees its own backlog
    # beside its peers' empty ones. Unheld, each would take the whole quota.
    empty: list[dict[str, Demand]] = [{}, {}, {}]
    full = [{"t": Demand(300, 0)} for _ in range(3)]
    unheld = [ShareBook(f"r{i}", peer_timeout_s=3.0, floor=0.05) for i in range(3)]
    assert sum(s.rate for s in _round(unheld, full, empty, 1.0)) == pytest.approx(3.0)
    books = [held_book(f"r{i}") for i in range(3)]
    _round(books, empty, empty, 0.5)
    first = _round(books, full, empty, 1.0)
    assert [s.rate for s in first] == pytest.approx([1 / 3] * 3)
    for at in (1.5, 2.0, 2.5):  # the reports have caught up
        assert sum(s.rate for s in _round(books, full, full, at)) == pytest.approx(1.0)


def test_a_held_rise_is_taken_once_it_has_lasted() -> None:
    # The tenant's work moves from r1 to r0 (its records now keyed to r0's partition).
    books = [held_book("r0"), held_book("r1")]
    before: list[dict[str, Demand]] = [{}, {"t": Demand(100, 0)}]
    after: list[dict[str, Demand]] = [{"t": Demand(100, 0)}, {}]
    for at in (0.5, 1.0, 1.5):
        _round(books, before, before, at)
    # Until then the tenant had the even split: its rise to the whole quota was held.
    assert [s.rate for s in _round(books, before, before, 2.0)] == [0.0, 1.0]
    rates = [[s.rate for s in _round(books, after, before, 2.5)]]
    rates.extend([s.rate for s in _round(books, after, after, at)] for at in (3.0, 3.5, 4.0, 4.5))
    # r0 starts at the floor (r1, with nothing left, holds what is harmless to it), then
    # takes the half it computed from r1's last backlog, and the whole quota once that
    # has held for HOLD.
    assert [r[0] for r in rates] == pytest.approx([0.05, 0.05, 0.5, 1.0, 1.0])
    assert [r[1] for r in rates][1:] == [0.0] * 4


def test_a_tenant_that_went_idle_keeps_its_held_share_until_the_even_split_has_held() -> None:
    mine = held_book("a")
    mine.observe("b", 0.0, {"t": Demand(90, 0)})
    assert mine.shares({"t": Demand(10, 0)}, ["t"], 0.0)["t"].rate == pytest.approx(0.1)
    mine.observe("b", 0.5, {})
    assert mine.shares({}, [], 0.5)["t"].rate == pytest.approx(0.1)  # not yet 0.5
    assert mine.shares({}, [], 1.0)["t"].rate == pytest.approx(0.1)
    assert mine.shares({}, [], 2.0) == {}  # even for a whole hold: the pools' default


@given(
    replicas=st.integers(2, 4),
    before=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 20)), min_size=4, max_size=4),
    after=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 20)), min_size=4, max_size=4),
    cap=st.integers(4, 64),
)
def test_property_when_demand_moves_the_held_shares_never_add_up_to_more_than_the_quota(
    replicas: int,
    before: list[tuple[int, int]],
    after: list[tuple[int, int]],
    cap: int,
) -> None:
    # Steady demand `before`, then every replica's changes at once (`after`); reports
    # arrive a round late. Without a floor (work that just arrived takes it on top), the
    # held rate and concurrency shares add up to at most the quota in every round, and
    # settle where the reports say once the rise has held.
    def demand(rows: list[tuple[int, int]]) -> list[dict[str, Demand]]:
        return [{"t": Demand(w, r)} if w + r else {} for w, r in rows[:replicas]]

    books = [held_book(f"r{i}", floor=0.0) for i in range(replicas)]
    old, new = demand(before), demand(after)
    at = 0.5
    for _ in range(4):
        _round(books, old, old, at, cap)
        at += ROUND
    heard = old
    for _ in range(6):
        shares = _round(books, new, heard, at, cap)
        heard = new
        at += ROUND
        if any(new):
            assert sum(s.rate for s in shares) <= 1.0 + 1e-9
            assert sum(s.concurrency for s in shares) <= 1.0 + 1e-9
    steady = [ShareBook(f"r{i}", peer_timeout_s=3.0, floor=0.0) for i in range(replicas)]
    settled = _round(steady, new, new, at, cap)
    assert [s.rate for s in shares] == pytest.approx([s.rate for s in settled])
