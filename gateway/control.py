"""Commands on `jobs.control`: every replica reads the topic and applies what concerns it.

- `cancel` (tenant API): the replica holding the job cancels it; one that does not hold
  it remembers the request for `cancel_ttl_s`, so the job is cancelled on arrival.
- `pause` / `resume` (admin API): every replica stops (or resumes) starting the
  tenant's jobs. These are state, not events: they are applied whatever their age, in
  order, so a pause survives restarts of every replica.
- `cancel_all` (admin API): every replica cancels the tenant's jobs (of one type, if
  given) that it holds, and remembers the request, so jobs whose records were written
  before it are cancelled when they arrive.
- `redriven` (admin API): a DLQ record was sent back to `jobs`; read by the API
  processes so that no record is redriven twice.
- `demand` (every replica, every half second): its load per tenant, from which each
  replica takes its share of every tenant's quota (`gateway.shares`).

Every command names its tenant in the `tenant` header and in the body (they must
agree; `-` for commands about no tenant); anything else on the topic is ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.envelope import Job, first_written_ms, header_value
from gateway.settings import KafkaSettings
from gateway.shares import Demand
from gateway.tasks import Supervisor
from gateway.tenantcache import TenantCache
from gateway.topicreader import Batches, TopicReader

__all__ = [
    "CancelAllCommand",
    "CancelCommand",
    "Command",
    "ControlListener",
    "DemandReport",
    "PauseCommand",
    "PendingCancels",
    "RedrivenMark",
    "parse_control",
]

log = logging.getLogger("gateway.control")

JobKey = tuple[str, str]
# A command is a few hundred bytes; anything much larger is not one.
_MAX_COMMAND_BYTES = 64 * 1024


class PendingCancels:
    """What to cancel on arrival: single jobs (bounded, expiring, fair between tenants:
    one tenant's cancels never push out another's) and whole tenants' backlogs (every
    job of the tenant, or of one type, whose record was written before the request)."""

    def __init__(self, maxsize: int, ttl_s: float, *, bulk_ttl_s: float = 86_400.0) -> None:
        self._added: TenantCache[float] = TenantCache(maxsize)
        self._ttl_s = ttl_s
        self._bulk_ttl_s = bulk_ttl_s
        # tenant -> {job type or None (every type): requested_at (epoch seconds)}
        self._bulk: dict[str, dict[str | None, float]] = {}

    def add(self, key: JobKey) -> None:
        """Remember a cancel of (tenant, job id)."""
        self._added.put(key, time.monotonic())

    def add_bulk(self, tenant: str, job_type: str | None, requested_at: float) -> None:
        """Remember a cancel of every job of `tenant` (of `job_type`) written before then."""
        kinds = self._bulk.setdefault(tenant, {})
        kinds[job_type] = max(requested_at, kinds.get(job_type, 0.0))

    def covers(self, job: Job) -> bool:
        """Whether `job` is to be cancelled on arrival."""
        if job.key in self:
            return True
        kinds = self._bulk.get(job.tenant)
        if not kinds:
            return False
        written_at = first_written_ms(job.source) / 1000
        now = time.time()
        for kind in (None, job.type):
            at = kinds.get(kind)
            if at is not None and written_at <= at and now - at <= self._bulk_ttl_s:
                return True
        return False

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
    """Cancel one job."""

    tenant: str
    job_id: str
    requested_at: float

    @property
    def key(self) -> JobKey:
        """(tenant, job id): a command only ever reaches its own tenant's job."""
        return (self.tenant, self.job_id)


@dataclass(frozen=True, slots=True)
class PauseCommand:
    """Pause (or resume) a tenant everywhere."""

    tenant: str
    paused: bool
    requested_at: float
    by: str


@dataclass(frozen=True, slots=True)
class CancelAllCommand:
    """Cancel every job of a tenant (of one type) written before `requested_at`."""

    tenant: str
    job_type: str | None
    requested_at: float
    by: str


@dataclass(frozen=True, slots=True)
class RedrivenMark:
    """The DLQ record at (partition, offset) went back to `jobs`."""

    tenant: str
    partition: int
    offset: int
    reason: str
    requested_at: float


@dataclass(frozen=True, slots=True)
class DemandReport:
    """A replica's load per tenant (`gateway.shares`)."""

    replica: str
    at: float
    demand: dict[str, Demand]


Command = CancelCommand | PauseCommand | CancelAllCommand | RedrivenMark | DemandReport


def _text(value: Any, limit: int = 200) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_control(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]], timestamp_ms: int
) -> Command | None:
    """The command a `jobs.control` record carries, or None for anything else."""
    tenants = header_value(headers, "tenant")
    if len(tenants) != 1 or not tenants[0] or value is None or len(value) > _MAX_COMMAND_BYTES:
        return None
    try:
        header_tenant = tenants[0].decode()
        body = json.loads(value)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, deep nesting
        return None
    if not isinstance(body, dict) or body.get("tenant") != header_tenant:
        return None
    at = _epoch(body.get("requested_at"), timestamp_ms)
    by = _text(body.get("by")) or "unknown"
    op = body.get("op")
    if op == "cancel":
        job_id = _text(body.get("id"), 1000)
        return CancelCommand(header_tenant, job_id, at) if job_id is not None else None
    if op in ("pause", "resume"):
        return PauseCommand(header_tenant, op == "pause", at, by)
    if op == "cancel_all":
        job_type = body.get("type")
        if job_type is not None and _text(job_type) is None:
            return None
        return CancelAllCommand(header_tenant, job_type, at, by)
    if op == "demand":
        return _demand(body, at)
    if op == "redriven":
        partition, offset = _int(body.get("partition")), _int(body.get("offset"))
        reason = _text(body.get("reason"), 64) or "unknown"
        if partition is None or offset is None:
            return None
        return RedrivenMark(header_tenant, partition, offset, reason, at)
    return None


def _demand(body: dict[str, Any], at: float) -> DemandReport | None:
    replica = _text(body.get("replica"))
    loads = body.get("demand")
    if replica is None or not isinstance(loads, dict):
        return None
    demand: dict[str, Demand] = {}
    for tenant, figures in loads.items():
        if not (isinstance(figures, list) and len(figures) == 3):
            return None
        waiting, running, started = (_int(figure) for figure in figures)
        if waiting is None or running is None or started is None:
            return None
        demand[tenant] = Demand(waiting, running, started)
    return DemandReport(replica, at, demand)


def _epoch(stamp: Any, fallback_ms: int) -> float:
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            pass
    return fallback_ms / 1000


class ControlListener:
    """Reads `jobs.control` from the beginning (no group) and hands each command to
    `on_command`; cancels older than `ttl_s` are skipped (state commands never are).

    Reading from the beginning rather than the end means a command published while this
    replica was starting is not missed, and a pause is in force before the first job.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        ttl_s: float,
        on_command: Callable[[Command], None],
        supervisor: Supervisor,
        *,
        name: str = "control",
    ) -> None:
        self._ttl_s = ttl_s
        self._on_command = on_command
        self._reader = TopicReader(
            settings,
            [topic],
            name=name,
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
                elif (
                    not isinstance(command, CancelCommand | DemandReport)
                    or (command.at if isinstance(command, DemandReport) else command.requested_at)
                    >= oldest
                ):
                    self._on_command(command)
