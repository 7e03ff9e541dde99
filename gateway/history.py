"""Recent terminal job ids, so a redelivered job that already finished is not run again."""

from __future__ import annotations

from cachetools import LRUCache

from gateway.records import Status

__all__ = ["TerminalHistory"]


class TerminalHistory:
    """Bounded memory of (tenant, job id) -> terminal status; oldest entries fall out."""

    def __init__(self, maxsize: int) -> None:
        self._seen: LRUCache[tuple[str, str], Status] = LRUCache(maxsize=maxsize)

    def remember(self, key: tuple[str, str], status: Status) -> None:
        """Record a terminal status."""
        self._seen[key] = status

    def get(self, key: tuple[str, str]) -> Status | None:
        """The terminal status of a job, when it is still remembered."""
        return self._seen.get(key)

    def __len__(self) -> int:
        return len(self._seen)
