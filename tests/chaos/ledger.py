"""The ledger: every job produced must end with exactly one terminal result.

* `ResultTail` follows `jobs.results` from the start in the background (through the
  proxy, so it too waits out a fault) and tells when every produced job has a result.
* `read_all` reads a topic from the start up to its end offsets as of the call: the
  final ledger is read once every replica has stopped, so every result that will ever
  be written is there.
* `Ledger` compares what was produced with the results and the DLQ: lost jobs,
  duplicate results, statuses by job type, results for ids never produced, DLQ reasons,
  and the timing figures (first result written after a heal, the last result, the
  longest stretch without any result).
* `OffsetWatch` samples the group's committed offsets and notes any that go backwards
  (a replica committing behind the partition's new owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.kafka import stop_consumer
from gateway.settings import Settings

from .load import JobSpec

__all__ = [
    "TERMINAL",
    "Ledger",
    "OffsetWatch",
    "ResultInfo",
    "ResultTail",
    "build_ledger",
    "read_all",
]

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "rejected"})


@dataclass(frozen=True, slots=True)
class ResultInfo:
    id: str
    tenant: str
    type: str | None
    status: str
    error: str | None
    attempts: int
    started_at: float | None  # epoch seconds
    finished_at: float | None
    ts_ms: int  # the record's timestamp (set by the producing replica)


def _epoch(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def parse_result(record: Any) -> ResultInfo | None:
    try:
        body = json.loads(record.value)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict) or "id" not in body:
        return None
    error = body.get("error")
    return ResultInfo(
        id=str(body["id"]),
        tenant=str(body.get("tenant")),
        type=body.get("type"),
        status=str(body.get("status")),
        error=error.get("code") if isinstance(error, dict) else None,
        attempts=int(body.get("attempts") or 0),
        started_at=_epoch(body.get("started_at")),
        finished_at=_epoch(body.get("finished_at")),
        ts_ms=int(record.timestamp or 0),
    )


def _consumer(settings: Settings, **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **extra,
    )


async def read_all(settings: Settings, topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every record of `topic` from the start to its end offsets as of now (bounded)."""
    consumer = _consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return records
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for batch in batches.values():
                records.extend(batch)
        raise TimeoutError(f"{topic}: not read to its end within {timeout_s}s")
    finally:
        await stop_consumer(consumer)


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a helper's task and wait until it has ended (None: nothing to do)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Background:
    """A harness helper's loop in a task, and the consumer it reads (if any): `stop`
    ends both."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    def _launch(
        self, run: Coroutine[Any, Any, None], name: str, consumer: AIOKafkaConsumer | None = None
    ) -> None:
        self._consumer = consumer
        self._task = asyncio.create_task(run, name=name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None


class ResultTail(Background):
    """Follows `jobs.results` in the background: which job ids have a result, and when
    (by record timestamp) results were written."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.seen: Counter[str] = Counter()
        self.stamps: list[int] = []  # record timestamps (ms), in arrival order
        self.errors = 0

    async def start(self) -> None:
        topic = self.settings.topics.results
        consumer = _consumer(self.settings, group_id=None)
        await consumer.start()
        await consumer.topics()
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._launch(self._run(consumer), "chaos-result-tail", consumer)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            except KafkaError:
                self.errors += 1
                await asyncio.sleep(0.2)
                continue
            for batch in batches.values():
                for record in batch:
                    info = parse_result(record)
                    if info is not None:
                        self.seen[info.id] += 1
                        self.stamps.append(info.ts_ms)

    def count(self) -> int:
        return sum(self.seen.values())

    def missing(self, ids: set[str] | dict[str, Any]) -> int:
        return sum(1 for job_id in ids if job_id not in self.seen)

    async def wait_count(self, count: int, timeout_s: float) -> bool:
        """Until at least `count` results were read (any ids); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.count() < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def wait_all(
        self, ids: set[str] | dict[str, Any], timeout_s: float, stall_s: float | None = None
    ) -> bool:
        """Until every id has a result; False on timeout, or once no result at all came
        for `stall_s` while some are missing (the cluster stalled)."""
        deadline = time.monotonic() + timeout_s
        last_count, last_progress = self.count(), time.monotonic()
        while self.missing(ids):
            now = time.monotonic()
            if now > deadline:
                return False
            if self.count() != last_count:
                last_count, last_progress = self.count(), now
            elif stall_s is not None and now - last_progress > stall_s:
                return False
            await asyncio.sleep(0.25)
        return True

    def rate(self, window_s: float = 5.0) -> float:
        """Results per second written over the last `window_s` (by record timestamp)."""
        now_ms = time.time() * 1000
        recent = [s for s in self.stamps[-20000:] if s >= now_ms - window_s * 1000]
        return len(recent) / window_s


@dataclass
class Ledger:
    """Produced jobs against the results and dead letters."""

    produced: int
    results: dict[str, list[ResultInfo]]
    lost: list[str]
    duplicate_ids: list[str]
    duplicates: int  # results beyond the first, over all jobs
    unknown: int  # results for ids never (acknowledged as) produced
    nonterminal: int  # results whose status is not terminal
    statuses: Counter[tuple[str, str]]  # (type, status)
    errors: Counter[str]  # error codes of non-succeeded results
    dlq: Counter[str]  # DLQ reasons
    dlq_records: int
    stamps_ms: list[int] = field(default_factory=list)  # every result's record timestamp

    def summary(self) -> dict[str, Any]:
        return {
            "produced": self.produced,
            "results": sum(len(v) for v in self.results.values()),
            "lost": len(self.lost),
            "lost_sample": self.lost[:10],
            "duplicates": self.duplicates,
            "duplicate_sample": self.duplicate_ids[:10],
            "unknown_results": self.unknown,
            "nonterminal_results": self.nonterminal,
            "statuses": {f"{t}:{s}": n for (t, s), n in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "dlq": dict(self.dlq),
        }

    def first_after(self, at: float) -> float | None:
        """Seconds from `at` (epoch) to the first result written at or after it."""
        later = [s for s in self.stamps_ms if s >= at * 1000]
        return (min(later) / 1000 - at) if later else None

    def last_after(self, at: float) -> float | None:
        """Seconds from `at` (epoch) to the last result written."""
        if not self.stamps_ms:
            return None
        return max(0.0, max(self.stamps_ms) / 1000 - at)

    def longest_gap(self, since: float, until: float | None = None) -> float:
        """The longest stretch (s) within [since, until] with no result written."""
        stamps = sorted(s / 1000 for s in self.stamps_ms if s >= since * 1000)
        if until is not None:
            stamps = [s for s in stamps if s <= until]
        points = [since, *stamps]
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def build_ledger(
    produced: dict[str, JobSpec], result_records: list[Any], dlq_records: list[Any]
) -> Ledger:
    results: dict[str, list[ResultInfo]] = {}
    stamps = []
    nonterminal = 0
    for record in result_records:
        info = parse_result(record)
        if info is None:
            nonterminal += 1
            continue
        results.setdefault(info.id, []).append(info)
        stamps.append(info.ts_ms)
        if info.status not in TERMINAL:
            nonterminal += 1
    lost = sorted(job_id for job_id in produced if job_id not in results)
    duplicate_ids = sorted(job_id for job_id, found in results.items() if len(found) > 1)
    duplicates = sum(len(results[job_id]) - 1 for job_id in duplicate_ids)
    unknown = sum(len(found) for job_id, found in results.items() if job_id not in produced)
    statuses: Counter[tuple[str, str]] = Counter()
    errors: Counter[str] = Counter()
    for job_id, found in results.items():
        spec = produced.get(job_id)
        for info in found:
            statuses[(spec.type if spec else str(info.type), info.status)] += 1
            if info.status != "succeeded":
                errors[str(info.error)] += 1
    dlq: Counter[str] = Counter()
    for record in dlq_records:
        headers = dict(record.headers or ())
        reason = headers.get("dlq-reason", b"?")
        dlq[reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)] += 1
    return Ledger(
        produced=len(produced),
        results=results,
        lost=lost,
        duplicate_ids=duplicate_ids,
        duplicates=duplicates,
        unknown=unknown,
        nonterminal=nonterminal,
        statuses=statuses,
        errors=errors,
        dlq=dlq,
        dlq_records=len(dlq_records),
        stamps_ms=stamps,
    )


class OffsetWatch(Background):
    """Samples the group's committed offsets of the input topics; notes regressions."""

    def __init__(self, settings: Settings, interval_s: float = 0.5) -> None:
        super().__init__()
        self.settings = settings
        self.interval_s = interval_s
        self.last: dict[TopicPartition, int] = {}
        self.regressions: list[tuple[float, str, int, int]] = []  # (at, tp, before, after)
        self.samples = 0

    async def start(self) -> None:
        consumer = _consumer(self.settings, group_id=self.settings.kafka.group_id)
        await consumer.start()
        self._launch(self._run(consumer), "chaos-offset-watch", consumer)

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        topics = self.settings.topics
        partitions: list[TopicPartition] = []
        while True:
            try:
                if not partitions:
                    await consumer.topics()
                    partitions = [
                        TopicPartition(topic, p)
                        for topic in (topics.jobs, topics.retry, topics.deferred)
                        for p in sorted(consumer.partitions_for_topic(topic) or ())
                    ]
                for tp in partitions:
                    offset = await asyncio.wait_for(consumer.committed(tp), 5.0)
                    if offset is None:
                        continue
                    before = self.last.get(tp)
                    if before is not None and offset < before:
                        self.regressions.append(
                            (time.time(), f"{tp.topic}/{tp.partition}", before, offset)
                        )
                    self.last[tp] = offset
                self.samples += 1
            except (KafkaError, TimeoutError, OSError):
                pass
            await asyncio.sleep(self.interval_s)
