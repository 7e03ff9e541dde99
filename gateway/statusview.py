"""The API process's view of `jobs.status` and `jobs.results`: the latest status per job
and the result record of terminal jobs, for `GET /v1/jobs/{id}` on any replica."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

from cachetools import LRUCache

from gateway.records import TERMINAL, Status
from gateway.settings import KafkaSettings
from gateway.topicreader import Batches, TopicReader

__all__ = ["JobStatus", "StatusView", "parse_result"]

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
    """Reads `jobs.status` and `jobs.results` from the beginning, with no group, into
    bounded memory: statuses by count, result records by total size (0: none kept, the
    terminal statuses still are). Used on one event loop (the API process's); nothing
    here is shared between threads."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        maxsize: int,
        *,
        results_topic: str,
        result_cache_bytes: int,
    ) -> None:
        self._results_topic = results_topic
        self._latest: LRUCache[tuple[str, str], JobStatus] = LRUCache(maxsize=maxsize)
        self._results: LRUCache[tuple[str, str], bytes] = LRUCache(
            maxsize=max(1, result_cache_bytes), getsizeof=len
        )
        self._keep_results = result_cache_bytes > 0
        self._reader = TopicReader(
            settings,
            [topic, results_topic],
            name="status",
            handle=self._apply,
            max_records=2000,
            logger=log,
        )
        self.caught_up = self._reader.caught_up

    def get(self, key: tuple[str, str]) -> JobStatus | None:
        """Latest status of (tenant, job id), if seen."""
        return self._latest.get(key)

    def knows(self, key: tuple[str, str]) -> bool:
        """Whether (tenant, job id) has been seen, without touching its recency."""
        return key in self._latest

    def observe(self, status: JobStatus) -> None:
        """Apply one transition (read back, or handed over by this replica's gateway)."""
        key = (status.tenant, status.job_id)
        current = self._latest.get(key)
        terminal = current is not None and current.status in TERMINAL
        if terminal and status.status not in TERMINAL:
            return
        self._latest[key] = status

    def result(self, key: tuple[str, str]) -> bytes | None:
        """The `jobs.results` record value of (tenant, job id), while it is cached."""
        return self._results.get(key)

    def observe_result(self, value: bytes | None, status: JobStatus | None = None) -> None:
        """Keep a terminal result record and apply its status; a caller that already
        knows the status (this replica's own outcomes) passes it to skip parsing."""
        parsed = status if status is not None else parse_result(value)
        if parsed is None or value is None:
            return
        key = (parsed.tenant, parsed.job_id)
        if self._keep_results:
            with contextlib.suppress(ValueError):  # over the whole cache: not kept
                self._results[key] = value
        self.observe(parsed)

    async def start(self) -> None:
        """Assign every partition of the topics and begin reading from the start."""
        await self._reader.start()

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        await self._reader.stop()

    def _apply(self, batches: Batches) -> None:
        for tp, records in batches.items():
            if tp.topic == self._results_topic:
                for record in records:
                    self.observe_result(record.value)
                continue
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


def parse_result(value: bytes | None) -> JobStatus | None:
    """The terminal status a `jobs.results` record carries."""
    if value is None:
        return None
    try:
        body = json.loads(value)
        status = Status(body["status"])
        if status not in TERMINAL:
            return None
        return JobStatus(
            tenant=str(body["tenant"]),
            job_id=str(body["id"]),
            status=status,
            attempt=int(body.get("attempts") or 0),
            at=str(body.get("finished_at", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None
