"""Cancel commands on jobs.control: parsing (total) and the pending-cancel memory (pure)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.control import PendingCancels, parse_control
from gateway.envelope import Job, Source
from gateway.records import delayed_record


def command(**fields: object) -> bytes:
    body = {
        "op": "cancel",
        "id": "j1",
        "tenant": "acme",
        "requested_at": "2026-01-02T03:04:05.000Z",
    }
    body.update(fields)
    return json.dumps(body).encode()


def test_a_valid_cancel() -> None:
    parsed = parse_control(command(), [("tenant", b"acme")], 0)
    assert parsed is not None
    assert parsed.key == ("acme", "j1")
    assert parsed.requested_at == pytest.approx(1767323045.0)


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (command(), []),
        (command(), [("tenant", b"globex")]),  # header and body disagree
        (command(), [("tenant", b"acme"), ("tenant", b"acme")]),
        (command(tenant=["acme"]), [("tenant", b"acme")]),
        (command(op="delete"), [("tenant", b"acme")]),
        (command(id=""), [("tenant", b"acme")]),
        (command(id=5), [("tenant", b"acme")]),
        (None, [("tenant", b"acme")]),
        (b"[" * 100_000 + b"]" * 100_000, [("tenant", b"acme")]),
        (b"\xff", [("tenant", b"acme")]),
        (command(pad="x" * 70_000), [("tenant", b"acme")]),
    ],
)
def test_anything_else_is_ignored(value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    assert parse_control(value, headers, 0) is None


@given(
    value=st.none() | st.binary(max_size=200),
    headers=st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=4),
)
def test_property_parsing_never_raises(
    value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    parse_control(value, headers, 0)


def test_old_requested_at_falls_back_to_the_record_time() -> None:
    parsed = parse_control(command(requested_at="yesterday"), [("tenant", b"acme")], 5000)
    assert parsed is not None
    assert parsed.requested_at == 5.0


def test_pending_cancels_expire() -> None:
    cancels = PendingCancels(10, ttl_s=0.05)
    cancels.add(("acme", "j1"))
    assert ("acme", "j1") in cancels
    assert ("globex", "j1") not in cancels
    time.sleep(0.06)
    assert ("acme", "j1") not in cancels
    assert "not a key" not in cancels


def _job(topic: str, written_ms: int, headers: tuple[tuple[str, bytes | None], ...] = ()) -> Job:
    source = Source(topic, 0, 7, b"{}", (("tenant", b"acme"), *headers), written_ms)
    return Job(
        tenant="acme",
        id="j1",
        type="echo",
        payload={},
        deadline_s=None,
        max_attempts=None,
        attempt=1,
        not_before_ms=None,
        idempotency_key=None,
        source=source,
    )


def test_a_bulk_cancel_covers_copies_written_after_it_of_jobs_written_before() -> None:
    # The job reached `jobs` at t=100 s; the operator cancels the tenant's jobs at
    # t=150 s; a deferral copy of it is written at t=160 s, before this replica has
    # applied the cancel: the copy is still the job of t=100 s, and is cancelled.
    cancels = PendingCancels(10, ttl_s=60.0, bulk_ttl_s=1e12)
    cancels.add_bulk("acme", None, 150.0)
    fresh = _job("jobs", 100_000)
    assert cancels.covers(fresh)
    record = delayed_record("jobs.deferred", fresh, attempt=1, not_before_ms=170_000)
    copy = _job("jobs.deferred", 160_000, tuple(record.headers))
    assert cancels.covers(copy)
    # ... and a copy of that copy keeps the first time.
    again = delayed_record("jobs.deferred", copy, attempt=1, not_before_ms=180_000)
    assert dict(again.headers)["first-written-ms"] == b"100000"
    # A job written after the cancel is not covered, whatever header it carries.
    later = _job("jobs", 200_000, (("first-written-ms", b"999999"),))
    assert not cancels.covers(later)
    forged = _job("jobs", 140_000, (("first-written-ms", b"999999"),))
    assert cancels.covers(forged)  # a later stamp cannot take it out of reach
