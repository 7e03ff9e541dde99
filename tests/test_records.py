"""Output records always fit the broker's limit; secrets are scrubbed before texts are cut."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.catalog import load_catalog
from gateway.envelope import DlqReason, Job, Rejection, Source
from gateway.errors import SecretForbidden
from gateway.outcomes import decide, rejection_records
from gateway.records import Status, dlq_record, record_size, rfc3339
from gateway.runner import MAX_ERROR_TEXT, Outcome, finish_outcome
from gateway.settings import RetrySettings, TopicSettings
from gateway.vault import redact, tenant_secret_path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = TopicSettings()
LIMIT = 1_048_576
ACME = load_catalog(ROOT / "tenants", ROOT / "policies").get("acme")


def job(value: bytes, headers: tuple[tuple[str, bytes | None], ...] = ()) -> Job:
    source = Source("jobs", 0, 1, value, (("tenant", b"acme"), *headers), 0)
    return Job("acme", "j1", "echo", {}, None, None, 1, None, None, source)


def decided(outcome: Outcome, the_job: Job | None = None) -> Any:
    return decide(
        the_job or job(b"{}"),
        outcome,
        tenant=ACME,
        topics=TOPICS,
        retry=RetrySettings(),
        started_at=1.0,
        finished_at=2.0,
        rng=random.Random(1),
        max_bytes=LIMIT,
        max_delay_s=86_400,
    )


def test_a_result_too_large_becomes_a_small_failure() -> None:
    payload = {"blob": "x" * (LIMIT - 200)}  # with the result's envelope: over the limit
    decision = decided(Outcome(Status.SUCCEEDED, payload))
    assert decision.status is Status.FAILED
    assert decision.error_code == "result_too_large"
    result, status = decision.records
    body = json.loads(result.value)
    assert (body["status"], body["error"]["code"], body["result"]) == (
        "failed",
        "result_too_large",
        None,
    )
    assert json.loads(status.value)["status"] == "failed"
    assert all(record_size(r) < 2000 for r in decision.records)


def test_a_result_that_fits_is_kept_and_has_a_fallback() -> None:
    decision = decided(Outcome(Status.SUCCEEDED, {"ok": True}))
    assert decision.status is Status.SUCCEEDED
    result = decision.records[0]
    assert json.loads(result.value)["result"] == {"ok": True}
    # If the broker refuses it after all, a small failed result goes instead.
    (fallback,) = result.fallback
    assert json.loads(fallback.value)["error"]["code"] == "result_rejected"


def test_dlq_copy_of_a_four_megabyte_record_is_cut_to_fit() -> None:
    source = Source("jobs", 2, 9, b"v" * 4_000_000, (("tenant", b"acme"),), 0)
    record = dlq_record(TOPICS.dlq, source, DlqReason.PAYLOAD_TOO_LARGE, "too big", max_bytes=LIMIT)
    assert record_size(record) <= LIMIT
    assert record.value is not None
    assert 0 < len(record.value) < 4_000_000
    detail = dict(record.headers)["dlq-detail"].decode()
    assert f"value truncated from 4000000 to {len(record.value)} bytes" in detail


def test_dlq_copy_with_huge_headers_drops_what_does_not_fit() -> None:
    headers = (("tenant", b"acme"), ("job-id", b"i" * 400_000), ("x", b"y" * 900_000))
    source = Source("jobs", 0, 3, b"not json", headers, 0)
    rejection = Rejection(DlqReason.INVALID_HEADERS, "headers too big", source, tenant="acme")
    records = rejection_records(rejection, topics=TOPICS, at=1.0, max_bytes=LIMIT)
    assert len(records) == 1  # no valid id: no result
    (record,) = records
    assert record_size(record) <= LIMIT
    names = [name for name, _ in record.headers]
    assert names[-5:] == [
        "dlq-reason",
        "dlq-detail",
        "source-topic",
        "source-partition",
        "source-offset",
    ]
    assert "headers kept" in dict(record.headers)["dlq-detail"].decode()


@settings(max_examples=200, deadline=None)
@given(
    value=st.none() | st.binary(max_size=5000),
    headers=st.lists(
        st.tuples(st.text(max_size=20), st.none() | st.binary(max_size=3000)), max_size=6
    ),
    limit=st.integers(min_value=1024, max_value=8192),
)
def test_property_dlq_copies_always_fit(
    value: bytes | None, headers: list[tuple[str, bytes | None]], limit: int
) -> None:
    source = Source("jobs", 1, 2, value, tuple(headers), 0)
    record = dlq_record(TOPICS.dlq, source, DlqReason.INVALID_JOB, "detail \ud800", max_bytes=limit)
    assert record_size(record) <= limit
    assert dict(record.headers)["dlq-reason"] == b"invalid_job"


def test_secrets_are_scrubbed_before_the_text_is_cut() -> None:
    secret = "s3cr3t-value-0123456789"
    # The secret straddles the cut: cutting first would leave its first half.
    message = "e" * (MAX_ERROR_TEXT - 8) + secret + " tail"
    outcome = finish_outcome(
        Outcome(Status.FAILED, None, "job_error", message, True), frozenset({secret})
    )
    assert outcome.error_message is not None
    assert len(outcome.error_message) <= MAX_ERROR_TEXT
    assert secret[:6] not in outcome.error_message
    assert outcome.error_message == ("e" * (MAX_ERROR_TEXT - 8) + "[redacted]")[:MAX_ERROR_TEXT]


@pytest.mark.parametrize(
    "secret", ['pa"ss\\word', "ümlaut-secret", "tab\tsecret", "line\nsecret", "quote'secret"]
)
def test_escaped_forms_of_secrets_are_scrubbed(secret: str) -> None:
    texts = [
        f"repr: {secret!r}",
        f"json: {json.dumps(secret)}",
        f"ascii json: {json.dumps(secret, ensure_ascii=True)}",
        f"plain: {secret}",
    ]
    scrubbed = redact({"errors": texts, secret: "as a key"}, [secret])
    flat = json.dumps(scrubbed, ensure_ascii=False)
    for form in (secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]):
        assert form not in flat, form
    assert flat.count("[redacted]") >= 5


@pytest.mark.parametrize("path", ["app\n", "app/\n", "../x", "a/../b", "", "/abs", "a//b", "a b"])
def test_vault_paths_must_match_in_full(path: str) -> None:
    with pytest.raises(SecretForbidden):
        tenant_secret_path("acme", path)


def test_vault_path_below_the_tenant() -> None:
    assert tenant_secret_path("acme", "app/db-1") == "tenants/acme/app/db-1"


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_rfc3339_is_the_instant_to_the_millisecond(epoch_s: float) -> None:
    text = rfc3339(epoch_s)
    assert len(text) == 24
    assert text.endswith("Z")
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - epoch_s) < 0.001 + 1e-6
