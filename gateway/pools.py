"""Tenant pools: admission under each tenant's quota, fair dispatch, and job execution."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from gateway.audit import audit_tenant_violation
from gateway.catalog import Catalog, Tenant
from gateway.envelope import DlqReason, Job
from gateway.errors import ProduceError
from gateway.finished import FinishedJobs
from gateway.flows import JobContext, JobTypes, Outcome, run_job
from gateway.metrics import Metrics
from gateway.observability import flow_event_middleware, job_log
from gateway.offsets import Ticket
from gateway.outcomes import Decision, decide
from gateway.publisher import Publisher
from gateway.records import Status, rfc3339, status_record
from gateway.scheduler import FairScheduler, TenantLimits
from gateway.settings import Settings
from gateway.statusview import JobStatus
from gateway.tasks import cancel_and_wait
from gateway.vault import JobSecrets, SecretStore, redact

__all__ = ["Entry", "PoolFigures", "Pools", "limits_for"]

log = logging.getLogger("gateway.pools")


@dataclass(eq=False, slots=True)
class Entry:
    """A job on its way through the gateway, with the offset ticket(s) it finishes."""

    job: Job
    ticket: Ticket
    partition: Hashable
    followers: list[Ticket] = field(default_factory=list)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # True only while the task awaits run_job, the one place a task cancellation
    # requested by a user is turned into a `cancelled` outcome.
    in_flow: bool = False


@dataclass(frozen=True, slots=True)
class PoolFigures:
    """One tenant's pool at a moment: gauges (queued, running, deferred) and counters."""

    tenant: str
    queued: int
    running: int
    deferred: int
    started: int
    throttled: int
    completed: int


# The least time a job holds a slot (flow start and stop, and the broker's
# acknowledgement of its records): with `max_concurrency` it bounds how fast a tenant
# can work off its buffer when its rate does not.
_MIN_SLOT_HOLD_S = 0.02


def _scrubbed(outcome: Outcome, secrets: JobSecrets | None) -> Outcome:
    """The outcome with any secret value the job received masked in its result and error."""
    values = secrets.handed_out if secrets is not None else frozenset()
    if not values:
        return outcome
    return dataclasses.replace(
        outcome,
        result=redact(outcome.result, values),
        error_message=redact(outcome.error_message, values),
    )


def limits_for(tenant: Tenant, share: float = 1.0) -> TenantLimits:
    """The scheduler's view of a tenant's quota, scaled to this replica's share."""
    quota = tenant.quota
    return TenantLimits(
        max_concurrency=max(1, round(quota.max_concurrency * share)),
        rate_per_s=max(1e-3, quota.rate_per_s * share),
        burst=max(1, round(quota.burst * share)),
        max_queued=max(1, round(quota.max_queued * share)),
        weight=quota.weight,
    )


_CANCELLED = Outcome(Status.CANCELLED, None, "cancelled", "cancelled on request")


