"""The dead-letter queue for operators: how deep it is, what is in it, sending it back.

- `DlqIndex` reads `jobs.dlq` from the beginning and counts its records by reason, and
  reads the `redriven` marks on `jobs.control`, so it knows which records went back:
  `pending` is the DLQ's depth that still needs attention.
- `DlqBrowser.page` reads a page of records matching a filter, from a cursor (the next
  offset of each partition), bounded in records scanned per call; each entry carries
  a preview of the value cut at 1 KiB.
- `DlqBrowser.redrive` sends matching records back to `jobs` with their original
  headers plus `redriven-from`, paced, capped, each record at most once: a `redriven`
  mark goes to `jobs.control` (acknowledged) before the record itself, and records
  already marked are skipped. A DLQ copy that was cut to fit is never redriven (its
  value is not the original one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.control import Command, ControlListener, RedrivenMark
from gateway.envelope import header_value, valid_id
from gateway.kafka import groupless_consumer, stop_consumer
from gateway.records import OutRecord, admin_record, rfc3339
from gateway.settings import Settings
from gateway.tasks import Supervisor
from gateway.topicreader import Batches, TopicReader

__all__ = ["DlqBrowser", "DlqEntry", "DlqFilter", "DlqIndex", "RedrivePlan"]

log = logging.getLogger("gateway.ops")

PREVIEW_BYTES = 1024
# Records read per page request at most, whatever matched: a page is never unbounded.
_SCAN_PER_PAGE = 20_000
_SCAN_PER_REDRIVE = 200_000
# Redriven marks remembered (the oldest go past this).
_MAX_MARKS = 1_000_000
_DLQ_HEADERS = frozenset(
    {"dlq-reason", "dlq-detail", "source-topic", "source-partition", "source-offset"}
)
_NOT_COPIED = _DLQ_HEADERS | {"attempt", "not-before", "redriven-from"}


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


def _first(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    values = header_value(headers, name)
    return values[0] if values else None


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which DLQ records an operator means (every field optional)."""

    tenant: str | None = None
    reason: str | None = None
    ids: frozenset[str] | None = None

    def matches(self, entry: DlqEntry) -> bool:
        """Whether an entry is one of them."""
        if self.tenant is not None and entry.tenant != self.tenant:
            return False
        if self.reason is not None and entry.reason != self.reason:
            return False
        return self.ids is None or entry.job_id in self.ids


@dataclass(frozen=True, slots=True)
class DlqEntry:
    """One DLQ record as operators see it (and what a redrive needs of it)."""

    partition: int
    offset: int
    tenant: str | None
    job_id: str | None
    reason: str
    detail: str
    source: dict[str, Any]
    size: int
    time: str
    truncated: bool
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @classmethod
    def of(cls, record: Any) -> DlqEntry:
        """Read a consumed `jobs.dlq` record."""
        headers = tuple(record.headers or ())
        detail = _text(_first(headers, "dlq-detail"))
        tenant = _text(_first(headers, "tenant")) or None
        job_id = _text(_first(headers, "job-id")) or None
        if job_id is None and record.value is not None and len(record.value) <= 65_536:
            with contextlib.suppress(ValueError, RecursionError):
                body = json.loads(record.value)
                if isinstance(body, dict) and valid_id(body.get("id")):
                    job_id = body["id"]
        source_partition = _text(_first(headers, "source-partition"))
        source_offset = _text(_first(headers, "source-offset"))
        return cls(
            partition=record.partition,
            offset=record.offset,
            tenant=tenant,
            job_id=job_id,
            reason=_text(_first(headers, "dlq-reason")) or "unknown",
            detail=detail,
            source={
                "topic": _text(_first(headers, "source-topic")),
                "partition": int(source_partition) if source_partition.isdigit() else None,
                "offset": int(source_offset) if source_offset.isdigit() else None,
            },
            size=len(record.value or b""),
            time=rfc3339((record.timestamp or 0) / 1000),
            truncated="truncated" in detail or "dropped" in detail,
            value=record.value,
            headers=headers,
        )

    def view(self, redriven: bool) -> dict[str, Any]:
        """The JSON an operator gets: everything but the full value (1 KiB preview)."""
        return {
            "partition": self.partition,
            "offset": self.offset,
            "tenant": self.tenant,
            "job_id": self.job_id,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "size": self.size,
            "time": self.time,
            "preview": _text((self.value or b"")[:PREVIEW_BYTES]),
            "truncated": self.truncated,
            "redriven": redriven,
        }


