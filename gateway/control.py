"""Cancel commands: every replica reads `jobs.control`; the one holding the job acts.

A cancel for a job this replica does not hold (still in a topic, waiting in another
replica's retry timer, or not read yet) is remembered for `cancel_ttl_s`, so that
the job is cancelled when it arrives here instead of starting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.envelope import header_value
from gateway.settings import KafkaSettings
from gateway.tasks import Supervisor
from gateway.tenantcache import TenantCache
from gateway.topicreader import Batches, TopicReader

__all__ = ["CancelCommand", "ControlListener", "PendingCancels", "parse_control"]

log = logging.getLogger("gateway.control")

JobKey = tuple[str, str]
# A cancel command is a few hundred bytes; anything much larger is not one.
_MAX_COMMAND_BYTES = 64 * 1024


class PendingCancels:
    """Bounded, expiring memory of cancel requests for jobs not held here (yet), fair
    between tenants: one tenant's cancels never push out another's (`TenantCache`)."""

    def __init__(self, maxsize: int, ttl_s: float) -> None:
        self._added: TenantCache[float] = TenantCache(maxsize)
        self._ttl_s = ttl_s

    def add(self, key: JobKey) -> None:
        """Remember a cancel of (tenant, job id)."""
        self._added.put(key, time.monotonic())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        added = self._added.peek(key)
        if added is None:
            return False
        if time.monotonic() - added > self._ttl_s:
            self._added.pop(key)
            return False
        return True

    def __len__(self) -> int:
        return len(self._added)


@dataclass(frozen=True, slots=True)
class CancelCommand:
    """One valid `jobs.control` cancel."""

    tenant: str
    job_id: str
    requested_at: float

    @property
    def key(self) -> JobKey:
        """(tenant, job id): a command only ever reaches its own tenant's job."""
        return (self.tenant, self.job_id)


def parse_control(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]], timestamp_ms: int
) -> CancelCommand | None:
    """A cancel command, or None for anything else (other ops, tenant header mismatch)."""
    tenants = header_value(headers, "tenant")
    if len(tenants) != 1 or not tenants[0] or value is None:
        return None
    if len(value) > _MAX_COMMAND_BYTES:
        return None
    try:
        header_tenant = tenants[0].decode()
        body = json.loads(value)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, deep nesting
        return None
    if not isinstance(body, dict) or body.get("op") != "cancel":
        return None
    job_id, tenant = body.get("id"), body.get("tenant")
    if not isinstance(job_id, str) or not job_id or not isinstance(tenant, str):
        return None
    if tenant != header_tenant:
        return None
    return CancelCommand(header_tenant, job_id, _epoch(body.get("requested_at"), timestamp_ms))


def _epoch(stamp: Any, fallback_ms: int) -> float:
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            pass
    return fallback_ms / 1000


class ControlListener:
    """Reads `jobs.control` from the beginning (no group); recent cancels go to `on_cancel`.

    Reading from the beginning rather than the end means a cancel published while this
    replica was starting is not missed; commands older than `ttl_s` are skipped.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        ttl_s: float,
        on_cancel: Callable[[CancelCommand], None],
        supervisor: Supervisor,
    ) -> None:
        self._ttl_s = ttl_s
        self._on_cancel = on_cancel
        self._reader = TopicReader(
            settings,
            [topic],
            name="control",
            handle=self._apply,
            max_records=1000,
            logger=log,
            supervisor=supervisor,
        )
        self.caught_up = self._reader.caught_up

    async def start(self) -> None:
        """Assign every partition of the topic and begin reading."""
        await self._reader.start()

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        await self._reader.stop()

    def _apply(self, batches: Batches) -> None:
        oldest = time.time() - self._ttl_s
        for records in batches.values():
            for record in records:
                command = parse_control(
                    record.value, tuple(record.headers or ()), record.timestamp or 0
                )
                if command is None:
                    log.warning(
                        "control_record_ignored",
                        extra={"partition": record.partition, "offset": record.offset},
                    )
                elif command.requested_at >= oldest:
                    self._on_cancel(command)
