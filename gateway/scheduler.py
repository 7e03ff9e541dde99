"""Weighted fair scheduling of job starts across tenants (pure; no I/O, no clock).

Stride scheduling: each backlogged tenant has a virtual *pass*; the next slot goes to
the eligible tenant with the smallest pass, which then advances by 1 / weight. Over
time each backlogged tenant's share of starts follows its weight. A tenant that
becomes active joins at the current virtual time, so its first job is picked at the
next free slot instead of waiting behind anyone's backlog. A tenant is eligible while
it runs fewer than its `max_concurrency` jobs and its token bucket has a token.

Overflow past a tenant's buffer is deferred (sent around `jobs.deferred`) and booked
here, so deferred records come back spread out at the pace the tenant can start them:
each tenant has a deferral horizon, the time by which everything it has buffered and
deferred can have started; a new deferral is due one start after the horizon, which
then moves on. Time alone brings the horizon back, so no replica has to hear that a
deferred record came back (it may well be read by another replica).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.quotas import TokenBucket

__all__ = ["MIN_SLOT_HOLD_S", "FairScheduler", "TenantLimits", "TenantQueue"]

T = TypeVar("T")

# The least time a job holds a slot (flow start and stop): with `max_concurrency` it
# bounds how fast a tenant can work off its buffer when its rate does not.
MIN_SLOT_HOLD_S = 0.02
# The shortest deferral: a record sent around jobs.deferred is read back no sooner.
_MIN_DEFERRAL_S = 0.05


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """The part of a quota the scheduler enforces."""

    max_concurrency: int
    rate_per_s: float
    burst: int
    max_queued: int
    weight: int


@dataclass(slots=True)
class TenantQueue(Generic[T]):
    """One tenant's buffer and counters."""

    limits: TenantLimits
    bucket: TokenBucket
    items: deque[T] = field(default_factory=deque)
    # Delayed records already in memory that came due while `items` was full: they move
    # into `items` in order as room frees, instead of bouncing back through the broker.
    # At most `max_queued` of them, so a slow tenant's line cannot hold its partitions.
    waiting: deque[T] = field(default_factory=deque)
    running: int = 0
    passed: float = 0.0
    started: int = 0
    # Job starts the token bucket held back at least once (rate-limited, not failed).
    throttled: int = 0
    completed: int = 0
    rate_blocked: bool = False
    # The time by which everything buffered and deferred can have started (see above).
    deferred_until: float = 0.0

    def pace(self) -> float:
        """Starts per second the tenant can sustain: its rate, unless its slots bind."""
        return min(self.bucket.rate, self.limits.max_concurrency / MIN_SLOT_HOLD_S)


