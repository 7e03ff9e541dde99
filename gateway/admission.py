"""Admission: what happens to each consumed record before it may run.

For every record the intake hands over, in order:

0. a fresh job whose tenant has no room (or has parked jobs already) is parked: left in
   place on `jobs`, read again by offset when there is room (`gateway.parking`); only
   its `tenant` header is read;
1. parse it (`gateway.envelope`, total): a bad record is rejected (DLQ);
2. a retry or deferral read back before its `not-before` waits in the delay queue
   (one timer, no polling; it stays uncommitted, so the delay survives a restart);
3. a job already terminal (history) is a duplicate; one already queued or running here
   takes the redelivered record along (`followers`); one with a pending cancel is
   recorded `cancelled` without starting;
4. otherwise it goes to its tenant's pool, or, when the tenant's buffer is full, is
   parked (a fresh job, while parking has room) or deferred to `jobs.deferred` at the
   pace the scheduler books.

Admission also answers "where is this job?" for cancel commands.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Hashable

from gateway.catalog import Catalog
from gateway.control import PendingCancels
from gateway.delays import DelayQueue
from gateway.entry import Entry
from gateway.envelope import Job, Rejection, Source, header_value, input_limits, parse_record
from gateway.history import TerminalHistory
from gateway.offsets import OffsetTracker, Ticket
from gateway.parking import Parking
from gateway.pools import Pools
from gateway.recorder import Recorder
from gateway.records import Status
from gateway.settings import Settings
from gateway.tasks import Supervisor

__all__ = ["Admission"]


class Admission:
    """Parses, holds, deduplicates and routes each record to the pools (or defers it)."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        job_types: Collection[str],
        pools: Pools,
        recorder: Recorder,
        history: TerminalHistory,
        cancels: PendingCancels,
        tracker: OffsetTracker,
        supervisor: Supervisor,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._types = job_types
        self._pools = pools
        self._recorder = recorder
        self._history = history
        self._cancels = cancels
        self._limits = input_limits(settings)
        self._paused_recheck_s = settings.control.paused_recheck_s
        self._rng = random.Random()  # noqa: S311  # spreads re-deferrals, not a secret
        topics = settings.topics
        self._jobs_topic = topics.jobs
        self._delayed_topics = frozenset({topics.retry, topics.deferred})
        self._delays: DelayQueue[Entry] = DelayQueue(self._due, supervisor)
        self.parking = Parking(
            kafka=settings.kafka,
            settings=settings.parking,
            catalog=catalog,
            tracker=tracker,
            room=pools.room,
            paused=pools.paused,
            supervisor=supervisor,
        )
        self.parking.bind(self._readmit)

    async def start(self) -> None:
        """Start the delay queue's timer and the parking's reader."""
        await self._delays.start()
        await self.parking.start()

    async def stop(self) -> None:
        """Stop the timer and the reader; held and parked records are dropped (they are
        uncommitted: redelivered)."""
        await self.parking.stop()
        await self._delays.stop()

    @property
    def held(self) -> int:
        """Retries and deferrals waiting in memory for their `not-before`."""
        return len(self._delays)

    def take(self, source: Source, ticket: Ticket, partition: Hashable) -> None:
        """Handle one consumed record."""
        if source.topic == self._jobs_topic:
            tenant = _tenant_header(source)
            if tenant is not None and self.parking.wants(tenant):
                self.parking.park(tenant, ticket, partition)
                return
        self._take(source, ticket, partition, spill=False)

    def _readmit(self, source: Source, ticket: Ticket, partition: Hashable, spill: bool) -> None:
        """A parked record read again; with `spill`, it is deferred if it finds no room."""
        try:
            self._take(source, ticket, partition, spill=spill)
        except Exception as exc:  # noqa: BLE001  # one record's failure, not the reader's
            self._recorder.failed(source, [ticket], exc)

    def _take(self, source: Source, ticket: Ticket, partition: Hashable, *, spill: bool) -> None:
        now_ms = int(time.time() * 1000)
        parsed = parse_record(
            source=source,
            catalog=self._catalog(),
            known_types=self._types,
            limits=self._limits,
            now_ms=now_ms,
        )
        if isinstance(parsed, Rejection):
            self._recorder.rejected(parsed, ticket)
            return
        entry = Entry(job=parsed, ticket=ticket, partition=partition)
        not_before = parsed.not_before_ms
        if (
            not_before is not None
            and source.topic in self._delayed_topics
            and not_before > now_ms
            and not self._cancels.covers(parsed)
        ):
            self._delays.add(not_before, entry)
            return
        self._admit(entry, may_park=source.topic == self._jobs_topic and not spill)

    def _due(self, entry: Entry) -> None:
        try:
            self._admit(entry)
        except Exception as exc:  # noqa: BLE001  # one record's failure, not the timer's
            self._recorder.failed(entry.job.source, entry.tickets, exc)

    def _admit(self, entry: Entry, *, may_park: bool = False) -> None:
        job = entry.job
        ended = self._history.get(job.key)
        # A job rejected at intake never ran: an operator's redrive (after fixing its
        # cause) is the one way to give it another chance.
        if ended is not None and not (ended is Status.REJECTED and _redriven(job)):
            self._recorder.duplicate(entry)
            return
        current = self._pools.find(job.key)
        if current is not None:
            # The same job is already queued or running: finish this record with it.
            current.followers.append(entry.ticket)
            return
        if self._cancels.covers(job):
            self._recorder.cancelled([entry], "on_arrival")
            return
        if self._pools.paused(job.tenant):
            self._recorder.deferred(entry, self._paused_delay_s())
            return
        # A retry or deferral read back and due is already in memory: it waits for room
        # in its tenant's buffer, in a line of at most `max_queued`. Sent around
        # jobs.deferred again it costs a produce, a status record and a read; but a line
        # without a cap would hold a slow tenant's records, and with them the partitions
        # other tenants' retries and deferrals share, until it worked them off.
        may_wait = job.source.topic in self._delayed_topics
        if self._pools.submit(entry, may_wait=may_wait):
            return
        if may_park and self.parking.can_park():
            self.parking.park(job.tenant, entry.ticket, entry.partition)
        else:
            self._recorder.deferred(entry, self._pools.book_deferral(job.tenant))

    def cancel(self, key: tuple[str, str]) -> str:
        """Cancel a job by (tenant, id) wherever this replica holds it; say where.

        `running`: its flow is being cancelled; `queued` or `delayed` (a retry or
        deferral waiting for its time): it never starts, `cancelled` is recorded now;
        `pending`: not held here, so the request is remembered and wins on arrival.
        The request is remembered in every case, for redeliveries of the same job.
        """
        self._cancels.add(key)
        entry = self._pools.cancel(key)
        if entry is not None:
            if entry.task is not None:
                return "running"
            self._recorder.cancelled([entry], "queued")
            return "queued"
        held = self._delays.remove(lambda e: e.job.key == key)
        if held:
            self._recorder.cancelled(held, "delayed")
            return "delayed"
        return "pending"

    def _paused_delay_s(self) -> float:
        # A paused tenant's jobs go around jobs.deferred until it is resumed; spread,
        # so a large backlog does not come back in one wave.
        return self._paused_recheck_s * (0.5 + self._rng.random())

    def pause(self, tenant: str) -> int:
        """Start none of the tenant's jobs: its buffered ones are deferred (never
        dead-lettered), running ones finish. Returns how many were deferred."""
        entries = self._pools.pause(tenant)
        for entry in entries:
            self._recorder.deferred(entry, self._paused_delay_s())
        self.parking.expire(tenant)
        return len(entries)

    def resume(self, tenant: str) -> None:
        """Start the tenant's jobs again; its retries and deferrals held here come now."""
        self._pools.resume(tenant)
        for entry in self._delays.remove(lambda e: e.job.tenant == tenant):
            self._due(entry)

    def cancel_all(self, tenant: str, job_type: str | None, requested_at: float) -> int:
        """Cancel every job of the tenant (of `job_type`) held here, and those whose
        records were written before `requested_at` when they arrive. Returns how many
        were held here."""
        self._cancels.add_bulk(tenant, job_type, requested_at)

        def matches(entry: Entry) -> bool:
            job = entry.job
            return job.tenant == tenant and job_type in (None, job.type)

        queued = self._pools.cancel_matching(matches)
        for entry in queued:
            self._recorder.cancelled([entry], "queued")
        held = self._delays.remove(matches)
        for entry in held:
            self._recorder.cancelled([entry], "delayed")
        running = sum(1 for _ in self._pools.running_matching(matches))
        return len(queued) + len(held) + running

    def revoke(self, partitions: set[Hashable]) -> None:
        """Forget held and parked records of partitions this replica no longer owns."""
        self._delays.remove(lambda e: e.partition in partitions)
        self.parking.revoke(partitions)


def _tenant_header(source: Source) -> str | None:
    """The record's one `tenant` header as text, or None (parsing will say what is wrong)."""
    values = header_value(source.headers, "tenant")
    if len(values) != 1 or not values[0]:
        return None
    try:
        return values[0].decode()
    except UnicodeDecodeError:
        return None


def _redriven(job: Job) -> bool:
    return bool(header_value(job.source.headers, "redriven-from"))
