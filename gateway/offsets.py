"""Gap-aware offset tracking: a partition commits only past a contiguous finished run.

Pure logic, no I/O. A record is *tracked* when the consumer hands it over and
*finished* once its outcome (result, retry, deferral or DLQ record) is acknowledged
by the broker. The commit point of a partition is the offset of its first unfinished
record, or one past the last record seen when all are finished.

A record may also be *parked*: left unfinished on the broker, with nothing of it held
in memory, to be read again by offset later (`gateway.parking`). A parked record holds
the commit point back like any unfinished one, but counts neither as in flight nor
by bytes against the memory bounds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["OffsetTracker", "PartitionOffsets", "Ticket"]


class PartitionOffsets:
    """Offsets of one partition in arrival order; finishing may happen in any order.

    Each tracked record also carries its size, so memory bounds can count bytes.
    """

    __slots__ = ("_bytes", "_committed", "_last_seen", "_parked", "_pending", "_unfinished")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._unfinished: dict[int, int] = {}  # offset -> size, until finished
        self._parked: set[int] = set()
        self._bytes = 0
        self._last_seen: int | None = None
        self._committed: int | None = None

    def track(self, offset: int, size: int = 0) -> None:
        """Register a record handed to the gateway; offsets must increase."""
        if self._last_seen is not None and offset <= self._last_seen:
            raise ValueError(f"offset {offset} is not after {self._last_seen}")
        self._last_seen = offset
        self._pending.append(offset)
        self._unfinished[offset] = size
        self._bytes += size

    def finish(self, offset: int) -> None:
        """Mark a tracked record finished (idempotent)."""
        size = self._unfinished.pop(offset, None)
        if size is None:
            return
        self._bytes -= size
        self._parked.discard(offset)
        pending, unfinished = self._pending, self._unfinished
        while pending and pending[0] not in unfinished:
            pending.popleft()

    def park(self, offset: int) -> None:
        """The record stays unfinished but is no longer held in memory."""
        size = self._unfinished.get(offset)
        if size is None or offset in self._parked:
            return
        self._bytes -= size
        self._unfinished[offset] = 0
        self._parked.add(offset)

    def unpark(self, offset: int, size: int) -> bool:
        """The parked record was read again and is held (`size` bytes); False when it
        is not parked here (finished meanwhile, or never parked)."""
        if offset not in self._parked:
            return False
        self._parked.discard(offset)
        self._unfinished[offset] = size
        self._bytes += size
        return True

    @property
    def in_flight(self) -> int:
        """Tracked records not yet finished, parked ones aside."""
        return len(self._unfinished) - len(self._parked)

    @property
    def parked(self) -> int:
        """Parked records."""
        return len(self._parked)

    @property
    def in_flight_bytes(self) -> int:
        """Sizes of the tracked records not yet finished."""
        return self._bytes

    def commit_point(self) -> int | None:
        """The offset to commit (next to consume), or None before any record."""
        if self._pending:
            return self._pending[0]
        if self._last_seen is None:
            return None
        return self._last_seen + 1

    def due_commit(self) -> int | None:
        """The commit point when it moved since the last `mark_committed`, else None."""
        point = self.commit_point()
        if point is None or point == self._committed:
            return None
        return point

    def mark_committed(self, offset: int) -> None:
        """Record that `offset` reached the broker."""
        if self._committed is None or offset > self._committed:
            self._committed = offset


@dataclass(frozen=True, slots=True)
class Ticket:
    """Proof of tracking; finishing a ticket of a revoked partition has no effect."""

    partition: Hashable
    offset: int
    owner: PartitionOffsets


class OffsetTracker:
    """Per-partition trackers that appear on assignment and vanish on revocation."""

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[Hashable, PartitionOffsets] = {}

    def assign(self, partition: Hashable) -> None:
        """Start (or keep) tracking a partition."""
        self._partitions.setdefault(partition, PartitionOffsets())

    def revoke(self, partition: Hashable) -> None:
        """Forget a partition; its outstanding tickets become inert."""
        self._partitions.pop(partition, None)

    def track(self, partition: Hashable, offset: int, size: int = 0) -> Ticket:
        """Track one record (of `size` bytes) of an assigned partition."""
        owner = self._partitions.get(partition)
        if owner is None:
            owner = self._partitions[partition] = PartitionOffsets()
        owner.track(offset, size)
        return Ticket(partition, offset, owner)

    def finish(self, ticket: Ticket) -> None:
        """Finish a ticket; a ticket from before a revocation is ignored."""
        if self._partitions.get(ticket.partition) is ticket.owner:
            ticket.owner.finish(ticket.offset)

    def live(self, ticket: Ticket) -> bool:
        """Whether the ticket's partition is still the one it was tracked under."""
        return self._partitions.get(ticket.partition) is ticket.owner

    def park(self, ticket: Ticket) -> None:
        """Park a tracked record (see the module's docstring)."""
        if self.live(ticket):
            ticket.owner.park(ticket.offset)

    def unpark(self, ticket: Ticket, size: int) -> bool:
        """A parked record is held again; False when the ticket is stale or not parked."""
        return self.live(ticket) and ticket.owner.unpark(ticket.offset, size)

    def in_flight(self, partition: Hashable | None = None) -> int:
        """Unfinished records of one partition, or of all."""
        if partition is not None:
            owner = self._partitions.get(partition)
            return owner.in_flight if owner is not None else 0
        return sum(owner.in_flight for owner in self._partitions.values())

    def in_flight_bytes(self, partition: Hashable) -> int:
        """Sizes of the unfinished records of one partition."""
        owner = self._partitions.get(partition)
        return owner.in_flight_bytes if owner is not None else 0

    def commit_point(self, partition: Hashable) -> int | None:
        """Where a commit of the partition would stand now, or None (unknown partition)."""
        offsets = self._partitions.get(partition)
        return offsets.commit_point() if offsets is not None else None

    def due_commits(self, partitions: set[Hashable] | None = None) -> dict[Hashable, int]:
        """Commit points that moved, optionally only for some partitions."""
        due: dict[Hashable, int] = {}
        for partition, owner in self._partitions.items():
            if partitions is not None and partition not in partitions:
                continue
            point = owner.due_commit()
            if point is not None:
                due[partition] = point
        return due

    def mark_committed(self, commits: dict[Hashable, int]) -> None:
        """Record a successful commit of `due_commits()` output."""
        for partition, offset in commits.items():
            owner = self._partitions.get(partition)
            if owner is not None:
                owner.mark_committed(offset)
