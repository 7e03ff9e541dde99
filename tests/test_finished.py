"""Finished jobs are learned from jobs.results headers alone (pure handling of records)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from gateway.finished import FinishedJobs
from gateway.history import TerminalHistory
from gateway.records import Status
from gateway.settings import KafkaSettings
from gateway.tasks import Supervisor


@dataclass
class Record:
    value: bytes | None
    headers: list[tuple[str, bytes]]


def apply(*records: Record) -> TerminalHistory:
    history = TerminalHistory(100)
    finished = FinishedJobs(KafkaSettings(), "jobs.results", history, Supervisor())
    batches: dict[Any, list[Any]] = {TopicPartition("jobs.results", 0): list(records)}
    finished._apply(batches)
    return history


def headers(tenant: bytes, job_id: bytes, status: bytes) -> list[tuple[str, bytes]]:
    return [("tenant", tenant), ("job-id", job_id), ("status", status)]


def test_headers_decide_and_the_body_is_not_read() -> None:
    history = apply(Record(b"garbage", headers(b"acme", b"j1", b"succeeded")))
    assert history.get(("acme", "j1")) is Status.SUCCEEDED


def test_a_non_terminal_or_undecodable_header_is_ignored() -> None:
    history = apply(
        Record(b"{}", headers(b"acme", b"j1", b"running")),
        Record(b"{}", headers(b"\xff", b"j2", b"failed")),
        Record(b"{}", headers(b"acme", b"", b"failed")),
    )
    assert len(history) == 0


def test_a_record_without_the_headers_is_read_by_its_body() -> None:
    body = b'{"id":"j3","tenant":"globex","status":"cancelled","attempts":1}'
    history = apply(Record(body, []), Record(b"[" * 5000, []), Record(None, []))
    assert history.get(("globex", "j3")) is Status.CANCELLED
    assert len(history) == 1
