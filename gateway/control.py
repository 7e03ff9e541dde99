"""Cancel commands: every replica reads `jobs.control`; the one holding the job acts.

A cancel for a job this replica does not hold (still in a topic, waiting in another
replica's retry timer, or not read yet) is remembered for `cancel_ttl_s`, so that
the job is cancelled when it arrives here instead of starting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from cachetools import TTLCache

from gateway.envelope import header_value
from gateway.settings import KafkaSettings
from gateway.tasks import cancel_and_wait

__all__ = ["CancelCommand", "ControlListener", "PendingCancels", "parse_control"]

log = logging.getLogger("gateway.control")

JobKey = tuple[str, str]


class PendingCancels:
    """Bounded, expiring memory of cancel requests for jobs not held here (yet)."""

    def __init__(self, maxsize: int, ttl_s: float) -> None:
        self._keys: TTLCache[JobKey, float] = TTLCache(maxsize=maxsize, ttl=ttl_s)

    def add(self, key: JobKey) -> None:
        """Remember a cancel of (tenant, job id)."""
        self._keys[key] = time.time()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


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
    try:
        header_tenant = tenants[0].decode()
        body = json.loads(value)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(body, dict) or body.get("op") != "cancel":
        return None
    job_id, tenant = body.get("id"), body.get("tenant")
    if not isinstance(job_id, str) or not job_id or tenant != header_tenant:
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
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._ttl_s = ttl_s
        self._on_cancel = on_cancel
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        """Assign every partition of the topic and begin reading."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.bootstrap_servers,
            client_id=f"{self._settings.client_id}-control",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._settings.fetch_max_wait_ms,
            request_timeout_ms=self._settings.request_timeout_ms,
        )
        await consumer.start()
        self._consumer = consumer
        await consumer.topics()
        partitions = consumer.partitions_for_topic(self._topic) or set()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run(), name="gateway:control")

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            except KafkaError as exc:
                log.warning("control_fetch_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                continue
            if not batches:
                self.caught_up.set()
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