class DlqIndex:
    """Counts of `jobs.dlq` records by reason, and which of them went back to `jobs`."""

    def __init__(self, settings: Settings, supervisor: Supervisor) -> None:
        self._reader = TopicReader(
            settings.kafka,
            [settings.topics.dlq],
            name="dlq-index",
            handle=self._count,
            max_records=2000,
            logger=log,
            supervisor=supervisor,
        )
        self._marks = ControlListener(
            settings.kafka,
            settings.topics.control,
            settings.control.cancel_ttl_s,
            self._mark,
            supervisor,
            name="redrive-marks",
        )
        self.records: Counter[str] = Counter()
        self.redriven_by_reason: Counter[str] = Counter()
        self._redriven: dict[tuple[int, int], None] = {}  # insertion-ordered, bounded
        self.caught_up = self._marks.caught_up

    async def start(self) -> None:
        """Read both topics from the beginning."""
        await self._reader.start()
        await self._marks.start()

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        await self._marks.stop()
        await self._reader.stop()

    def pending(self) -> dict[str, int]:
        """DLQ records not (yet) redriven, by reason."""
        reasons = set(self.records) | set(self.redriven_by_reason)
        return {r: max(0, self.records[r] - self.redriven_by_reason[r]) for r in sorted(reasons)}

    def redriven(self, partition: int, offset: int) -> bool:
        """Whether that DLQ record was sent back already."""
        return (partition, offset) in self._redriven

    def remember(self, partition: int, offset: int, reason: str) -> None:
        """Note a record as redriven (ours, before its mark is read back)."""
        key = (partition, offset)
        if key in self._redriven:
            return
        self._redriven[key] = None
        self.redriven_by_reason[reason] += 1
        if len(self._redriven) > _MAX_MARKS:
            del self._redriven[next(iter(self._redriven))]

    def _count(self, batches: Batches) -> None:
        for records in batches.values():
            for record in records:
                reason = _text(_first(tuple(record.headers or ()), "dlq-reason")) or "unknown"
                self.records[reason[:64]] += 1

    def _mark(self, command: Command) -> None:
        if isinstance(command, RedrivenMark):
            self.remember(command.partition, command.offset, command.reason)


@dataclass(slots=True)
class _Scan:
    positions: dict[int, int]
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class RedrivePlan:
    """What a redrive request found: how many matched, which will go back."""

    matched: int
    already: int
    not_redrivable: int
    chosen: list[DlqEntry]


Send = Callable[..., Awaitable[None]]


