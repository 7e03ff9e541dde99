"""The adaptive cap on running jobs: the controller alone, then driven by a real loop."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.catalog import Catalog
from gateway.loadguard import LoopSample, SlotGuard
from gateway.pools import Pools
from gateway.settings import LoopGuardSettings, Settings
from gateway.tasks import Supervisor

from conftest import wait_for

SATURATED = LoopSample(lag_s=0.05, busy=1.0)
IDLE = LoopSample(lag_s=0.0005, busy=0.1)


def guard(max_slots: int = 64, min_slots: int = 4) -> SlotGuard:
    return SlotGuard(max_slots, min_slots=min_slots, lag_target_s=0.01, busy_threshold=0.8)


def test_a_saturated_loop_cuts_the_cap_from_what_runs_once_per_cooldown() -> None:
    slots = guard()
    now = 0.0
    while slots.observe(SATURATED, running=40, now=now) == 64:
        assert not slots.saturated  # the smoothed figures take a few samples to get there
        now += 0.025
        assert now < 0.25
    assert slots.saturated
    assert slots.limit == 32  # 0.8 of the 40 running, not of max_inflight
    slots.observe(SATURATED, running=32, now=now + 0.1)
    assert slots.limit == 32  # within the cooldown: the cut has not shown yet
    slots.observe(SATURATED, running=32, now=now + 0.3)
    assert slots.limit == 25


def test_the_cap_never_falls_below_min_slots() -> None:
    slots = guard(min_slots=6)
    for n in range(100):
        slots.observe(SATURATED, running=slots.limit, now=n * 0.3)
    assert slots.limit == 6


def test_a_saturated_loop_never_raises_the_cap_even_with_few_jobs_running() -> None:
    slots = guard(min_slots=6)
    for n in range(100):
        slots.observe(SATURATED, running=slots.limit, now=n * 0.3)
    assert slots.limit == 6
    for n in range(20):  # still saturated, every slot in use, too few to cut
        slots.observe(SATURATED, running=6, now=40 + n)
    assert slots.limit == 6


def test_lag_without_a_busy_thread_comes_from_outside_and_moves_nothing() -> None:
    slots = guard()
    for n in range(50):
        slots.observe(LoopSample(lag_s=0.2, busy=0.3), running=64, now=n * 0.3)
    assert not slots.saturated
    assert slots.limit == 64


def test_the_cap_rises_one_slot_per_sample_only_while_it_is_used() -> None:
    slots = guard()
    for n in range(20):
        slots.observe(SATURATED, running=slots.limit, now=n * 0.3)
    low = slots.limit
    for n in range(10):  # the lag decays below the target within a few samples
        slots.observe(IDLE, running=0, now=10 + n)
    assert slots.limit == low  # unused: no reason to grow
    slots.observe(IDLE, running=low, now=30)
    assert slots.limit == low + 1
    for n in range(200):
        slots.observe(IDLE, running=slots.limit, now=31 + n)
    assert slots.limit == 64  # and never past max_inflight


@given(
    st.lists(
        st.tuples(
            st.floats(0, 1, allow_nan=False),
            st.floats(0, 1, allow_nan=False),
            st.integers(0, 300),
        ),
        max_size=200,
    ),
    st.integers(1, 300),
    st.integers(1, 50),
)
def test_the_cap_stays_within_its_bounds(
    samples: list[tuple[float, float, int]], max_slots: int, min_slots: int
) -> None:
    slots = guard(max_slots, min_slots)
    for n, (lag, busy, running) in enumerate(samples):
        limit = slots.observe(LoopSample(lag, busy), running, now=n * 0.1)
        assert min(min_slots, max_slots) <= limit <= max_slots


def _pools() -> Pools:
    settings = Settings(
        max_inflight=64, loop_guard=LoopGuardSettings(enabled=True, min_slots=4, interval_s=0.02)
    )
    return Pools(
        settings=settings,
        catalog=lambda: Catalog(tenants={}, tiers={}),
        runner=None,  # type: ignore[arg-type]  # no job runs here
        recorder=None,  # type: ignore[arg-type]
        supervisor=Supervisor(lambda name, why: None),
    )


async def _spin(seconds: float, step_s: float) -> None:
    """Keep the loop's thread on the CPU for `seconds`, yielding every `step_s`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        until = time.monotonic() + step_s
        while time.monotonic() < until:
            pass
        await asyncio.sleep(0)


async def test_a_saturated_loop_caps_the_slots_and_a_free_one_lifts_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.pools")
    pools = _pools()
    scheduler = pools.scheduler
    await pools.start()
    try:
        scheduler.running = 64  # as if every slot were taken by a flood of short jobs
        deadline = time.monotonic() + 10  # the thread's CPU share is lower on a busy host
        while scheduler.total_slots >= 32 and time.monotonic() < deadline:
            await _spin(0.1, step_s=0.03)
        capped = scheduler.total_slots
        assert capped < 32, f"the cap stayed at {capped} while the loop was saturated"
        assert any(r.message == "job_slots_capped" for r in caplog.records)
        await wait_for(lambda: scheduler.total_slots == 64, timeout_s=10, interval_s=0.05)
    finally:
        scheduler.running = 0
        await pools.stop(0)


async def test_a_loop_blocked_without_cpu_keeps_every_slot() -> None:
    pools = _pools()
    scheduler = pools.scheduler
    await pools.start()
    try:
        scheduler.running = 64
        for _ in range(40):
            time.sleep(0.03)  # noqa: ASYNC251  # late timers, but the thread is off the CPU
            await asyncio.sleep(0)
        assert pools.guard is not None
        assert pools.guard.lag_s > 0.01
        assert scheduler.total_slots == 64
    finally:
        scheduler.running = 0
        await pools.stop(0)


def saturate_at_min_slots(slots: SlotGuard, *, contended: bool, starts: int = 15) -> float:
    """Drive `slots` down to its fewest slots on a saturated loop starting `starts` jobs
    every 25 ms (600 a second); the time reached."""
    now = 0.0
    for _ in range(200):
        running = min(slots.limit, 40)  # the cap is cut from what runs, to min_slots
        slots.observe(SATURATED, running=running, now=now, started=starts, contended=contended)
        now += 0.025
    return now


def test_short_jobs_at_the_fewest_slots_get_their_starts_paced_while_others_wait() -> None:
    slots = guard(min_slots=4)
    now = saturate_at_min_slots(slots, contended=True)
    assert slots.limit == 4
    assert slots.rate is not None
    assert slots.rate < 600 * 0.8  # cut from what started
    paced = slots.rate
    # The loop recovers: the pace rises by 2% a sample, and goes once it stands at twice
    # the starts it lets through; only then do the slots rise again.
    for _ in range(500):
        now += 0.025
        slots.observe(IDLE, running=4, now=now, started=round(paced * 0.025))
        if slots.rate is None:
            break
        assert slots.limit == 4
    assert slots.rate is None
    slots.observe(IDLE, running=4, now=now + 0.025)
    assert slots.limit == 5


def test_a_single_tenants_backlog_is_never_paced() -> None:
    slots = guard(min_slots=4)
    saturate_at_min_slots(slots, contended=False)
    assert slots.limit == 4
    assert slots.rate is None  # nobody to keep waiting: as fast as the core allows


def test_the_pace_goes_when_the_other_tenants_do() -> None:
    slots = guard(min_slots=4)
    now = saturate_at_min_slots(slots, contended=True)
    assert slots.rate is not None
    slots.observe(SATURATED, running=4, now=now, started=10, contended=False)
    assert slots.rate is None
