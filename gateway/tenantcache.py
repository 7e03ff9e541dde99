"""A bounded map of (tenant, job id) -> value that is fair between tenants (pure).

Every per-job memory the gateway keeps (terminal jobs for idempotency, statuses and
results for `GET`, pending cancels) is bounded, and one tenant's volume must never
evict another tenant's entries. The rule: when the map is full, the entry that goes is
the least recently used one *of the tenant holding the most*. A tenant at or under an
equal share of the bound therefore keeps its entries whatever the others do, and a
tenant alone may use the whole bound until others arrive. An optional per-tenant bound
caps any one tenant below the total.

Sizes are counts, or any weight (`sizeof`, e.g. bytes of a result). Finding the
largest tenant is amortised: the last victim is kept while it still holds at least the
average, so a flood evicting its own entries costs O(1) per insert.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["TenantCache"]

V = TypeVar("V")
Key = tuple[str, str]


class _Shelf(Generic[V]):
    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.size = 0


class TenantCache(Generic[V]):
    """(tenant, id) -> value, at most `max_total` in all and `max_per_tenant` per tenant."""

    def __init__(
        self,
        max_total: int,
        *,
        max_per_tenant: int | None = None,
        sizeof: Callable[[V], int] | None = None,
        index_ids: bool = False,
    ) -> None:
        if max_total < 1:
            raise ValueError("max_total must be at least 1")
        self.max_total = max_total
        self.max_per_tenant = min(max_per_tenant or max_total, max_total)
        self._sizeof = sizeof
        self._shelves: dict[str, _Shelf[V]] = {}
        self._total = 0
        self._count = 0
        self._victim: str | None = None
        # job id -> tenants holding it (for "does someone else know this id?")
        self._owners: dict[str, set[str]] | None = {} if index_ids else None

    def __len__(self) -> int:
        return self._count

    @property
    def total(self) -> int:
        """The summed size of every entry (their count without `sizeof`)."""
        return self._total

    def size_of(self, tenant: str) -> int:
        """The summed size of one tenant's entries."""
        shelf = self._shelves.get(tenant)
        return shelf.size if shelf is not None else 0

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        shelf = self._shelves.get(key[0])
        return shelf is not None and key[1] in shelf.entries

    def get(self, key: Key) -> V | None:
        """The value, marked as just used; None when absent."""
        shelf = self._shelves.get(key[0])
        if shelf is None:
            return None
        found = shelf.entries.get(key[1])
        if found is None:
            return None
        shelf.entries.move_to_end(key[1])
        return found[0]

    def peek(self, key: Key) -> V | None:
        """The value without touching its recency."""
        shelf = self._shelves.get(key[0])
        found = shelf.entries.get(key[1]) if shelf is not None else None
        return found[0] if found is not None else None

    def owners(self, job_id: str) -> frozenset[str]:
        """Tenants holding an entry for `job_id` (needs `index_ids`)."""
        if self._owners is None:
            raise RuntimeError("TenantCache built without index_ids")
        return frozenset(self._owners.get(job_id, ()))

    def values_of(self, tenant: str) -> list[V]:
        """One tenant's values, least recently used first."""
        shelf = self._shelves.get(tenant)
        return [value for value, _ in shelf.entries.values()] if shelf is not None else []

    def tenants(self) -> Iterator[str]:
        """Tenants holding at least one entry."""
        return iter(self._shelves)

    def put(self, key: Key, value: V) -> bool:
        """Insert or replace; False when the value alone is over a bound (not kept)."""
        tenant, job_id = key
        size = self._sizeof(value) if self._sizeof is not None else 1
        if size > self.max_per_tenant:
            self.pop(key)
            return False
        self.pop(key)
        shelf = self._shelves.get(tenant)
        while shelf is not None and shelf.entries and shelf.size + size > self.max_per_tenant:
            self._evict_oldest(tenant, shelf)
        while self._total + size > self.max_total:
            victim = self._largest()
            self._evict_oldest(victim, self._shelves[victim])
        shelf = self._shelves.get(tenant)
        if shelf is None:
            shelf = self._shelves[tenant] = _Shelf()
        shelf.entries[job_id] = (value, size)
        shelf.size += size
        self._total += size
        self._count += 1
        if self._owners is not None:
            self._owners.setdefault(job_id, set()).add(tenant)
        return True

    __setitem__ = put

    def pop(self, key: Key) -> V | None:
        """Remove and return a value (None when absent)."""
        tenant, job_id = key
        shelf = self._shelves.get(tenant)
        if shelf is None:
            return None
        found = shelf.entries.pop(job_id, None)
        if found is None:
            return None
        self._forget(tenant, job_id, shelf, found[1])
        return found[0]

    def _evict_oldest(self, tenant: str, shelf: _Shelf[V]) -> None:
        job_id, (_, size) = shelf.entries.popitem(last=False)
        self._forget(tenant, job_id, shelf, size)

    def _forget(self, tenant: str, job_id: str, shelf: _Shelf[V], size: int) -> None:
        shelf.size -= size
        self._total -= size
        self._count -= 1
        if not shelf.entries:
            del self._shelves[tenant]
            if self._victim == tenant:
                self._victim = None
        if self._owners is not None:
            holders = self._owners.get(job_id)
            if holders is not None:
                holders.discard(tenant)
                if not holders:
                    del self._owners[job_id]

    def _largest(self) -> str:
        victim = self._victim
        average = self._total / max(1, len(self._shelves))
        if victim is None or victim not in self._shelves or self._shelves[victim].size < average:
            victim = max(self._shelves, key=lambda t: self._shelves[t].size)
            self._victim = victim
        return victim
