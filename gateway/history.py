"""Recent terminal job ids, so a redelivered job that already finished is not run again."""

from __future__ import annotations

from gateway.records import Status
from gateway.tenantcache import TenantCache

__all__ = ["TerminalHistory"]


class TerminalHistory:
    """Bounded memory of (tenant, job id) -> terminal status, fair between tenants: one
    tenant's volume pushes out only its own oldest entries (see `TenantCache`)."""

    def __init__(self, maxsize: int) -> None:
        self._seen: TenantCache[Status] = TenantCache(maxsize)

    def remember(self, key: tuple[str, str], status: Status) -> None:
        """Record a terminal status."""
        self._seen.put(key, status)

    def get(self, key: tuple[str, str]) -> Status | None:
        """The terminal status of a job, when it is still remembered."""
        return self._seen.get(key)

    def __len__(self) -> int:
        return len(self._seen)
