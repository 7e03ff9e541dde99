"""Token bucket and fair scheduler: limits hold, shares follow weights, newcomers wait little."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.intake import _over_bound
from gateway.quotas import TokenBucket
from gateway.scheduler import FairScheduler, TenantLimits


def limits(**overrides: float) -> TenantLimits:
    base = {
        "max_concurrency": 1000,
        "rate_per_s": 1e9,
        "burst": 10**9,
        "max_queued": 10**6,
        "weight": 1,
    }
    base.update(overrides)
    return TenantLimits(**base)  # type: ignore[arg-type]


@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=100),
    steps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_bucket_never_exceeds_rate_plus_burst(rate: float, burst: int, steps: list[float]) -> None:
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    taken = 0
    for step in steps:
        now += step
        while bucket.try_take(now):
            taken += 1
    assert taken <= burst + rate * now + 1e-6


def test_bucket_wait_is_exact() -> None:
    bucket = TokenBucket(10.0, 1, 0.0)
    assert bucket.try_take(0.0)
    assert abs(bucket.wait_s(0.0) - 0.1) < 1e-9
    assert not bucket.try_take(0.05)
    assert bucket.try_take(0.1)


@settings(max_examples=50, deadline=None)
@given(
    slots=st.integers(min_value=1, max_value=20),
    tenants=st.lists(
        st.tuples(st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=8)),
        min_size=1,
        max_size=5,
    ),
    ops=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=300),
)
def test_concurrency_never_exceeded(
    slots: int, tenants: list[tuple[int, int]], ops: list[int]
) -> None:
    scheduler: FairScheduler[int] = FairScheduler(slots)
    for index, (weight, conc) in enumerate(tenants):
        scheduler.configure(f"t{index}", limits(weight=weight, max_concurrency=conc), 0.0)
    running: list[str] = []
    for op in ops:
        tenant = f"t{op % len(tenants)}"
        if op % 3 == 0 and running:
            scheduler.release(running.pop(op % len(running)))
        else:
            scheduler.push(tenant, op)
        while (picked := scheduler.pop(0.0)) is not None:
            running.append(picked[0])
        assert len(running) <= slots
        per_tenant = Counter(running)
        for index, (_, conc) in enumerate(tenants):
            assert per_tenant[f"t{index}"] <= conc


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=5))
def test_long_run_shares_follow_weights(weights: list[int]) -> None:
    scheduler: FairScheduler[int] = FairScheduler(4)
    for index, weight in enumerate(weights):
        scheduler.configure(f"t{index}", limits(weight=weight), 0.0)
        for item in range(20_000):
            scheduler.push(f"t{index}", item)
    started: Counter[str] = Counter()
    running: list[str] = []
    for step in range(6_000):
        while (picked := scheduler.pop(0.0)) is not None:
            running.append(picked[0])
            started[picked[0]] += 1
        scheduler.release(running.pop(step % len(running)))
    total = sum(started.values())
    for index, weight in enumerate(weights):
        expected = weight / sum(weights)
        assert abs(started[f"t{index}"] / total - expected) <= 0.05 * expected + 1e-3


def test_new_tenant_waits_at_most_one_round() -> None:
    scheduler: FairScheduler[int] = FairScheduler(2)
    scheduler.configure("noisy", limits(weight=5), 0.0)
    scheduler.configure("quiet", limits(weight=1), 0.0)
    for item in range(10_000):
        scheduler.push("noisy", item)
    running = []
    for _ in range(500):  # the noisy tenant runs alone for a while
        while (picked := scheduler.pop(0.0)) is not None:
            running.append(picked[0])
        scheduler.release(running.pop(0))
    scheduler.push("quiet", -1)
    picks = []
    for _ in range(3):
        while (picked := scheduler.pop(0.0)) is not None:
            picks.append(picked)
            running.append(picked[0])
        scheduler.release(running.pop(0))
    assert ("quiet", -1) in picks[:2]


def test_rate_limited_tenant_is_skipped_not_blocking() -> None:
    scheduler: FairScheduler[int] = FairScheduler(10)
    scheduler.configure("slow", limits(rate_per_s=1.0, burst=1), 0.0)
    scheduler.configure("fast", limits(), 0.0)
    for item in range(5):
        scheduler.push("slow", item)
        scheduler.push("fast", item)
    picked = [scheduler.pop(0.0) for _ in range(6)]
    tenants = Counter(p[0] for p in picked if p is not None)
    assert tenants == {"slow": 1, "fast": 5}
    wake = scheduler.next_wakeup_s(0.0)
    assert wake is not None
    assert abs(wake - 1.0) < 1e-9


def test_a_raised_rate_applies_to_a_tenant_already_waiting_for_a_token() -> None:
    # A replica whose share of the rate fell to the floor (a peer held the backlog) has
    # its next token due in minutes; when its share rises again the wait follows the
    # new rate, instead of holding the tenant's buffer until the old due time.
    scheduler: FairScheduler[int] = FairScheduler(10)
    scheduler.configure("t", limits(rate_per_s=1e-3, burst=1), 0.0)
    for item in range(3):
        scheduler.push("t", item)
    assert scheduler.pop(0.0) == ("t", 0)
    assert scheduler.pop(0.0) is None
    assert scheduler.next_wakeup_s(0.0) == pytest.approx(1000.0)
    scheduler.configure("t", limits(rate_per_s=100.0, burst=5), 0.01)
    assert scheduler.pop(0.01) is None  # no token earned yet at the old rate
    wake = scheduler.next_wakeup_s(0.01)
    assert wake is not None
    assert wake <= 0.01 + 1e-9
    assert scheduler.pop(0.02) == ("t", 1)


def test_full_buffer_overflows() -> None:
    scheduler: FairScheduler[int] = FairScheduler(1)
    scheduler.configure("t", limits(max_queued=2), 0.0)
    assert scheduler.push("t", 1)
    assert scheduler.push("t", 2)
    assert not scheduler.push("t", 3)


def test_due_delayed_jobs_wait_in_order_behind_a_full_buffer() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=10)
    scheduler.configure("t", limits(max_queued=2), 0.0)
    assert scheduler.push("t", 1)
    assert scheduler.push("t", 2)
    assert scheduler.push("t", 3, may_wait=True)
    assert scheduler.push("t", 4, may_wait=True)
    # A fresh job may not overtake the waiting line, even once the buffer has room.
    assert not scheduler.push("t", 5)
    assert scheduler.waiting == 2
    started = [picked[1] for _ in range(4) if (picked := scheduler.pop(0.0)) is not None]
    assert started == [1, 2, 3, 4]
    assert scheduler.waiting == 0
    assert scheduler.push("t", 5)


def test_removing_from_the_buffer_moves_waiting_jobs_up() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=10)
    scheduler.configure("t", limits(max_queued=2), 0.0)
    for item in (1, 2):
        scheduler.push("t", item)
    for item in (3, 4):
        scheduler.push("t", item, may_wait=True)
    assert scheduler.remove(lambda item: item == 1) == [1]
    queue = scheduler.tenant("t")
    assert queue is not None
    assert (list(queue.items), [i for i, _ in queue.waiting], scheduler.waiting) == ([2, 3], [4], 1)


def test_throttled_counts_starts_the_bucket_held_back() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=100)
    scheduler.configure("a", limits(rate_per_s=10, burst=2), now=0.0)
    for item in range(4):
        scheduler.push("a", item)
    assert scheduler.pop(0.0) is not None
    assert scheduler.pop(0.0) is not None
    assert scheduler.pop(0.0) is None  # bucket empty: held back
    assert scheduler.pop(0.1) is not None  # one token later
    queue = scheduler.tenant("a")
    assert queue is not None
    assert (queue.started, queue.throttled) == (3, 1)
    scheduler.release("a")
    assert (queue.running, queue.completed) == (2, 1)


def test_waiting_line_is_capped_at_the_buffer_size() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=10)
    scheduler.configure("t", limits(max_queued=2), 0.0)
    for item in (1, 2):
        assert scheduler.push("t", item)
    assert scheduler.push("t", 3, may_wait=True)
    assert scheduler.push("t", 4, may_wait=True)
    # Past `max_queued` waiting, a due record goes back to the broker (the caller
    # defers it again) instead of holding its partition in memory.
    assert not scheduler.push("t", 5, may_wait=True)
    assert scheduler.waiting == 2


def test_raising_the_buffer_size_moves_waiting_jobs_up_at_once() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=10)
    scheduler.configure("t", limits(max_queued=1), 0.0)
    scheduler.push("t", 1)
    scheduler.push("t", 2, may_wait=True)
    scheduler.configure("t", limits(max_queued=5), 0.0)
    queue = scheduler.tenant("t")
    assert queue is not None
    assert (list(queue.items), [i for i, _ in queue.waiting], scheduler.waiting) == ([1, 2], [], 0)
    assert scheduler.push("t", 3)  # a fresh job no longer waits behind anyone


def test_deferrals_are_booked_one_start_apart_after_the_buffer() -> None:
    scheduler: FairScheduler[int] = FairScheduler(10)
    scheduler.configure("t", TenantLimits(4, 10.0, 1, 2, 1), now=0.0)
    assert scheduler.push("t", 1)
    assert scheduler.push("t", 2)
    # Two buffered at 10/s: the buffer is worked off by 0.2 s; deferrals follow it.
    delays = [scheduler.book_deferral("t", now=0.0) for _ in range(3)]
    assert delays == pytest.approx([0.3, 0.4, 0.5])
    assert scheduler.deferred("t", now=0.0) == 3
    # Time alone brings the horizon back: nobody needs to report a return.
    assert scheduler.deferred("t", now=0.45) == 0
    assert scheduler.book_deferral("t", now=10.0) == pytest.approx(0.3)


def test_deferral_pace_is_bound_by_slots_when_the_rate_is_not() -> None:
    scheduler: FairScheduler[int] = FairScheduler(10)
    # 1 slot held at least MIN_SLOT_HOLD_S (20 ms): at most 50 starts/s, not 10,000.
    scheduler.configure("t", TenantLimits(1, 10_000.0, 1, 1, 1), now=0.0)
    assert scheduler.book_deferral("t", now=0.0) == pytest.approx(0.05)  # the floor
    for _ in range(49):
        scheduler.book_deferral("t", now=0.0)
    assert scheduler.book_deferral("t", now=0.0) == pytest.approx(51 * 0.02)


@pytest.mark.parametrize(
    ("paused", "count", "size", "expected"),
    [
        (False, 99, 10, False),
        (False, 100, 10, True),  # the count reaches the bound
        (False, 10, 1000, True),  # or the bytes do
        (True, 81, 10, True),  # once over, it stays over above 80% of either
        (True, 10, 801, True),
        (True, 79, 799, False),  # both back under 80%: resume
    ],
)
def test_memory_bound_hysteresis(paused: bool, count: int, size: int, expected: bool) -> None:
    assert _over_bound(paused, count, size, 100, 1000) is expected


def test_higher_priority_starts_first_within_a_tenant_only() -> None:
    scheduler: FairScheduler[str] = FairScheduler(total_slots=1)
    scheduler.configure("busy", limits(), 0.0)
    scheduler.configure("other", limits(), 0.0)
    for n in range(1000):
        scheduler.push("busy", f"b{n}", priority=5)
    scheduler.push("busy", "urgent", priority=9)
    scheduler.push("other", "o1", priority=0)
    first = scheduler.pop(0.0)
    assert first is not None
    scheduler.release(first[0])
    second = scheduler.pop(0.0)
    assert second is not None
    # The urgent job jumps its own tenant's line, not the other tenant's turn.
    assert {first[1], second[1]} == {"urgent", "o1"}


def test_a_paused_tenant_starts_nothing_and_hands_back_its_buffer() -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=10)
    scheduler.configure("p", limits(max_queued=2), 0.0)
    scheduler.configure("q", limits(), 0.0)
    for item in (1, 2):
        scheduler.push("p", item)
    scheduler.push("p", 3, may_wait=True)
    scheduler.push("q", 10)
    assert sorted(scheduler.pause("p")) == [1, 2, 3]
    assert scheduler.paused("p")
    scheduler.push("p", 4)
    assert scheduler.pop(0.0) == ("q", 10)
    assert scheduler.pop(0.0) is None
    scheduler.resume("p")
    assert scheduler.pop(0.0) == ("p", 4)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "release", "pause", "resume", "tick", "limits"]),
            st.integers(min_value=0, max_value=3),
            st.integers(min_value=0, max_value=9),
        ),
        max_size=250,
    )
)
def test_property_the_heap_picks_the_smallest_pass_among_eligible_tenants(
    ops: list[tuple[str, int, int]],
) -> None:
    scheduler: FairScheduler[int] = FairScheduler(total_slots=4)
    names = [f"t{i}" for i in range(4)]
    for index, name in enumerate(names):
        scheduler.configure(
            name, limits(max_concurrency=2, rate_per_s=5.0 + index, burst=2, weight=index + 1), 0.0
        )
    now = 0.0
    running: list[str] = []
    for op, who, value in ops:
        name = names[who]
        queue = scheduler.tenant(name)
        assert queue is not None
        if op == "push":
            scheduler.push(name, value, priority=value)
        elif op == "release" and name in running:
            running.remove(name)
            scheduler.release(name)
        elif op == "pause":
            scheduler.pause(name)
        elif op == "resume":
            scheduler.resume(name)
        elif op == "tick":
            now += value / 10
        elif op == "limits":
            scheduler.configure(
                name, limits(max_concurrency=1 + value % 3, weight=1 + value % 4), now
            )
        elif op == "pop":
            eligible = {
                n: q.passed
                for n, q in scheduler.tenants()
                if q.items
                and not q.paused
                and q.running < q.limits.max_concurrency
                and q.bucket.available(now) >= 1.0
            }
            picked = scheduler.pop(now)
            if not eligible or len(running) >= 4:
                assert picked is None
                continue
            assert picked is not None
            assert eligible[picked[0]] == min(eligible.values())
            running.append(picked[0])
        assert scheduler.running == len(running)


def flood_and_quiet(total_slots: int) -> FairScheduler[str]:
    """Tenant `flood` with 50 jobs buffered, and tenant `quiet` with none yet."""
    scheduler: FairScheduler[str] = FairScheduler(total_slots=total_slots)
    scheduler.configure("flood", limits(), 0.0)
    scheduler.configure("quiet", limits(), 0.0)
    for n in range(50):
        scheduler.push("flood", f"f{n}")
    return scheduler


def test_under_a_cap_only_a_tenant_with_nothing_running_starts() -> None:
    scheduler = flood_and_quiet(total_slots=10)
    started = [scheduler.pop(0.0) for _ in range(4)]
    assert all(s is not None and s[0] == "flood" for s in started)
    scheduler.total_slots = 3  # the loop guard's cap, below what runs
    assert scheduler.pop(0.0) is None  # the flood's backlog waits
    scheduler.push("quiet", "q1")
    scheduler.push("quiet", "q2")
    assert scheduler.pop(0.0) == ("quiet", "q1")  # its first job starts past the cap
    assert scheduler.pop(0.0) is None  # its second waits like any backlog
    for _ in range(3):
        scheduler.release("flood")
    assert scheduler.running == 2  # one flood job and q1
    picked = {scheduler.pop(0.0) for _ in range(2)} - {None}
    assert len(picked) == 1  # one slot under the cap of 3: fair order decides whose
    assert scheduler.pop(0.0) is None
    scheduler.total_slots = 10  # the cap lifted: the backlogs start again
    assert scheduler.pop(0.0) is not None


def test_the_hard_limit_holds_even_for_a_tenant_with_nothing_running() -> None:
    scheduler: FairScheduler[str] = FairScheduler(total_slots=2)
    scheduler.configure("a", limits(), 0.0)
    scheduler.configure("b", limits(), 0.0)
    scheduler.push("a", "a1")
    scheduler.push("a", "a2")
    assert scheduler.pop(0.0) is not None
    assert scheduler.pop(0.0) is not None
    scheduler.push("b", "b1")
    assert scheduler.pop(0.0) is None  # max_inflight is never exceeded


def test_under_a_pace_backlogs_start_at_its_rate_and_a_new_tenant_at_once() -> None:
    scheduler = flood_and_quiet(total_slots=100)
    assert scheduler.pop(0.0) is not None  # the flood's first job: nothing ran yet
    scheduler.pace = TokenBucket(10.0, 1, 0.0)  # the loop guard's pace: 10 starts a second
    assert scheduler.pop(0.0) is not None  # its one token
    assert scheduler.pop(0.0) is None  # the backlog waits for the next token...
    assert scheduler.next_wakeup_s(0.0) == pytest.approx(0.1)  # ...which it is woken for
    scheduler.push("quiet", "q1")
    assert scheduler.pop(0.0) == ("quiet", "q1")  # a tenant with nothing running: at once
    starts = 0
    for step in range(1, 106):  # 1.05 s in 10 ms steps
        while scheduler.pop(step / 100) is not None:
            starts += 1
    # 10 a second; a bucket of one token, looked at every 10 ms, loses what it earns past
    # the token while it waits for the next look
    assert 9 <= starts <= 10
    scheduler.pace = None
    assert scheduler.pop(1.0) is not None
