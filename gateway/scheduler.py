"""Weighted fair scheduling of job starts across tenants (pure; no I/O, no clock).

Stride scheduling: each backlogged tenant has a virtual *pass*; the next slot goes to
the eligible tenant with the smallest pass, which then advances by 1 / weight. Over
time each backlogged tenant's share of starts follows its weight. A tenant that
becomes active joins at the current virtual time, so its first job is picked at the
next free slot instead of waiting behind anyone's backlog. A tenant is eligible while
it is not paused, runs fewer than its `max_concurrency` jobs and its token bucket has
a token.

Picking costs O(log n) in the number of tenants, not a scan of all of them: runnable
tenants (work buffered, a concurrency slot, not paused) sit in a heap by pass; one
found without a token moves to a timer heap until its next token is due. Entries that
went stale (the tenant emptied, filled its slots, was paused) are dropped when they
surface.

Within a tenant, jobs start by `priority` (0-9, higher first), in arrival order within
a priority; priority never changes the tenant's share against other tenants.

Overflow past a tenant's buffer is deferred (sent around `jobs.deferred`) and booked
here, so deferred records come back spread out at the pace the tenant can start them:
each tenant has a deferral horizon, the time by which everything it has buffered and
deferred can have started; a new deferral is due one start after the horizon, which
then moves on. Time alone brings the horizon back, so no replica has to hear that a
deferred record came back (it may well be read by another replica).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.quotas import TokenBucket

__all__ = ["MIN_SLOT_HOLD_S", "FairScheduler", "PriorityLine", "TenantLimits", "TenantQueue"]

T = TypeVar("T")

# The least time a job holds a slot (flow start and stop): with `max_concurrency` it
# bounds how fast a tenant can work off its buffer when its rate does not.
MIN_SLOT_HOLD_S = 0.02
# The shortest deferral: a record sent around jobs.deferred is read back no sooner.
_MIN_DEFERRAL_S = 0.05
_PRIORITIES = 10
_DEFAULT_PRIORITY = 5


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """The part of a quota the scheduler enforces."""

    max_concurrency: int
    rate_per_s: float
    burst: int
    max_queued: int
    weight: int


class PriorityLine(Generic[T]):
    """Items by priority (higher first), first in first out within a priority."""

    __slots__ = ("_count", "_lines")

    def __init__(self) -> None:
        self._lines: list[deque[T]] = [deque() for _ in range(_PRIORITIES)]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[T]:
        for line in reversed(self._lines):
            yield from line

    def append(self, item: T, priority: int = _DEFAULT_PRIORITY) -> None:
        """Add an item behind the others of its priority."""
        self._lines[min(max(priority, 0), _PRIORITIES - 1)].append(item)
        self._count += 1

    def popleft(self) -> T:
        """The first item of the highest priority present."""
        for line in reversed(self._lines):
            if line:
                self._count -= 1
                return line.popleft()
        raise IndexError("pop from an empty PriorityLine")

    def remove(self, predicate: Callable[[T], bool], removed: list[T]) -> None:
        """Move every item matching `predicate` to `removed`."""
        for index, line in enumerate(self._lines):
            if not line:
                continue
            keep: deque[T] = deque()
            for item in line:
                (removed if predicate(item) else keep).append(item)
            self._count -= len(line) - len(keep)
            self._lines[index] = keep


@dataclass(slots=True)
class TenantQueue(Generic[T]):
    """One tenant's buffer and counters."""

    limits: TenantLimits
    bucket: TokenBucket
    items: PriorityLine[T] = field(default_factory=PriorityLine)
    # Delayed records already in memory that came due while `items` was full: they move
    # into `items` in order as room frees, instead of bouncing back through the broker.
    # At most `max_queued` of them, so a slow tenant's line cannot hold its partitions.
    waiting: deque[tuple[T, int]] = field(default_factory=deque)
    running: int = 0
    passed: float = 0.0
    started: int = 0
    # Job starts the token bucket held back at least once (rate-limited, not failed).
    throttled: int = 0
    completed: int = 0
    rate_blocked: bool = False
    paused: bool = False
    # The time by which everything buffered and deferred can have started (see above).
    deferred_until: float = 0.0
    # The live heap entry's sequence number (0: none; see FairScheduler), and when it
    # sits in the timed heap, the time its token is due (0.0: in the ready heap).
    entry: int = 0
    token_due: float = 0.0

    def pace(self) -> float:
        """Starts per second the tenant can sustain: its rate, unless its slots bind."""
        return min(self.bucket.rate, self.limits.max_concurrency / MIN_SLOT_HOLD_S)

    def runnable(self) -> bool:
        """Work buffered, a concurrency slot free, not paused (a token may still lack)."""
        return bool(self.items) and self.running < self.limits.max_concurrency and not self.paused


