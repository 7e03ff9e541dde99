"""Kafka intake: the consumer, its fetch loop, memory bounds, commits and rebalances.

One consumer in the group reads `jobs`, `jobs.retry` and `jobs.deferred`. Each record
is tracked by the offset tracker and handed to admission; whatever happens to it, its
ticket is finished by the recorder once its outcome is on the broker, and a partition
commits only past a contiguous run of finished records (invariant 4). Handling one
record can never stop the loop: an unexpected error dead-letters that record
(`internal_error`) and the next one is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from gateway.admission import Admission
from gateway.collectors import LagFigure
from gateway.envelope import DlqReason, Rejection, Source
from gateway.kafka import record_size, source_of, stop_consumer
from gateway.metrics import Metrics
from gateway.offsets import OffsetTracker
from gateway.pools import Pools
from gateway.recorder import Recorder
from gateway.settings import Settings
from gateway.tasks import Supervisor

__all__ = ["Intake"]

log = logging.getLogger("gateway.intake")


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
        tracker: OffsetTracker,
        admission: Admission,
        recorder: Recorder,
        pools: Pools,
        supervisor: Supervisor,
        metrics: Metrics | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        # True once this replica must commit nothing more (it slept through its session).
        self._fence = fence
        self.tracker = tracker
        self._admission = admission
        self._recorder = recorder
        self._pools = pools
        self._supervisor = supervisor
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._commit_lock = asyncio.Lock()
        self._delayed_paused: set[TopicPartition] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._assigned: set[TopicPartition] = set()
        self._paused = False
        topics = settings.topics
        self._delayed_topics = {topics.retry, topics.deferred}
        self._on_assignment: Callable[[set[TopicPartition]], None] | None = None
        # Set while fetching fails with something other than a broker error.
        self.fetch_problem: str | None = None

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
        self._loop_task = self._supervisor.spawn(self._fetch_loop(), "gateway:intake")
        self._commit_task = self._supervisor.spawn(self._commit_loop(), "gateway:commits")

    async def stop_fetching(self) -> None:
        """Stop taking records (and committing periodically)."""
        for attr in ("_loop_task", "_commit_task"):
            task = getattr(self, attr)
            setattr(self, attr, None)
            await self._supervisor.cancel(task)

    async def close(self) -> None:
        """Leave the group and close the consumer (commit first); idempotent."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)

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
            except Exception as exc:  # noqa: BLE001  # the client could not decode a record
                if await self._skip_undecodable(consumer, exc):
                    continue
                # Not found: say so loudly (readiness too) and keep trying rather than
                # exit into a restart loop.
                self.fetch_problem = type(exc).__name__
                log.error("fetch_failed", extra={"error": self.fetch_problem})
                await asyncio.sleep(1.0)
                continue
            self.fetch_problem = None
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

    async def _skip_undecodable(self, consumer: AIOKafkaConsumer, error: Exception) -> bool:
        """Find the record the Kafka client cannot decode, dead-letter it by its position,
        and read on past it; False when none was found.

        The client decodes header names as UTF-8 inside the fetch, so a record with one
        that is not raises there and names no record. Each assigned partition with
        records left below its high watermark is read a record at a time (records before
        the bad one are taken as usual) until the read fails: the partition's position is
        then the bad record's offset."""
        paused = consumer.paused()
        for tp in sorted(self._assigned, key=str):
            while tp not in paused:
                highwater = consumer.highwater(tp)
                if highwater is None or await consumer.position(tp) >= highwater:
                    break  # nothing fetched beyond what was read
                try:
                    # The failed fetch is fetched again: wait for it.
                    batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
                except KafkaError:
                    return False
                except Exception:  # noqa: BLE001  # this partition holds it
                    offset = await consumer.position(tp)
                    self._reject_unreadable(tp, offset, error)
                    consumer.seek(tp, offset + 1)
                    return True
                records = batch.get(tp, [])
                if not records:
                    break
                for record in records:
                    self._take(tp, record)
        return False

    def _reject_unreadable(self, tp: TopicPartition, offset: int, error: Exception) -> None:
        """Dead-letter a record known only by its position (`invalid_headers`)."""
        ticket = self.tracker.track(tp, offset, 0)
        source = Source(tp.topic, tp.partition, offset, None, (), int(time.time() * 1000))
        detail = (
            f"the Kafka client could not decode the record ({type(error).__name__}: a header"
            " name that is not UTF-8); its value and headers could not be read"
        )
        log.error(
            "record_unreadable",
            extra={"partition": str(tp), "offset": offset, "error": type(error).__name__},
        )
        self._recorder.rejected(Rejection(DlqReason.INVALID_HEADERS, detail, source), ticket)

    def _take(self, tp: TopicPartition, record: Any) -> None:
        ticket = self.tracker.track(tp, record.offset, record_size(record))
        source = source_of(record)
        try:
            self._admission.take(source, ticket, tp)
        except Exception as exc:  # noqa: BLE001  # one record's failure, never the loop's
            self._recorder.failed(source, [ticket], exc)

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
            if self._fence is not None and self._fence():
                log.error("commit_fenced", extra={"partitions": len(due)})
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
        self._admission.revoke(set(revoked))
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