class FairScheduler(Generic[T]):
    """Per-tenant FIFO buffers, limits and weighted fair choice of the next job."""

    def __init__(self, total_slots: int) -> None:
        self.total_slots = total_slots
        self.running = 0
        self._tenants: dict[str, TenantQueue[T]] = {}
        self._vtime = 0.0

    def configure(self, tenant: str, limits: TenantLimits, now: float) -> None:
        """Add a tenant or change its limits (hot reload keeps queued work)."""
        queue = self._tenants.get(tenant)
        if queue is None:
            bucket = TokenBucket(limits.rate_per_s, limits.burst, now)
            self._tenants[tenant] = TenantQueue(limits=limits, bucket=bucket, passed=self._vtime)
            return
        queue.limits = limits
        queue.bucket.reconfigure(limits.rate_per_s, limits.burst, now)
        self._refill(queue)

    def tenant(self, tenant: str) -> TenantQueue[T] | None:
        """A tenant's queue and counters."""
        return self._tenants.get(tenant)

    def tenants(self) -> Iterator[tuple[str, TenantQueue[T]]]:
        """Every configured tenant."""
        return iter(self._tenants.items())

    def queued(self) -> int:
        """Jobs buffered across all tenants, waiting lines included."""
        return sum(len(q.items) + len(q.waiting) for q in self._tenants.values())

    @property
    def waiting(self) -> int:
        """Jobs in every tenant's waiting line."""
        return sum(len(q.waiting) for q in self._tenants.values())

    def push(self, tenant: str, item: T, *, may_wait: bool = False) -> bool:
        """Buffer a job; False when the tenant's buffer is full (overflow).

        With `may_wait`, a job that finds the buffer full joins the tenant's waiting
        line instead, while that line is shorter than `max_queued`, and True is returned.
        """
        queue = self._tenants[tenant]
        if queue.waiting or (len(queue.items) >= queue.limits.max_queued and queue.items):
            if not may_wait or len(queue.waiting) >= queue.limits.max_queued:
                return False
            queue.waiting.append(item)
            return True
        if not queue.items and queue.running == 0:
            # Joining (again): start at the current virtual time, never in the past,
            # so idleness earns no burst of priority and costs no wait.
            queue.passed = max(queue.passed, self._vtime)
        queue.items.append(item)
        return True

    def pop(self, now: float) -> tuple[str, T] | None:
        """The next job to start, or None when no tenant is eligible or no slot is free."""
        if self.running >= self.total_slots:
            return None
        best: TenantQueue[T] | None = None
        best_id = ""
        for tenant_id, queue in self._tenants.items():
            if not queue.items or queue.running >= queue.limits.max_concurrency:
                continue
            if queue.bucket.available(now) < 1.0:
                queue.rate_blocked = True
                continue
            if best is None or queue.passed < best.passed:
                best, best_id = queue, tenant_id
        if best is None:
            return None
        best.bucket.try_take(now)
        item = best.items.popleft()
        self._refill(best)
        best.running += 1
        best.started += 1
        if best.rate_blocked:
            best.throttled += 1
            best.rate_blocked = False
        self.running += 1
        self._vtime = max(self._vtime, best.passed)
        best.passed += 1.0 / best.limits.weight
        return best_id, item

    def _refill(self, queue: TenantQueue[T]) -> None:
        while queue.waiting and len(queue.items) < queue.limits.max_queued:
            queue.items.append(queue.waiting.popleft())

    def release(self, tenant: str) -> None:
        """A job of `tenant` finished; its slot is free."""
        queue = self._tenants.get(tenant)
        if queue is not None and queue.running > 0:
            queue.running -= 1
            queue.completed += 1
        self.running = max(0, self.running - 1)

    def next_wakeup_s(self, now: float) -> float | None:
        """Seconds until a rate-limited tenant with work gets a token, if any is waiting."""
        waits = [
            q.bucket.wait_s(now)
            for q in self._tenants.values()
            if q.items and q.running < q.limits.max_concurrency
        ]
        return min(waits) if waits else None

    def book_deferral(self, tenant: str, now: float) -> float:
        """Book one deferral of `tenant`'s overflow; the seconds until it is due.

        It is due once everything the tenant has buffered, and every deferral booked
        before it, can have started at the tenant's pace.
        """
        queue = self._tenants.get(tenant)
        if queue is None:
            return 1.0
        step = 1.0 / queue.pace()
        buffered_until = now + (len(queue.items) + len(queue.waiting)) * step
        queue.deferred_until = max(queue.deferred_until, buffered_until) + step
        return max(_MIN_DEFERRAL_S, queue.deferred_until - now)

    def deferred(self, tenant: str, now: float) -> int:
        """About how many of the tenant's records are out in `jobs.deferred` now."""
        queue = self._tenants.get(tenant)
        if queue is None or queue.deferred_until <= now:
            return 0
        buffered = len(queue.items) + len(queue.waiting)
        return max(0, round((queue.deferred_until - now) * queue.pace()) - buffered)

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take every buffered job matching `predicate` out of the buffers."""
        removed: list[T] = []
        for queue in self._tenants.values():
            queue.items = _without(queue.items, predicate, removed)
            queue.waiting = _without(queue.waiting, predicate, removed)
            self._refill(queue)
        return removed


def _without(items: deque[T], predicate: Callable[[T], bool], removed: list[T]) -> deque[T]:
    keep: deque[T] = deque()
    for item in items:
        (removed if predicate(item) else keep).append(item)
    return keep