class FairScheduler(Generic[T]):
    """Per-tenant buffers, limits and weighted fair choice of the next job."""

    def __init__(self, total_slots: int) -> None:
        # `total_slots` may be lowered below `max_slots` for a while (gateway.loadguard):
        # past it only a tenant with nothing running starts, so a cap on the replica's
        # jobs holds back backlogs, never a tenant's first job.
        self.max_slots = total_slots
        self.total_slots = total_slots
        # Starts a second of jobs of tenants already running some (gateway.loadguard);
        # None: not paced.
        self.pace: TokenBucket | None = None
        self._paced_due: float | None = None
        self.running = 0
        self.started = 0
        # When each tenant last started a job (monotonic), kept only for the loop guard
        # (which prunes it): None, not kept.
        self.last_start: dict[str, float] | None = None
        self._tenants: dict[str, TenantQueue[T]] = {}
        self._vtime = 0.0
        self._seq = itertools.count(1)
        self._ready: list[tuple[float, int, str]] = []  # (pass, entry, tenant)
        self._timed: list[tuple[float, int, str]] = []  # (token due at, entry, tenant)

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
        self._schedule(tenant, queue)
        if queue.entry and queue.token_due:
            # Waiting for a token, timed by the old rate (at the floor of a share that
            # can be minutes away): a raised rate brings it forward.
            due = now + queue.bucket.wait_s(now)
            if due < queue.token_due:
                self._wait_for_token(tenant, queue, due)

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

    def push(
        self, tenant: str, item: T, *, may_wait: bool = False, priority: int = _DEFAULT_PRIORITY
    ) -> bool:
        """Buffer a job; False when the tenant's buffer is full (overflow).

        With `may_wait`, a job that finds the buffer full joins the tenant's waiting
        line instead, while that line is shorter than `max_queued`, and True is returned.
        """
        queue = self._tenants[tenant]
        if queue.waiting or (len(queue.items) >= queue.limits.max_queued and queue.items):
            if not may_wait or len(queue.waiting) >= queue.limits.max_queued:
                return False
            queue.waiting.append((item, priority))
            return True
        if not queue.items and queue.running == 0:
            # Joining (again): start at the current virtual time, never in the past,
            # so idleness earns no burst of priority and costs no wait.
            queue.passed = max(queue.passed, self._vtime)
        queue.items.append(item, priority)
        self._schedule(tenant, queue)
        return True

    def room(self, tenant: str) -> int:
        """Jobs the tenant's buffer takes now (`push` without `may_wait` succeeds)."""
        queue = self._tenants[tenant]
        return 0 if queue.waiting else max(0, queue.limits.max_queued - len(queue.items))

    def pause(self, tenant: str) -> list[T]:
        """Start none of the tenant's jobs until `resume`; returns its buffered jobs
        (waiting line included), taken out so the caller can park them elsewhere."""
        queue = self._tenants.get(tenant)
        if queue is None:
            return []
        queue.paused = True
        queue.entry = 0
        return self._take_all(queue, lambda _: True)

    def resume(self, tenant: str) -> None:
        """Start the tenant's jobs again."""
        queue = self._tenants.get(tenant)
        if queue is not None and queue.paused:
            queue.paused = False
            self._schedule(tenant, queue)

    def paused(self, tenant: str) -> bool:
        """Whether the tenant is paused."""
        queue = self._tenants.get(tenant)
        return queue is not None and queue.paused

    def _schedule(self, tenant: str, queue: TenantQueue[T]) -> None:
        """Give a runnable tenant a heap entry, unless it has a live one already."""
        if queue.entry or not queue.runnable():
            return
        queue.entry = next(self._seq)
        queue.token_due = 0.0
        heapq.heappush(self._ready, (queue.passed, queue.entry, tenant))

    def _wait_for_token(self, tenant: str, queue: TenantQueue[T], due: float) -> None:
        """Move the tenant to the timed heap until `due` (a new entry; any older is stale)."""
        queue.entry = next(self._seq)
        queue.token_due = due
        heapq.heappush(self._timed, (due, queue.entry, tenant))

    def pop(self, now: float) -> tuple[str, T] | None:
        """The next job to start, or None when no tenant is eligible or no slot is free.

        Past `total_slots` (a cap below `max_slots`), or without a token of `pace`,
        only the tenant next in line may start, and only when it has nothing running: a
        tenant that just got work joins at the current virtual time, ahead of every
        backlog, so it still starts at once.
        """
        self._paced_due = None
        if self.running >= self.max_slots:
            return None
        capped = self.running >= self.total_slots
        pace = self.pace
        timed, ready = self._timed, self._ready
        while timed and timed[0][0] <= now:
            _, entry, tenant = heapq.heappop(timed)
            queue = self._tenants.get(tenant)
            if queue is not None and queue.entry == entry:
                queue.token_due = 0.0
                heapq.heappush(ready, (queue.passed, entry, tenant))
        while ready:
            _, entry, tenant = ready[0]
            queue = self._tenants.get(tenant)
            if queue is None or queue.entry != entry:
                heapq.heappop(ready)
                continue  # stale: the tenant has a newer entry, or none
            if not queue.runnable():
                heapq.heappop(ready)
                queue.entry = 0
                continue
            if queue.running > 0 and (capped or (pace is not None and pace.available(now) < 1)):
                if not capped and pace is not None:
                    self._paced_due = now + pace.wait_s(now)
                return None  # it keeps its place in line
            heapq.heappop(ready)
            if not queue.bucket.try_take(now):
                queue.rate_blocked = True
                self._wait_for_token(tenant, queue, now + queue.bucket.wait_s(now))
                continue
            if pace is not None and queue.running > 0:
                pace.try_take(now)
            queue.entry = 0
            item = queue.items.popleft()
            self._refill(queue)
            queue.running += 1
            queue.started += 1
            if queue.rate_blocked:
                queue.throttled += 1
                queue.rate_blocked = False
            self.running += 1
            self.started += 1
            if self.last_start is not None:
                self.last_start[tenant] = now
            self._vtime = max(self._vtime, queue.passed)
            queue.passed += 1.0 / queue.limits.weight
            self._schedule(tenant, queue)
            return tenant, item
        return None

    def _refill(self, queue: TenantQueue[T]) -> None:
        while queue.waiting and len(queue.items) < queue.limits.max_queued:
            item, priority = queue.waiting.popleft()
            queue.items.append(item, priority)

    def release(self, tenant: str) -> None:
        """A job of `tenant` finished; its slot is free."""
        queue = self._tenants.get(tenant)
        if queue is not None and queue.running > 0:
            queue.running -= 1
            queue.completed += 1
            self._schedule(tenant, queue)
        self.running = max(0, self.running - 1)

    def next_wakeup_s(self, now: float) -> float | None:
        """Seconds until a rate-limited tenant with work gets a token, or the pace lets
        the next start through, if any is waiting."""
        timed = self._timed
        wait = None if self._paced_due is None else max(0.0, self._paced_due - now)
        while timed:
            due, entry, tenant = timed[0]
            queue = self._tenants.get(tenant)
            if queue is not None and queue.entry == entry:
                token = max(0.0, due - now)
                return token if wait is None else min(wait, token)
            heapq.heappop(timed)  # stale
        return wait

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
            removed += self._take_all(queue, predicate)
        return removed

    def _take_all(self, queue: TenantQueue[T], predicate: Callable[[T], bool]) -> list[T]:
        removed: list[T] = []
        queue.items.remove(predicate, removed)
        kept: deque[tuple[T, int]] = deque()
        for item, priority in queue.waiting:
            if predicate(item):
                removed.append(item)
            else:
                kept.append((item, priority))
        queue.waiting = kept
        self._refill(queue)
        if not queue.runnable():
            queue.entry = 0  # its heap entry, if any, is stale now
        return removed