class Pools:
    """Buffers jobs per tenant, starts them fairly within quotas, and records outcomes."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        job_types: JobTypes,
        publisher: Publisher,
        finished: FinishedJobs,
        finish: Callable[[Entry], None],
        fatal: Callable[[BaseException], None],
        secrets: SecretStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._types = job_types
        self._publisher = publisher
        self._finished = finished
        self._secrets = secrets
        self._metrics = metrics
        self._finish = finish
        self._fatal = fatal
        self._rng = random.Random()  # noqa: S311  # backoff jitter, not a secret
        self.scheduler: FairScheduler[Entry] = FairScheduler(settings.max_inflight)
        self._by_key: dict[tuple[str, str], Entry] = {}
        self._running: set[Entry] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._share = 1.0
        self.completed = 0

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
        if self.scheduler.tenant(tenant.id) is None:
            self.scheduler.configure(tenant.id, limits_for(tenant, self._share), time.monotonic())
        if not self.scheduler.push(tenant.id, entry, may_wait=may_wait):
            return False
        self._by_key[entry.job.key] = entry
        self._wake.set()
        return True

    def apply_catalog(self, catalog: Catalog) -> None:
        """Apply new limits to admissions from now on (hot reload, share change)."""
        now = time.monotonic()
        for tenant in catalog:
            self.scheduler.configure(tenant.id, limits_for(tenant, self._share), now)
        self._wake.set()

    def set_share(self, share: float) -> None:
        """This replica's share of every tenant's quota (its share of partitions)."""
        self._share = max(0.0, min(1.0, share)) or 1.0
        self.apply_catalog(self._catalog())

    def defer_delay_s(self, tenant_id: str) -> float:
        """Book one more deferral and return its delay: the time to work off everything
        of the tenant that is buffered or already deferred, so deferred records come back
        spread out instead of bouncing off a full buffer.

        The pace is the token bucket's rate, but never more than `max_concurrency` slots
        each held `_MIN_SLOT_HOLD_S` can take: with the rate alone, a tenant limited by
        concurrency (a rate far above what its slots allow) got the 50 ms floor, and its
        overflow bounced between a full buffer and `jobs.deferred` every 50 ms for as long
        as the backlog lasted. (Pacing by the tenant's measured slot time was tried and
        dropped: slots held long by a busy loop in a burst's first seconds booked the
        overflow far too late, and a 600/s tenant ran at 113/s.)
        """
        queue = self.scheduler.tenant(tenant_id)
        if queue is None:
            return 1.0
        queue.deferred += 1
        backlog = len(queue.items) + len(queue.waiting) + queue.deferred
        pace = min(queue.bucket.rate, queue.limits.max_concurrency / _MIN_SLOT_HOLD_S)
        return max(0.05, backlog / pace)

    def deferred_returned(self, tenant_id: str) -> None:
        """A deferred record of the tenant came back from `jobs.deferred`."""
        queue = self.scheduler.tenant(tenant_id)
        if queue is not None and queue.deferred > 0:
            queue.deferred -= 1

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start dispatching."""
        self.apply_catalog(self._catalog())
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch(), name="gateway:dispatch")

    async def stop(self, grace_s: float) -> None:
        """Stop starting jobs, let running ones finish within `grace_s`, cancel the rest."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
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
            wait = (
                scheduler.next_wakeup_s(now) if scheduler.running < scheduler.total_slots else None
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _execute(self, entry: Entry) -> None:
        job = entry.job
        try:
            await self._run_and_record(entry)
        except asyncio.CancelledError:
            raise
        except ProduceError as exc:
            job_log(log, logging.ERROR, "outcome_not_recorded", job, error=exc.code)
            self._fatal(exc)
        finally:
            self._running.discard(entry)
            if self._by_key.get(job.key) is entry:
                del self._by_key[job.key]
            self.scheduler.release(job.tenant)
            self._wake.set()

    async def _run_and_record(self, entry: Entry) -> None:
        job = entry.job
        topics = self._settings.topics
        tenant = self._catalog().get(job.tenant)
        started = time.time()
        await self._publisher.send_later(
            status_record(
                topics.status,
                tenant=job.tenant,
                job_id=job.id,
                status=Status.RUNNING,
                attempt=job.attempt,
                at=started,
            )
        )
        if entry.cancel.is_set():
            outcome = _CANCELLED
        else:
            outcome = await self._run(entry, tenant, started)
        finished = time.time()
        decision = decide(
            job,
            outcome,
            tenant=tenant,
            topics=topics,
            retry=self._settings.retry,
            started_at=started,
            finished_at=finished,
            rng=self._rng,
        )
        await self._publisher.send(decision.records)
        status = JobStatus(job.tenant, job.id, decision.status, job.attempt, rfc3339(finished))
        result = next((r.value for r in decision.records if r.topic == topics.results), None)
        if result is not None:
            self._finished.observe_result(result, status)  # the API answers GET with it at once
        else:
            self._finished.observe(status)
        if outcome.error_code == "tenant_violation":
            audit_tenant_violation(
                tenant=job.tenant, job_id=job.id, job_type=job.type, attempt=job.attempt
            )
        job_log(
            log,
            logging.INFO,
            "job_finished",
            job,
            outcome=decision.status.value,
            duration_ms=round((finished - started) * 1000, 3),
            error=outcome.error_code,
        )
        self._count(job, decision, outcome.error_code, finished - started)
        self.completed += 1
        self._finish(entry)

    def _count(self, job: Job, decision: Decision, error_code: str | None, seconds: float) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.jobs.labels(job.tenant, job.type, decision.status.value).inc()
        metrics.job_duration.labels(job.tenant, job.type).observe(seconds)
        if decision.status is Status.RETRYING:
            metrics.retries.labels(job.tenant, metrics.error_code(error_code)).inc()
        dlq = self._settings.topics.dlq
        if any(record.topic == dlq for record in decision.records):
            metrics.dlq.labels(DlqReason.MAX_ATTEMPTS_EXCEEDED.value).inc()

    def _node_latency(self, job: Job) -> Callable[[str, float], None] | None:
        metrics = self._metrics
        if metrics is None:
            return None

        def observe(node: str, seconds: float) -> None:
            metrics.node_latency.labels(job.tenant, metrics.node_name(node)).observe(seconds)

        return observe

    async def _run(self, entry: Entry, tenant: Tenant | None, started: float) -> Outcome:
        job = entry.job
        factory = self._types.get(job.type)
        if factory is None or tenant is None:
            reason = "unknown_type" if factory is None else "unknown_tenant"
            return Outcome(Status.FAILED, None, reason, "job can no longer run here")
        deadline = job.deadline_s or tenant.jobs.default_deadline_s
        secrets = self._secrets.for_job(job.tenant, job.id) if self._secrets else None
        ctx = JobContext(
            tenant=job.tenant,
            job_id=job.id,
            job_type=job.type,
            attempt=job.attempt,
            payload=job.payload,
            deadline_at=started + deadline,
            base_idempotency_key=job.idempotency_key,
        )
        if secrets is not None:
            ctx = dataclasses.replace(ctx, secrets=secrets)
        middleware = flow_event_middleware(job, self._node_latency(job))
        entry.in_flow = True
        try:
            outcome = await run_job(ctx, factory, cancel=entry.cancel, middlewares=[middleware])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if entry.cancel.is_set() and task is not None and task.uncancel() == 0:
                # A cancel request that landed while the flow was already stopping.
                return _CANCELLED
            raise
        finally:
            entry.in_flow = False
        return _scrubbed(outcome, secrets)

    def snapshot(self) -> Iterable[PoolFigures]:
        """Per-tenant figures for every pool this replica has seen."""
        for tenant_id, queue in self.scheduler.tenants():
            yield PoolFigures(
                tenant=tenant_id,
                queued=len(queue.items) + len(queue.waiting),
                running=queue.running,
                deferred=queue.deferred,
                started=queue.started,
                throttled=queue.throttled,
                completed=queue.completed,
            )
