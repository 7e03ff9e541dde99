"""What each attempt's outcome publishes, and the retry backoff (pure)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.catalog import load_catalog
from gateway.envelope import Job, Source
from gateway.outcomes import Decision, cancelled_records, decide, deferral_records
from gateway.records import Status
from gateway.retries import backoff_s, max_attempts
from gateway.runner import Outcome
from gateway.settings import RetrySettings, TopicSettings

ROOT = Path(__file__).resolve().parent.parent
CATALOG = load_catalog(ROOT / "tenants", ROOT / "policies")
TOPICS = TopicSettings()
RETRY = RetrySettings(base_s=1, factor=2, cap_s=10, jitter=0.0, max_attempts=3)


def job(attempt: int = 1, max_attempts: int | None = None, tenant: str = "initech") -> Job:
    source = Source("jobs", 0, 5, b'{"id":"j","type":"echo"}', (("tenant", tenant.encode()),), 0)
    return Job(tenant, "j", "echo", {}, None, max_attempts, attempt, None, None, source)


def decided(outcome: Outcome, the_job: Job) -> Decision:
    return decide(
        the_job,
        outcome,
        tenant=CATALOG.get(the_job.tenant),
        topics=TOPICS,
        retry=RETRY,
        started_at=100.0,
        finished_at=101.5,
        rng=random.Random(7),
        max_bytes=1_048_576,
        max_delay_s=86_400,
    )


def topics_of(decision: Decision) -> list[str]:
    return [record.topic for record in decision.records]


def test_success_is_a_result_and_a_terminal_status() -> None:
    decision = decided(Outcome(Status.SUCCEEDED, {"ok": 1}), job())
    assert (decision.status, decision.terminal) == (Status.SUCCEEDED, True)
    assert topics_of(decision) == ["jobs.results", "jobs.status"]
    body = json.loads(decision.records[0].value or b"")
    assert (body["attempts"], body["duration_ms"]) == (1, 1500.0)


def test_retryable_failure_goes_to_retry_with_the_next_attempt_and_backoff() -> None:
    decision = decided(Outcome(Status.FAILED, None, "boom", "x", retryable=True), job(attempt=2))
    assert (decision.status, decision.terminal) == (Status.RETRYING, False)
    assert topics_of(decision) == ["jobs.retry", "jobs.status"]
    headers = dict(decision.records[0].headers)
    assert headers["attempt"] == b"3"
    assert int(headers["not-before"]) == int((101.5 + 2.0) * 1000)  # base 1 * 2^(2-1)


def test_last_attempt_fails_for_good_and_dead_letters() -> None:
    decision = decided(Outcome(Status.FAILED, None, "boom", "x", retryable=True), job(attempt=3))
    assert (decision.status, decision.terminal) == (Status.FAILED, True)
    assert topics_of(decision) == ["jobs.results", "jobs.status", "jobs.dlq"]
    assert dict(decision.records[2].headers)["dlq-reason"] == b"max_attempts_exceeded"


def test_a_failure_that_is_not_the_jobs_retries_on_the_same_attempt() -> None:
    outage = Outcome(
        Status.FAILED, None, "secrets_unavailable", "x", True, counts_attempt=False, retry_after_s=7
    )
    decision = decided(outage, job(attempt=3))  # even on its last attempt
    headers = dict(decision.records[0].headers)
    assert (decision.status, headers["attempt"]) == (Status.RETRYING, b"3")
    assert int(headers["not-before"]) == int((101.5 + 7) * 1000)


@pytest.mark.parametrize("status", [Status.CANCELLED, Status.SUCCEEDED])
def test_cancelled_and_succeeded_never_retry(status: Status) -> None:
    decision = decided(Outcome(status, None, None, None, retryable=True), job())
    assert decision.terminal


def test_attempt_limits_job_then_tenant_then_setting() -> None:
    acme = CATALOG.get("acme")  # its file sets max_attempts = 5
    assert max_attempts(job(max_attempts=2), acme, RETRY) == 2
    assert max_attempts(job(), acme, RETRY) == 5
    assert max_attempts(job(), CATALOG.get("initech"), RETRY) == 3


@given(attempt=st.integers(min_value=1, max_value=10_000), seed=st.integers(0, 1000))
def test_property_backoff_is_within_jitter_and_cap(attempt: int, seed: int) -> None:
    settings = RetrySettings(base_s=0.5, factor=3, cap_s=60, jitter=0.5)
    delay = backoff_s(attempt, settings, random.Random(seed))
    full = min(60.0, 0.5 * 3.0 ** min(attempt - 1, 100))
    assert full * 0.5 - 1e-9 <= delay <= full + 1e-9


def test_cancelled_and_deferral_records() -> None:
    cancelled = cancelled_records(job(), topics=TOPICS, at=5.0)
    assert [json.loads(r.value or b"")["status"] for r in cancelled] == ["cancelled"] * 2
    deferral, status = deferral_records(job(attempt=2), topics=TOPICS, at=5.0, not_before_ms=9)
    assert deferral.topic == "jobs.deferred"
    assert dict(deferral.headers)["not-before"] == b"9"
    assert dict(deferral.headers)["attempt"] == b"2"
    assert json.loads(status.value or b"")["status"] == "deferred"
