"""What an operator sees of an outage, and how a replica notices it was frozen.

`BrokerHealth`: the broker is up while the outbox's writes are acknowledged (a replica
writes at least every half second: its demand reports). When nothing has been
acknowledged for `unreachable_after_s`, one `broker_unreachable` warning says so
(address, last error); when writes go through again, one `broker_recovered` line says
for how long it was down. `gateway_broker_up` follows it, and `/readyz` turns 503 once
the outage has lasted `not_ready_after_s`.

`LoopWatch`: a replica whose event loop did not run for longer than the consumer
group's session timeout (the process was stopped, say SIGSTOP, or starved) has been
dropped from the group, and its partitions now belong to others: whatever it would
write now could be a second result of a job the new owner ran. On waking it refuses to
write or commit anything more and stops with a non-zero exit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["BrokerHealth", "LoopWatch"]

log = logging.getLogger("gateway.health")


class BrokerHealth:
    """Up or down, as the outbox's acknowledgements say (pure but for the log lines)."""

    def __init__(
        self,
        address: str,
        *,
        unreachable_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address
        self._after = unreachable_after_s
        self._clock = clock
        self._last_ok = clock()
        self._error: str | None = None
        self._down_since: float | None = None

    @property
    def up(self) -> bool:
        """False from the moment an outage was declared until writes go through again."""
        return self._down_since is None

    def down_for(self) -> float:
        """Seconds since the last acknowledged write, during a declared outage (else 0)."""
        return 0.0 if self._down_since is None else self._clock() - self._down_since

    def ok(self) -> None:
        """A write was acknowledged."""
        now = self._clock()
        self._last_ok = now
        if self._down_since is not None:
            log.warning(
                "broker_recovered",
                extra={"broker": self._address, "down_s": round(now - self._down_since, 1)},
            )
            self._down_since = None
        self._error = None

    def skip(self, seconds: float) -> None:
        """The process did not run for `seconds` (stopped, starved): no evidence either way."""
        self._last_ok += seconds

    def failed(self, error: str) -> None:
        """A write failed for a reason that says nothing about the record."""
        self._error = error

    def check(self) -> None:
        """Declare an outage once nothing was acknowledged for `unreachable_after_s`."""
        now = self._clock()
        if self._down_since is None and now - self._last_ok > self._after:
            self._down_since = self._last_ok
            log.warning(
                "broker_unreachable",
                extra={
                    "broker": self._address,
                    "error": self._error or "no acknowledgement",
                    "since_s": round(now - self._last_ok, 1),
                    "hint": "check GATEWAY_KAFKA__BOOTSTRAP_SERVERS and the broker",
                },
            )


class LoopWatch:
    """Ticks from the event loop; a gap longer than `limit_s` means the replica slept
    through its session (fenced)."""

    def __init__(self, limit_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit_s
        self._clock = clock
        self._last = clock()
        self.fenced_after: float | None = None

    def reset(self) -> None:
        """Start watching now (what happened before does not count)."""
        self._last = self._clock()

    def tick(self) -> float:
        """Called by a task every fraction of a second; returns the gap since the last."""
        now = self._clock()
        gap = now - self._last
        self._last = now
        if gap > self._limit and self.fenced_after is None:
            self.fenced_after = gap
        return gap

    def fenced(self) -> bool:
        """Whether the loop stalled longer than the limit, now or before (checked by the
        writers before they write, which may run before the next tick does)."""
        if self.fenced_after is None and self._clock() - self._last > self._limit:
            self.fenced_after = self._clock() - self._last
        return self.fenced_after is not None