class DlqBrowser:
    """Pages through `jobs.dlq` and redrives from it (one reader, one request at a time)."""

    def __init__(self, settings: Settings, index: DlqIndex, send: Send) -> None:
        self._settings = settings
        self._topics = settings.topics
        self._index = index
        self._send = send
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._redrives: set[asyncio.Task[None]] = set()
        self._in_flight: set[tuple[int, int]] = set()

    async def stop(self) -> None:
        """Stop redrives under way (what is left is not sent) and close the reader."""
        for task in list(self._redrives):
            task.cancel()
        if self._redrives:
            await asyncio.wait(set(self._redrives))
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = groupless_consumer(self._settings.kafka, "dlq-browser")
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _walk(self, scan: _Scan, budget: int) -> AsyncGenerator[DlqEntry, None]:
        """Records from `scan.positions` on, in partition order, at most `budget`;
        `scan.positions` follows each record yielded, `scan.exhausted` says whether the
        end of every partition was reached."""
        consumer = await self._reader()
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(self._topics.dlq) or set())
        tps = [TopicPartition(self._topics.dlq, p) for p in partitions]
        positions = scan.positions
        for partition in partitions:
            positions.setdefault(partition, 0)
        if not tps:
            scan.exhausted = True
            return
        consumer.assign(tps)
        # Each partition is read until a fetch comes back empty: its log end as of now.
        # (ListOffsets is not reliable on every broker, Tansu's among them.)
        wait_ms = 2 * self._settings.kafka.fetch_max_wait_ms + 100
        scanned = 0
        for tp in tps:
            consumer.seek(tp, positions[tp.partition])
            while True:
                if scanned >= budget:
                    return
                batch = await consumer.getmany(
                    tp, timeout_ms=wait_ms, max_records=min(1000, budget - scanned)
                )
                records = batch.get(tp, [])
                if not records:
                    break
                for record in records:
                    scanned += 1
                    positions[tp.partition] = record.offset + 1
                    yield DlqEntry.of(record)
        scan.exhausted = True

    async def page(
        self, wanted: DlqFilter, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to `limit` matching entries after `cursor`, and the cursor of the next page
        (None at the end of the DLQ). Raises ValueError for a cursor it did not make."""
        scan = _Scan(decode_cursor(cursor))
        found: list[dict[str, Any]] = []
        async with self._lock:
            walk = self._walk(scan, _SCAN_PER_PAGE)
            async for entry in walk:
                if wanted.matches(entry):
                    redriven = self._index.redriven(entry.partition, entry.offset)
                    found.append(entry.view(redriven))
                    if len(found) >= limit:
                        break
            await walk.aclose()
        return found, None if scan.exhausted else encode_cursor(scan.positions)

    async def plan(self, wanted: DlqFilter, most: int) -> RedrivePlan:
        """The records a redrive of `wanted` would send back, at most `most` of them."""
        async with self._lock:
            walk = self._walk(_Scan({}), _SCAN_PER_REDRIVE)
            matched = [entry async for entry in walk if wanted.matches(entry)]
        index = self._index
        already = [e for e in matched if index.redriven(e.partition, e.offset)]
        fresh = [e for e in matched if not index.redriven(e.partition, e.offset)]
        usable = [
            e for e in fresh if _redrivable(e) and (e.partition, e.offset) not in self._in_flight
        ]
        return RedrivePlan(
            matched=len(matched),
            already=len(already),
            not_redrivable=len(fresh) - len(usable),
            chosen=usable[:most],
        )

    def redrive(self, plan: RedrivePlan, rate_per_s: float, by: str) -> asyncio.Task[None]:
        """Send the plan's records back to `jobs`, `rate_per_s` at most, in the background."""
        for entry in plan.chosen:
            self._in_flight.add((entry.partition, entry.offset))
        task = asyncio.create_task(self._redrive(plan.chosen, rate_per_s, by), name="dlq-redrive")
        self._redrives.add(task)
        task.add_done_callback(self._redrives.discard)
        return task

    async def _redrive(self, entries: Iterable[DlqEntry], rate_per_s: float, by: str) -> None:
        interval = 1.0 / rate_per_s
        next_at = time.monotonic()
        sent = 0
        try:
            for entry in entries:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at, time.monotonic()) + interval
                mark = admin_record(
                    self._topics.control,
                    op="redriven",
                    tenant=entry.tenant or "-",
                    at=time.time(),
                    by=by,
                    partition=entry.partition,
                    offset=entry.offset,
                    reason=entry.reason,
                )
                # The mark first: a crash between the two leaves a record marked and not
                # sent (at most once), never sent twice.
                await self._send([mark])
                self._index.remember(entry.partition, entry.offset, entry.reason)
                await self._send([self._job_record(entry)])
                sent += 1
        except asyncio.CancelledError:
            log.warning("redrive_interrupted", extra={"sent": sent, "by": by})
            raise
        except Exception as exc:  # noqa: BLE001  # the broker refused: report, stop here
            log.error("redrive_failed", extra={"sent": sent, "error": type(exc).__name__})
        else:
            log.info("redrive_done", extra={"sent": sent, "by": by})
        finally:
            for entry in entries:
                self._in_flight.discard((entry.partition, entry.offset))

    def _job_record(self, entry: DlqEntry) -> OutRecord:
        headers = [(k, v or b"") for k, v in entry.headers if k not in _NOT_COPIED]
        origin = f"{self._topics.dlq}/{entry.partition}/{entry.offset}"
        headers.append(("redriven-from", origin.encode()))
        key = entry.job_id.encode() if entry.job_id is not None else None
        return OutRecord(self._topics.jobs, key, entry.value, headers)


def _redrivable(entry: DlqEntry) -> bool:
    # A cut copy is not the original; a record without a value is nothing to run.
    return not entry.truncated and entry.value is not None


def encode_cursor(positions: dict[int, int]) -> str:
    """An opaque cursor: the next offset of each partition."""
    raw = json.dumps({str(p): o for p, o in sorted(positions.items())}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[int, int]:
    """The positions a cursor holds (from the beginning without one); ValueError if bad."""
    if not cursor:
        return {}
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        positions = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise ValueError("bad cursor") from exc
    if not isinstance(positions, dict) or len(positions) > 10_000:
        raise ValueError("bad cursor")
    decoded: dict[int, int] = {}
    for partition, offset in positions.items():
        if not partition.isdigit() or not isinstance(offset, int) or offset < 0:
            raise ValueError("bad cursor")
        decoded[int(partition)] = offset
    return decoded
