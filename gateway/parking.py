"""Parking: a tenant's overflow left in place on `jobs`, and read again by offset.

A burst from one tenant sits in the same partitions as everyone else's records. Sending
its overflow around `jobs.deferred` costs two records written and one read back per job,
and every other tenant's records wait behind that work while the burst is read. A
record is *parked* instead when its tenant's buffer is full (or the tenant has parked
records already, so its jobs keep their order): admission keeps only its offset and
ticket, after reading nothing but the `tenant` header. The record stays unfinished, so
the partition's commit waits for it (invariant 4), and nothing of it is held in memory.

A reader of its own (a consumer outside the group) comes back for parked records:

- when the tenant has room again for a good part of what it has parked (a quarter of
  its `max_queued`, or all it has parked), it reads the partition from the oldest
  parked offset and hands those records to admission, oldest first;
- when a record has been parked for `max_age_s`, it reads it and admission writes it
  to `jobs.deferred` the usual way (if its tenant still has no room), so no
  partition's commit waits longer than that behind a slow tenant. A paused tenant's
  jobs are not parked: they go to `jobs.deferred` (status `deferred`) at once, and
  those parked when the pause came are spilled there on the reader's next turn.

Past `max_records` parked records, overflow goes to `jobs.deferred` at once.
A revoked partition's parked records are forgotten: they were never committed, and the
partition's next owner reads them again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.catalog import Catalog
from gateway.envelope import Source
from gateway.kafka import groupless_consumer, record_size, source_of, stop_consumer
from gateway.offsets import OffsetTracker, Ticket
from gateway.settings import KafkaSettings, ParkingSettings
from gateway.tasks import Supervisor

__all__ = ["Parking", "Readmit"]

log = logging.getLogger("gateway.parking")

# Hands a record read again to admission: (record, ticket, partition, spill). With
# `spill`, a record that still finds no room is deferred rather than parked again.
Readmit = Callable[[Source, Ticket, Hashable, bool], None]

# How often the reader looks for tenants with room while records are parked.
_POLL_S = 0.02
# The furthest one read goes past its first offset (bounds what it reads for nothing).
_MAX_SPAN = 20_000
# Aged records spilled to jobs.deferred per read.
_SPILL_BATCH = 1_000
# A read that gets nothing for this long gives its records back and tries later.
_READ_STALL_S = 10.0


@dataclass(frozen=True, slots=True)
class _Parked:
    ticket: Ticket
    at: float  # monotonic time it was parked


# A record taken for a read: its tenant, its place, and whether it is to be spilled.
_Taken = tuple[str, _Parked, bool]


class Parking:
    """Parked records by partition and tenant, and the reader that brings them back."""

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        settings: ParkingSettings,
        catalog: Callable[[], Catalog],
        tracker: OffsetTracker,
        room: Callable[[str], int],
        paused: Callable[[str], bool],
        supervisor: Supervisor,
    ) -> None:
        self._kafka = kafka
        self._max_records = settings.max_records
        self._max_age_s = settings.max_age_s
        self._catalog = catalog
        self._tracker = tracker
        self._room = room
        self._paused = paused
        self._supervisor = supervisor
        self._readmit: Readmit | None = None
        # partition -> tenant -> parked records in offset order
        self._parked: dict[Hashable, dict[str, deque[_Parked]]] = {}
        self._counts: dict[str, int] = {}
        self._total = 0
        # The partition being read and the records taken for that read.
        self._reading: tuple[Hashable, dict[int, _Taken]] | None = None
        self._turn = itertools.count()
        self._wake = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.spilled = 0
        self.missing = 0

    def bind(self, readmit: Readmit) -> None:
        """Where records read again go (admission)."""
        self._readmit = readmit

    # -- parking ---------------------------------------------------------------

    def wants(self, tenant: str) -> bool:
        """Whether a fresh record of `tenant` should be parked rather than taken."""
        if self._total >= self._max_records or self._catalog().get(tenant) is None:
            return False
        if self._paused(tenant):
            return False  # deferred at once, so its status says `deferred`
        return tenant in self._counts or self._room(tenant) == 0

    def can_park(self) -> bool:
        """Whether there is room for one more parked record."""
        return self._total < self._max_records

    def park(self, tenant: str, ticket: Ticket, partition: Hashable) -> None:
        """Leave the record in place: its ticket stays unfinished, nothing else is kept."""
        self._tracker.park(ticket)
        line = self._parked.setdefault(partition, {}).setdefault(tenant, deque())
        parked = _Parked(ticket, time.monotonic())
        if line and line[-1].ticket.offset > ticket.offset:
            # Parked again after a read found no room: back in offset order.
            index = next(i for i, p in enumerate(line) if p.ticket.offset > ticket.offset)
            line.insert(index, parked)
        else:
            line.append(parked)
        self._counts[tenant] = self._counts.get(tenant, 0) + 1
        self._total += 1
        self._wake.set()

    def expire(self, tenant: str) -> None:
        """Spill the tenant's parked records to jobs.deferred on the reader's next turn
        (it was paused)."""
        for lines in self._parked.values():
            line = lines.get(tenant)
            if line:
                lines[tenant] = deque(_Parked(p.ticket, -math.inf) for p in line)
        self._wake.set()

    def count(self, tenant: str) -> int:
        """The tenant's parked records."""
        return self._counts.get(tenant, 0)

    def counts(self) -> dict[str, int]:
        """Parked records per tenant (only tenants with some)."""
        return dict(self._counts)

    @property
    def total(self) -> int:
        """Parked records in all."""
        return self._total

    def revoke(self, partitions: Iterable[Hashable]) -> None:
        """Forget the parked records of partitions this replica no longer owns (a read
        under way of one of them ends: it finds nothing left to hand over)."""
        revoked = set(partitions)
        for partition in revoked:
            for tenant, line in self._parked.pop(partition, {}).items():
                self._forget(tenant, len(line))
        if self._reading is not None and self._reading[0] in revoked:
            wanted = self._reading[1]
            for tenant, _, _ in wanted.values():
                self._forget(tenant, 1)
            wanted.clear()

    def _forget(self, tenant: str, count: int) -> None:
        left = self._counts.get(tenant, 0) - count
        if left > 0:
            self._counts[tenant] = left
        else:
            self._counts.pop(tenant, None)
        self._total -= count

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the reader (its consumer connects on first use)."""
        if self._task is None and self._max_records > 0:
            self._task = self._supervisor.spawn(self._run(), "gateway:parking")

    async def stop(self) -> None:
        """Stop reading; parked records stay uncommitted and are read again after a restart."""
        task, self._task = self._task, None
        await self._supervisor.cancel(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)

    async def _connect(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            kafka = self._kafka
            consumer = groupless_consumer(
                kafka,
                "parking",
                # Parked records are on the broker already: no reason to wait for more.
                fetch_max_wait_ms=min(kafka.fetch_max_wait_ms, 50),
                max_poll_records=kafka.max_poll_records,
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    # -- reading back ----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._total:
                self._wake.clear()
                await self._wake.wait()
            plan = self._plan(time.monotonic())
            if plan is None:
                await asyncio.sleep(_POLL_S)
                continue
            partition, wanted = plan
            try:
                await self._read(partition, wanted)
            except KafkaError as exc:
                log.warning("parking_read_failed", extra={"error": type(exc).__name__})
                self._give_back(partition, wanted)
                await asyncio.sleep(1.0)

    def _plan(self, now: float) -> tuple[Hashable, dict[int, _Taken]] | None:
        """The next partition to read and what to take from it, or None for now.

        Tenants with room for a good part of what they have parked are served oldest
        first; records parked `max_age_s` ago are taken to be spilled. One partition
        per read, in turns, over at most `_MAX_SPAN` offsets.
        """
        room: dict[str, int] = {}
        for tenant, count in self._counts.items():
            spare = self._room(tenant)
            known = self._catalog().get(tenant)
            bound = known.quota.max_queued if known is not None else 1
            if spare >= max(1, min(count, bound // 4)):
                room[tenant] = spare
        cutoff = now - self._max_age_s
        partitions = [
            tp
            for tp, lines in self._parked.items()
            if any(tenant in room or line[0].at <= cutoff for tenant, line in lines.items())
        ]
        if not partitions:
            return None
        partitions.sort(key=str)
        partition = partitions[next(self._turn) % len(partitions)]
        lines = self._parked[partition]
        start = min(
            line[0].ticket.offset
            for tenant, line in lines.items()
            if tenant in room or line[0].at <= cutoff
        )
        end = start + _MAX_SPAN
        wanted: dict[int, _Taken] = {}
        spills = 0
        for tenant, line in lines.items():
            take = room.get(tenant, 0)
            while line and line[0].ticket.offset <= end:
                aged = line[0].at <= cutoff
                if take > 0:
                    take -= 1
                elif aged and spills < _SPILL_BATCH:
                    spills += 1
                else:
                    break
                parked = line.popleft()
                wanted[parked.ticket.offset] = (tenant, parked, aged and tenant not in room)
        for tenant in [t for t, line in lines.items() if not line]:
            del lines[tenant]
        if not lines:
            del self._parked[partition]
        return partition, wanted

    async def _read(self, partition: Hashable, wanted: dict[int, _Taken]) -> None:
        """Read `partition` from the first wanted offset and hand the wanted records over."""
        tp = cast(TopicPartition, partition)  # the intake's partitions are aiokafka's
        consumer = await self._connect()
        self._reading = (partition, wanted)
        last = max(wanted)
        consumer.assign([tp])
        consumer.seek(tp, min(wanted))
        stalled_since = time.monotonic()
        spilled = 0
        try:
            while wanted:
                batch = await consumer.getmany(tp, timeout_ms=200)
                records = batch.get(tp, [])
                if not records:
                    if await consumer.position(tp) > last:
                        break  # the rest is gone from the broker
                    if time.monotonic() - stalled_since > _READ_STALL_S:
                        log.warning("parking_read_stalled", extra={"partition": str(partition)})
                        self._give_back(partition, wanted)
                        return
                    continue
                stalled_since = time.monotonic()
                for record in records:
                    item = wanted.pop(record.offset, None)
                    if item is not None:
                        spilled += item[2]
                        self._hand_over(partition, record, *item)
                if records[-1].offset >= last:
                    break
            self._lost(partition, wanted)
        finally:
            self._reading = None
            consumer.assign([])
            if spilled:
                self.spilled += spilled
                log.info("parked_spilled", extra={"partition": str(partition), "count": spilled})

    def _hand_over(
        self, partition: Hashable, record: Any, tenant: str, parked: _Parked, spill: bool
    ) -> None:
        self._forget(tenant, 1)
        if not self._tracker.unpark(parked.ticket, record_size(record)):
            return  # finished meanwhile (a duplicate elsewhere) or no longer ours
        assert self._readmit is not None
        self._readmit(source_of(record), parked.ticket, partition, spill)

    def _give_back(self, partition: Hashable, wanted: dict[int, _Taken]) -> None:
        """Put records taken for a read that failed back in their lines, in order."""
        lines = self._parked.setdefault(partition, {})
        for offset in sorted(wanted, reverse=True):
            tenant, parked, _ = wanted[offset]
            lines.setdefault(tenant, deque()).appendleft(parked)
        wanted.clear()

    def _lost(self, partition: Hashable, wanted: dict[int, _Taken]) -> None:
        """Parked records the broker no longer has (retention ran): finished, loudly."""
        for offset, (tenant, parked, _) in sorted(wanted.items()):
            self._forget(tenant, 1)
            self._tracker.finish(parked.ticket)
            self.missing += 1
            log.error(
                "parked_record_missing",
                extra={"partition": str(partition), "offset": offset, "tenant": tenant},
            )
        wanted.clear()
