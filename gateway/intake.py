"""Kafka intake: consume jobs, retries and deferrals; track offsets; commit behind finished work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from gateway.catalog import Catalog
from gateway.collectors import LagFigure
from gateway.control import PendingCancels
from gateway.delays import DelayQueue
from gateway.envelope import Rejection, Source, parse_record
from gateway.errors import ProduceError
from gateway.flows import JobTypes
from gateway.history import TerminalHistory
from gateway.metrics import Metrics
from gateway.observability import job_log
from gateway.offsets import OffsetTracker, Ticket
from gateway.outcomes import cancelled_records, rejection_records
from gateway.pools import Entry, Pools
from gateway.publisher import Publisher
from gateway.records import OutRecord, Status, delayed_record, status_record
from gateway.settings import Settings
from gateway.tasks import cancel_and_wait

__all__ = ["Intake"]

log = logging.getLogger("gateway.intake")

# Records (and bytes of values) per produce round of the side outbox (DLQ, deferrals,
# cancels); one round is acknowledged within `produce_timeout_s` or the gateway stops.
_OUTBOX_BATCH = 5000
_OUTBOX_BATCH_BYTES = 8 * 1024 * 1024


def _over_bound(paused: bool, count: int, size: int, max_count: int, max_bytes: int) -> bool:
    """Whether records in memory are over a bound: either the count or the bytes reach
    it; once over, they stay over until both are back under 80% of it (hysteresis)."""
    if paused:
        return count >= max_count * 0.8 or size >= max_bytes * 0.8
    return count >= max_count or size >= max_bytes


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._intake.on_assigned(set(assigned))


class Intake:
    """One consumer in the group over `jobs`, `jobs.retry` and `jobs.deferred`."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Callable[[], Catalog],
        job_types: JobTypes,
        publisher: Publisher,
        pools: Pools,
        history: TerminalHistory,
        fatal: Callable[[BaseException], None],
        cancels: PendingCancels | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._types = job_types
        self._publisher = publisher
        self._pools = pools
        self._history = history
        self._fatal = fatal
        self._metrics = metrics
        # Cancels for jobs not held yet, shared with the control listener; without one
        # (no control plane), a stand-in that remembers next to nothing.
        self._cancels = cancels if cancels is not None else PendingCancels(1, 1.0)
        self.tracker = OffsetTracker()
        self._delays: DelayQueue[Entry] = DelayQueue(self._due)
        self._consumer: AIOKafkaConsumer | None = None
        self._commit_lock = asyncio.Lock()
        # DLQ, deferral and cancel records wait here for one sender task: thousands of
        # concurrent senders make aiokafka's accumulator wake every waiter per batch.
        self._outbox: deque[tuple[list[OutRecord], list[Ticket]]] = deque()
        self._outbox_wake = asyncio.Event()
        self._outbox_idle = asyncio.Event()
        self._outbox_idle.set()
        self._outbox_task: asyncio.Task[None] | None = None
        self._delayed_paused: set[TopicPartition] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._assigned: set[TopicPartition] = set()
        self._paused = False
        topics = settings.topics
        self._delayed_topics = {topics.retry, topics.deferred}
        self._on_assignment: Callable[[set[TopicPartition]], None] | None = None

    def on_assignment(self, callback: Callable[[set[TopicPartition]], None]) -> None:
        """Call `callback(assigned)` after every rebalance (quota shares follow it)."""
        self._on_assignment = callback

    @property
    def assigned(self) -> set[TopicPartition]:
        """Partitions this replica owns now."""
        return set(self._assigned)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Join the group and start fetching."""
        kafka = self._settings.kafka
        topics = self._settings.topics
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=kafka.group_id,
            client_id=f"{kafka.client_id}-intake",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            max_poll_records=kafka.max_poll_records,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            rebalance_timeout_ms=kafka.rebalance_timeout_ms,
            request_timeout_ms=kafka.request_timeout_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        consumer.subscribe([topics.jobs, topics.retry, topics.deferred], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        await self._delays.start()
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="gateway:intake")
        self._commit_task = asyncio.create_task(self._commit_loop(), name="gateway:commits")

    async def stop_fetching(self) -> None:
        """Stop taking records; held delayed records are dropped (redelivered later)."""
        for attr in ("_loop_task", "_commit_task"):
            task = getattr(self, attr)
            setattr(self, attr, None)
            await cancel_and_wait(task)
        await self._delays.stop()

    async def drain_side_tasks(self, timeout_s: float) -> None:
        """Wait (bounded) for DLQ, deferral and cancel publishes already queued."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox_idle.wait(), timeout_s)

    async def close(self) -> None:
        """Commit what is finished and leave the group; idempotent."""
        consumer = self._consumer
        if consumer is None:
            return
        await self.commit()
        sender, self._outbox_task = self._outbox_task, None
        if sender is not None:
            sender.cancel()
            await asyncio.wait({sender}, timeout=5.0)
        self._consumer = None
        await consumer.stop()

    # -- fetching ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                # Short while paused: the resume check below must run soon after
                # running jobs drain the backlog.
                paused = self._paused or self._delayed_paused
                batches = await consumer.getmany(timeout_ms=50 if paused else 500)
            except KafkaError as exc:
                log.warning("fetch_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                if tp not in self._assigned:
                    continue
                for record in records:
                    self._take(tp, record)
            self._backpressure(consumer)

    def _backpressure(self, consumer: AIOKafkaConsumer) -> None:
        """Memory bounds, a last resort (tenants' buffers overflow to jobs.deferred first).

        Unfinished records count by number (`max_buffered`) and by bytes
        (`max_buffered_bytes`), whichever is reached first. Retries and deferrals read
        back early wait in memory for their `not-before`: each partition of jobs.retry
        and jobs.deferred may hold its share of both bounds, and past it that partition
        alone pauses until its records are worked off, so the others keep delivering
        what is due (one partition read far ahead must not hide another's due records).
        Fresh jobs count against the bounds on their own; past them `jobs` pauses.
        """
        settings = self._settings
        tracker = self.tracker
        delayed = {tp for tp in self._assigned if tp.topic in self._delayed_topics}
        if delayed:
            count_share = max(1, settings.max_buffered // len(delayed))
            bytes_share = max(1, settings.max_buffered_bytes // len(delayed))
            for tp in delayed:
                held, size = tracker.in_flight(tp), tracker.in_flight_bytes(tp)
                was_paused = tp in self._delayed_paused
                if _over_bound(was_paused, held, size, count_share, bytes_share) == was_paused:
                    continue
                extra = {"partition": str(tp), "held": held, "bytes": size}
                if was_paused:
                    consumer.resume(tp)
                    self._delayed_paused.discard(tp)
                    log.info("delayed_intake_resumed", extra=extra)
                else:
                    consumer.pause(tp)
                    self._delayed_paused.add(tp)
                    log.info("delayed_intake_paused", extra=extra)
        fresh = self._assigned - delayed
        outstanding = sum(tracker.in_flight(tp) for tp in fresh)
        size = sum(tracker.in_flight_bytes(tp) for tp in fresh)
        over = _over_bound(
            self._paused, outstanding, size, settings.max_buffered, settings.max_buffered_bytes
        )
        if over == self._paused:
            return
        self._paused = over
        if over:
            consumer.pause(*fresh)
            log.warning("intake_paused", extra={"outstanding": outstanding, "bytes": size})
        else:
            consumer.resume(*fresh)
            log.info("intake_resumed", extra={"outstanding": outstanding, "bytes": size})

    def _take(self, tp: TopicPartition, record: Any) -> None:
        size = len(record.value or b"") + len(record.key or b"")
        ticket = self.tracker.track(tp, record.offset, size)
        source = Source(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp or 0,
        )
        parsed = parse_record(
            source=source,
            catalog=self._catalog(),
            known_types=self._types,
            max_payload_bytes=self._settings.max_payload_bytes,
        )
        if isinstance(parsed, Rejection):
            self._reject(parsed, ticket)
            return
        entry = Entry(job=parsed, ticket=ticket, partition=tp)
        not_before = parsed.not_before_ms
        if (
            not_before is not None
            and record.topic in self._delayed_topics
            and not_before > time.time() * 1000
            and entry.job.key not in self._cancels
        ):
            self._delays.add(not_before, entry)
            return
        self._admit(entry)

    def _due(self, entry: Entry) -> None:
        if entry.partition in self._assigned:
            self._admit(entry)

    def _back_from_deferral(self, entry: Entry) -> None:
        # Counted when due, not when read back: the tenant's deferred backlog paces
        # further deferrals, and records read early but still waiting are part of it.
        if entry.job.source.topic == self._settings.topics.deferred:
            self._pools.deferred_returned(entry.job.tenant)

    def _admit(self, entry: Entry) -> None:
        job = entry.job
        self._back_from_deferral(entry)
        if self._history.get(job.key) is not None:
            job_log(log, logging.INFO, "duplicate_skipped", job)
            self._finish_ticket(entry.ticket)
            return
        current = self._pools.find(job.key)
        if current is not None:
            # The same job is already queued or running: finish this record with it.
            current.followers.append(entry.ticket)
            return
        if job.key in self._cancels:
            self._finish_cancelled([entry], "on_arrival")
            return
        # A retry or deferral read back and due is already in memory: it waits for room
        # in its tenant's buffer, in a line of at most `max_queued`. Sent around
        # jobs.deferred again it costs a produce, a status record and a read, and under
        # a flood such bounces outnumbered the jobs many times over; but a line without
        # a cap would hold a slow tenant's records, and with them the partitions other
        # tenants' retries and deferrals share, until it worked them off.
        may_wait = job.source.topic in self._delayed_topics
        if not self._pools.submit(entry, may_wait=may_wait):
            self._defer(entry)

    # -- cancellation ----------------------------------------------------------

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
            self._finish_cancelled([entry], "queued")
            return "queued"
        held = self._delays.remove(lambda e: e.job.key == key)
        for entry in held:
            self._back_from_deferral(entry)
        if held:
            self._finish_cancelled(held, "delayed")
            return "delayed"
        return "pending"

    def _finish_cancelled(self, entries: list[Entry], where: str) -> None:
        job = entries[0].job
        records = cancelled_records(job, topics=self._settings.topics, at=time.time())
        self._history.remember(job.key, Status.CANCELLED)
        job_log(log, logging.INFO, "job_cancelled", job, where=where)
        if self._metrics is not None:
            self._metrics.jobs.labels(job.tenant, job.type, Status.CANCELLED.value).inc()
        tickets = [t for e in entries for t in (e.ticket, *e.followers)]
        self._publish_then_finish(records, tickets)

    # -- outcomes that do not run a flow ---------------------------------------

    def _reject(self, rejection: Rejection, ticket: Ticket) -> None:
        log.info(
            "job_rejected",
            extra={
                "reason": rejection.reason.value,
                "tenant": rejection.tenant,
                "job_id": rejection.job_id,
                "topic": rejection.source.topic,
                "partition": rejection.source.partition,
                "offset": rejection.source.offset,
            },
        )
        if self._metrics is not None:
            self._metrics.dlq.labels(rejection.reason.value).inc()
        records = rejection_records(rejection, topics=self._settings.topics, at=time.time())
        self._publish_then_finish(records, [ticket])

    def _defer(self, entry: Entry) -> None:
        job = entry.job
        topics = self._settings.topics
        if self._catalog().get(job.tenant) is None:
            # Removed from the catalog since parsing: the DLQ owns it now.
            parsed = parse_record(
                source=job.source,
                catalog=self._catalog(),
                known_types=self._types,
                max_payload_bytes=self._settings.max_payload_bytes,
            )
            if isinstance(parsed, Rejection):
                self._reject(parsed, entry.ticket)
                return
        now = time.time()
        delay = self._pools.defer_delay_s(job.tenant)
        if self._metrics is not None:
            self._metrics.deferrals.labels(job.tenant).inc()
        records = [
            delayed_record(
                topics.deferred, job, attempt=job.attempt, not_before_ms=int((now + delay) * 1000)
            ),
            status_record(
                topics.status,
                tenant=job.tenant,
                job_id=job.id,
                status=Status.DEFERRED,
                attempt=job.attempt,
                at=now,
            ),
        ]
        job_log(log, logging.DEBUG, "job_deferred", job, delay_s=round(delay, 3))
        self._publish_then_finish(records, [entry.ticket, *entry.followers])

    def _publish_then_finish(self, records: list[OutRecord], tickets: list[Ticket]) -> None:
        """Queue records for the sender; their tickets finish once the broker has them."""
        self._outbox.append((records, tickets))
        self._outbox_idle.clear()
        self._outbox_wake.set()
        if self._outbox_task is None or self._outbox_task.done():
            self._outbox_task = asyncio.create_task(self._send_outbox(), name="gateway:outbox")

    async def _send_outbox(self) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                self._outbox_idle.set()
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
                continue
            batch: list[tuple[list[OutRecord], list[Ticket]]] = []
            count = size = 0
            while outbox and count < _OUTBOX_BATCH and size < _OUTBOX_BATCH_BYTES:
                item = outbox.popleft()
                batch.append(item)
                count += len(item[0])
                size += sum(len(r.value or b"") for r in item[0])
            try:
                await self._publisher.send([r for records, _ in batch for r in records])
            except ProduceError as exc:
                log.error("outcome_not_recorded", extra={"error": exc.code})
                self._fatal(exc)
                return
            for _, tickets in batch:
                for ticket in tickets:
                    self._finish_ticket(ticket)

    def finish_entry(self, entry: Entry) -> None:
        """A job's outcome is acknowledged: its record (and duplicates of it) are finished."""
        self._finish_ticket(entry.ticket)
        for ticket in entry.followers:
            self._finish_ticket(ticket)

    def _finish_ticket(self, ticket: Ticket) -> None:
        self.tracker.finish(ticket)

    # -- commits and rebalances ------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._settings.kafka.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.commit()

    async def commit(self, partitions: set[Hashable] | None = None) -> None:
        """Commit every partition whose finished run moved; shielded, under a lock."""
        consumer = self._consumer
        if consumer is None:
            return
        async with self._commit_lock:
            due = self.tracker.due_commits(partitions)
            if not due:
                return
            offsets = {tp: OffsetAndMetadata(offset, "") for tp, offset in due.items()}
            began = time.perf_counter()
            try:
                await asyncio.shield(consumer.commit(offsets))
            except (CommitFailedError, KafkaError) as exc:
                log.warning("commit_failed", extra={"error": type(exc).__name__})
                if self._metrics is not None:
                    self._metrics.commit_failures.inc()
                return
            if self._metrics is not None:
                self._metrics.commit_duration.observe(time.perf_counter() - began)
            self.tracker.mark_committed(due)

    def lag(self) -> list[LagFigure]:
        """Per assigned partition: the log end (as of the last fetch) minus the commit point.

        Counts from the first record this replica saw of the partition; before that, and
        before the first fetch, a partition reports nothing.
        """
        consumer = self._consumer
        if consumer is None:
            return []
        figures = []
        for tp in sorted(self._assigned, key=lambda t: (t.topic, t.partition)):
            end = consumer.highwater(tp)
            point = self.tracker.commit_point(tp)
            if end is not None and point is not None:
                figures.append(LagFigure(tp.topic, tp.partition, max(0, end - point)))
        return figures

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop admitting, give running jobs a bounded time, commit, forget."""
        if not revoked:
            return
        self._assigned -= revoked
        self._delayed_paused -= revoked
        for entry in self._delays.remove(lambda e: e.partition in revoked):
            self._back_from_deferral(entry)
        grace = min(self._settings.shutdown_grace_s, self._settings.kafka.session_timeout_ms / 2000)
        await self._pools.revoke(set(revoked), grace)
        await self.commit(set(revoked))
        for tp in revoked:
            self.tracker.revoke(tp)
        log.info("partitions_revoked", extra={"partitions": sorted(map(str, revoked))})

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Track new partitions; the consumer resumes them from the committed offset."""
        for tp in assigned:
            self.tracker.assign(tp)
        self._assigned |= assigned
        if self._paused and self._consumer is not None:
            fresh = {tp for tp in assigned if tp.topic not in self._delayed_topics}
            self._consumer.pause(*fresh)
        if self._on_assignment is not None:
            self._on_assignment(set(self._assigned))
        log.info("partitions_assigned", extra={"partitions": sorted(map(str, self._assigned))})
