"""Tenant pools: each tenant's buffer under its quota, fair dispatch, and the job tasks.

Admission submits jobs; the dispatcher starts them as the fair scheduler allows (a
slot free in the replica, the tenant under its concurrency, a token in its bucket);
each started job runs in its own task through the runner, and its outcome goes to the
recorder. Nothing here writes to Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

from gateway.catalog import Catalog, Tenant
from gateway.entry import Entry
from gateway.loadguard import LoopSampler, SlotGuard
from gateway.observability import job_log
from gateway.quotas import TokenBucket
from gateway.recorder import Recorder
from gateway.records import Status
from gateway.runner import CANCELLED, Outcome, Runner
from gateway.scheduler import FairScheduler, TenantLimits
from gateway.settings import Settings
from gateway.shares import Demand, Shares, slots_of
from gateway.tasks import Supervisor

__all__ = ["PoolFigures", "Pools", "limits_for"]

log = logging.getLogger("gateway.pools")

# A saturation episode of the event loop ends (one log line) after this long without a cut.
_CAPPED_QUIET_S = 10.0
# A process is contended while more than one tenant started a job within this long: only
# then does the loop guard pace starts (gateway.loadguard).
_CONTENDED_S = 5.0


@dataclass(frozen=True, slots=True)
class PoolFigures:
    """One tenant's pool at a moment: gauges (queued, running, deferred, parked) and
    counters."""

    tenant: str
    queued: int
    running: int
    deferred: int
    parked: int
    started: int
    throttled: int
    completed: int
    paused: bool
    limits: TenantLimits


_WHOLE = Shares(1.0, 1.0)


def limits_for(tenant: Tenant, shares: Shares = _WHOLE) -> TenantLimits:
    """The scheduler's view of a tenant's quota: this replica's shares of its rate, burst
    and concurrency (at least one slot and one token, so work that just arrived can
    start); the buffer bound is per replica (it bounds this replica's memory)."""
    quota = tenant.quota
    return TenantLimits(
        max_concurrency=slots_of(shares, quota.max_concurrency),
        rate_per_s=max(1e-3, quota.rate_per_s * shares.rate),
        burst=max(1, round(quota.burst * shares.rate)),
        max_queued=max(1, quota.max_queued),
        weight=quota.weight,
    )


def _internal_error(exc: BaseException) -> Outcome:
    # A bug of the gateway's, not the job's: retried like any unexpected failure.
    message = f"the gateway failed running the job ({type(exc).__name__})"
    return Outcome(Status.FAILED, None, "internal_error", message, retryable=True)


class Pools:
    """Buffers jobs per tenant, starts them fairly within quotas, and runs them."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        runner: Runner,
        recorder: Recorder,
        supervisor: Supervisor,
    ) -> None:
        self._catalog = catalog
        self._runner = runner
        self._recorder = recorder
        self._supervisor = supervisor
        self.scheduler: FairScheduler[Entry] = FairScheduler(settings.max_inflight)
        guard = settings.loop_guard
        self.guard: SlotGuard | None = None
        if guard.enabled:
            self.guard = SlotGuard(
                settings.max_inflight,
                min_slots=guard.min_slots,
                lag_target_s=guard.lag_target_s,
                busy_threshold=guard.busy_threshold,
            )
            self.scheduler.last_start = {}  # which tenants started lately (`_contended`)
        self._guard_interval_s = guard.interval_s
        self._guard_task: asyncio.Task[None] | None = None
        self._by_key: dict[tuple[str, str], Entry] = {}
        self._running: set[Entry] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # This replica's shares of each tenant's quota (gateway.shares); tenants not
        # listed get `_even` (an even split, or the whole quota without peers).
        self._shares: dict[str, Shares] = {}
        self._even = _WHOLE
        self._started_reported: dict[str, int] = {}
        self._paused: set[str] = set()

    # -- admission -----------------------------------------------------------

    def find(self, key: tuple[str, str]) -> Entry | None:
        """The queued or running entry of a job (tenant first in the key, always)."""
        return self._by_key.get(key)

    def cancel(self, key: tuple[str, str]) -> Entry | None:
        """Cancel a job held here; None when it is not.

        A buffered job is taken out (it never starts) and returned with `task` None:
        the caller records it. A running job's flow is cancelled (trace cancelled, node
        task cancelled, flow stopped) and its own task records `cancelled`.
        """
        entry = self._by_key.get(key)
        if entry is None:
            return None
        if entry.task is None:
            self.scheduler.remove(lambda e: e is entry)
            del self._by_key[key]
            entry.cancel.set()
            return entry
        if not entry.cancel.is_set():
            entry.cancel.set()
            if entry.in_flow:
                entry.task.cancel()
        return entry

    def submit(self, entry: Entry, *, may_wait: bool = False) -> bool:
        """Buffer a job in its tenant's pool; False when the pool is full (defer it).

        `may_wait` is for delayed records already held in memory that came due: they
        line up behind the full buffer rather than go around `jobs.deferred` again.
        """
        tenant = self._catalog().get(entry.job.tenant)
        if tenant is None:
            return False
        self._ensure(tenant)
        if not self.scheduler.push(
            tenant.id, entry, may_wait=may_wait, priority=entry.job.priority
        ):
            return False
        self._by_key[entry.job.key] = entry
        self._wake.set()
        return True

    def room(self, tenant_id: str) -> int:
        """Jobs the tenant's buffer takes now (0 while it is paused or unknown)."""
        tenant = self._catalog().get(tenant_id)
        if tenant is None or tenant_id in self._paused:
            return 0
        self._ensure(tenant)
        return self.scheduler.room(tenant_id)

    def _limits(self, tenant: Tenant) -> TenantLimits:
        return limits_for(tenant, self._shares.get(tenant.id, self._even))

    def _ensure(self, tenant: Tenant) -> None:
        if self.scheduler.tenant(tenant.id) is None:
            self.scheduler.configure(tenant.id, self._limits(tenant), time.monotonic())
            if tenant.id in self._paused:
                self.scheduler.pause(tenant.id)

    def pause(self, tenant_id: str) -> list[Entry]:
        """Start none of the tenant's jobs; its buffered jobs are handed back (to park).
        Remembered even for a tenant not in the catalog (yet)."""
        self._paused.add(tenant_id)
        entries = self.scheduler.pause(tenant_id)
        for entry in entries:
            self._by_key.pop(entry.job.key, None)
        return entries

    def resume(self, tenant_id: str) -> None:
        """Start the tenant's jobs again."""
        self._paused.discard(tenant_id)
        self.scheduler.resume(tenant_id)
        self._wake.set()

    def paused(self, tenant_id: str) -> bool:
        """Whether the tenant is paused."""
        return tenant_id in self._paused

    def cancel_matching(self, predicate: Callable[[Entry], bool]) -> list[Entry]:
        """Cancel every job held here that matches: buffered ones are returned (the
        caller records them); running ones are cancelled and record themselves."""
        entries = [entry for entry in self._by_key.values() if predicate(entry)]
        return [
            entry
            for entry in entries
            if (cancelled := self.cancel(entry.job.key)) is not None and cancelled.task is None
        ]

    def running_matching(self, predicate: Callable[[Entry], bool]) -> Iterable[Entry]:
        """Running jobs that match."""
        return [entry for entry in self._running if predicate(entry)]

    def book_deferral(self, tenant_id: str) -> float:
        """Seconds until an overflowing job of the tenant should come back (see the
        scheduler's deferral horizon)."""
        return self.scheduler.book_deferral(tenant_id, time.monotonic())

    def apply_catalog(self, catalog: Catalog) -> None:
        """Apply new limits to admissions from now on (hot reload)."""
        now = time.monotonic()
        for tenant in catalog:
            self.scheduler.configure(tenant.id, self._limits(tenant), now)
            if tenant.id in self._paused and not self.scheduler.paused(tenant.id):
                self.scheduler.pause(tenant.id)  # nothing buffered yet: a new tenant
        self._wake.set()

    def demand(self, parked: Mapping[str, int]) -> dict[str, Demand]:
        """This replica's load per tenant (only tenants with some), for its report;
        `parked` records wait here as much as buffered ones."""
        demand: dict[str, Demand] = {}
        for tenant_id, queue in self.scheduler.tenants():
            started = queue.started - self._started_reported.get(tenant_id, 0)
            self._started_reported[tenant_id] = queue.started
            waiting = len(queue.items) + len(queue.waiting) + parked.get(tenant_id, 0)
            if waiting or queue.running or started:
                demand[tenant_id] = Demand(waiting, queue.running, started)
        return demand

    def apply_shares(self, shares: dict[str, Shares], even: Shares) -> None:
        """This replica's new shares of the quotas of the tenants someone has demand for
        (`shares`); every other tenant gets `even`."""
        catalog = self._catalog()
        now = time.monotonic()
        before, before_even = self._shares, self._even
        self._shares, self._even = shares, even
        if even != before_even:
            ids: set[str] = {t.id for t in catalog}
        else:
            ids = set(shares) | set(before)
        for tenant_id in ids:
            tenant = catalog.get(tenant_id)
            if tenant is not None:
                self.scheduler.configure(tenant_id, self._limits(tenant), now)
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start dispatching."""
        self.apply_catalog(self._catalog())
        if self._task is None:
            self._task = self._supervisor.spawn(self._dispatch(), "gateway:dispatch")
        if self.guard is not None and self._guard_task is None:
            self._guard_task = self._supervisor.spawn(
                self._guard_slots(self.guard), "gateway:loop-guard"
            )

    async def stop(self, grace_s: float) -> None:
        """Stop starting jobs, let running ones finish within `grace_s`, cancel the rest."""
        task, self._task = self._task, None
        await self._supervisor.cancel(task)
        guard_task, self._guard_task = self._guard_task, None
        await self._supervisor.cancel(guard_task)
        for entry in self.scheduler.remove(lambda _: True):
            self._by_key.pop(entry.job.key, None)
        await self._wait_or_cancel(list(self._running), grace_s)

    async def revoke(self, partitions: set[Hashable], grace_s: float) -> None:
        """Drop queued jobs of revoked partitions; give running ones `grace_s`, then cancel."""
        for entry in self.scheduler.remove(lambda e: e.partition in partitions):
            self._by_key.pop(entry.job.key, None)
        running = [e for e in self._running if e.partition in partitions]
        await self._wait_or_cancel(running, grace_s)

    async def _wait_or_cancel(self, entries: list[Entry], grace_s: float) -> None:
        tasks = [e.task for e in entries if e.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("jobs_cancelled_unfinished", extra={"count": len(pending)})
            await asyncio.wait(pending, timeout=10.0)

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    # -- dispatch ------------------------------------------------------------

    async def _dispatch(self) -> None:
        scheduler = self.scheduler
        while True:
            now = time.monotonic()
            while (picked := scheduler.pop(now)) is not None:
                _, entry = picked
                self._running.add(entry)
                entry.task = asyncio.create_task(self._execute(entry), name="gateway:job")
            self._wake.clear()
            wait = scheduler.next_wakeup_s(now) if scheduler.running < scheduler.max_slots else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation that stops this loop when the event is set at that moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _guard_slots(self, guard: SlotGuard) -> None:
        """Cap the running jobs while the event loop is saturated (gateway.loadguard)."""
        sampler = LoopSampler()
        try:
            await self._follow_loop(guard, sampler)
        finally:
            sampler.close()

    async def _follow_loop(self, guard: SlotGuard, sampler: LoopSampler) -> None:
        scheduler = self.scheduler
        capped_since: float | None = None
        last_cut = 0.0
        started = scheduler.started
        contended, pruned = False, 0.0
        while True:
            await asyncio.sleep(self._guard_interval_s)
            now = time.monotonic()
            if now - pruned >= 1.0:
                contended, pruned = self._contended(now), now
            before, paced_before = guard.limit, guard.rate
            limit = guard.observe(
                sampler.sample(self._guard_interval_s),
                scheduler.running,
                now,
                scheduler.started - started,
                contended=contended,
            )
            started = scheduler.started
            scheduler.total_slots = limit
            self._pace_starts(guard.rate, now)
            cut = limit < before or (
                guard.rate is not None and (paced_before is None or guard.rate < paced_before)
            )
            if limit > before or (paced_before is not None and guard.rate is None):
                self._wake.set()
            elif cut:
                last_cut = now
                if capped_since is None:
                    capped_since = now
                    log.info(
                        "job_slots_capped",
                        extra={
                            "slots": limit,
                            "starts_per_s": None if guard.rate is None else round(guard.rate),
                            "loop_lag_ms": round(guard.lag_s * 1000, 1),
                            "busy": round(guard.busy, 2),
                        },
                    )
            if capped_since is not None and now - last_cut >= _CAPPED_QUIET_S:
                log.info(
                    "job_slots_released",
                    extra={"slots": limit, "capped_s": round(last_cut - capped_since, 1)},
                )
                capped_since = None

    def _contended(self, now: float) -> bool:
        """Whether more than one tenant started a job in the last `_CONTENDED_S` (the
        ones that did not are forgotten)."""
        recent = self.scheduler.last_start
        assert recent is not None  # kept from the guard's making on
        for tenant in [t for t, at in recent.items() if now - at > _CONTENDED_S]:
            del recent[tenant]
        return len(recent) > 1

    def _pace_starts(self, rate: float | None, now: float) -> None:
        """Pace the starts of backlogged tenants at `rate` a second (None: no pace), in
        a bucket of one guard interval's starts, so the pace is smooth."""
        scheduler = self.scheduler
        if rate is None:
            scheduler.pace = None
            return
        burst = max(1, round(rate * self._guard_interval_s))
        if scheduler.pace is None:
            scheduler.pace = TokenBucket(rate, burst, now)
        else:
            scheduler.pace.reconfigure(rate, burst, now)

    async def _execute(self, entry: Entry) -> None:
        """One attempt: `running`, the flow, the outcome. A cancellation by shutdown or
        rebalance records nothing: the record stays unfinished and is redelivered."""
        job = entry.job
        try:
            started = time.time()
            self._recorder.started(entry, started)
            try:
                outcome = (
                    CANCELLED if entry.cancel.is_set() else await self._runner.run(entry, started)
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # one job's failure, never the pool's
                job_log(log, logging.ERROR, "job_internal_error", job, error=type(exc).__name__)
                outcome = _internal_error(exc)
            try:
                self._recorder.finished(entry, outcome, started=started, finished=time.time())
            except Exception as exc:  # noqa: BLE001  # its records could not be built
                self._recorder.failed(job.source, entry.tickets, exc)
        finally:
            self._running.discard(entry)
            if self._by_key.get(job.key) is entry:
                del self._by_key[job.key]
            self.scheduler.release(job.tenant)
            self._wake.set()

    def snapshot(self, parked: Mapping[str, int]) -> Iterable[PoolFigures]:
        """Per-tenant figures for every pool this replica has seen (with the tenant's
        `parked` records)."""
        now = time.monotonic()
        for tenant_id, queue in self.scheduler.tenants():
            yield PoolFigures(
                tenant=tenant_id,
                queued=len(queue.items) + len(queue.waiting),
                running=queue.running,
                deferred=self.scheduler.deferred(tenant_id, now),
                parked=parked.get(tenant_id, 0),
                started=queue.started,
                throttled=queue.throttled,
                completed=queue.completed,
                paused=queue.paused,
                limits=queue.limits,
            )
