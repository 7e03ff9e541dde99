"""Every replica's view of `jobs.status`: latest status per job and recent terminal ids."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from cachetools import LRUCache

from gateway.history import TerminalHistory
from gateway.records import TERMINAL, Status
from gateway.settings import KafkaSettings
from gateway.tasks import cancel_and_wait

__all__ = ["JobStatus", "StatusView"]

log = logging.getLogger("gateway.status")


@dataclass(frozen=True, slots=True)
class JobStatus:
    """The latest transition seen for a job."""

    tenant: str
    job_id: str
    status: Status
    attempt: int
    at: str


class StatusView:
    """Reads `jobs.status` from the beginning (no group) into bounded memory."""

    def __init__(
        self, settings: KafkaSettings, topic: str, history: TerminalHistory, maxsize: int
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._history = history
        self._latest: LRUCache[tuple[str, str], JobStatus] = LRUCache(maxsize=maxsize)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()

    def get(self, key: tuple[str, str]) -> JobStatus | None:
        """Latest status of (tenant, job id), if seen."""
        return self._latest.get(key)

    def observe(self, status: JobStatus) -> None:
        """Apply one transition (also called for this replica's own outcomes)."""
        key = (status.tenant, status.job_id)
        current = self._latest.get(key)
        if current is not None and current.status in TERMINAL and status.status not in TERMINAL:
            return
        self._latest[key] = status
        if status.status in TERMINAL:
            self._history.remember(key, status.status)

    async def start(self) -> None:
        """Assign every partition of the topic and begin reading from the start."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.bootstrap_servers,
            client_id=f"{self._settings.client_id}-status",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._settings.fetch_max_wait_ms,
            request_timeout_ms=self._settings.request_timeout_ms,
        )
        await consumer.start()
        self._consumer = consumer
        await consumer.topics()  # loads metadata for every topic
        partitions = consumer.partitions_for_topic(self._topic) or set()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run(), name="gateway:status-view")

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
                batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            except KafkaError as exc:
                log.warning("status_fetch_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                continue
            if not batches:
                # A poll with nothing new: everything already on the topic is read.
                # (Log-end offsets from ListOffsets are not reliable on every broker.)
                self.caught_up.set()
            for records in batches.values():
                for record in records:
                    parsed = _parse(record.value)
                    if parsed is not None:
                        self.observe(parsed)


def _parse(value: bytes | None) -> JobStatus | None:
    if value is None:
        return None
    try:
        body = json.loads(value)
        return JobStatus(
            tenant=str(body["tenant"]),
            job_id=str(body["id"]),
            status=Status(body["status"]),
            attempt=int(body.get("attempt", 0)),
            at=str(body.get("at", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None
