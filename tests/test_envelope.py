"""Envelope parsing: each bad input gets its contract reason; nothing raises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.catalog import load_catalog
from gateway.envelope import DlqReason, Job, Rejection, Source, parse_record
from gateway.flows import builtin_job_types

ROOT = Path(__file__).resolve().parent.parent
CATALOG = load_catalog(ROOT / "tenants", ROOT / "policies")
TYPES = builtin_job_types()


def parse(value: bytes | None, headers: list[tuple[str, bytes | None]], limit: int = 1024) -> Any:
    source = Source("jobs", 0, 7, value, tuple(headers), 0)
    return parse_record(source=source, catalog=CATALOG, known_types=TYPES, max_payload_bytes=limit)


def body(**fields: Any) -> bytes:
    return json.dumps({"id": "j1", "type": "echo", **fields}).encode()


ACME = [("tenant", b"acme")]


def test_valid_job() -> None:
    job = parse(body(payload={"x": 1}, deadline_s=2.5, max_attempts=2), ACME)
    assert isinstance(job, Job)
    assert (job.tenant, job.id, job.type, job.attempt) == ("acme", "j1", "echo", 1)
    assert job.payload == {"x": 1}
    assert job.deadline_s == 2.5
    assert job.max_attempts == 2


def test_id_from_header_and_retry_headers() -> None:
    value = json.dumps({"type": "echo"}).encode()
    headers = [*ACME, ("job-id", b"h1"), ("attempt", b"3"), ("not-before", b"1700")]
    job = parse(value, headers)
    assert isinstance(job, Job)
    assert (job.id, job.attempt, job.not_before_ms) == ("h1", 3, 1700)


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (body(), [], DlqReason.MISSING_TENANT),
        (body(), [("tenant", b"")], DlqReason.MISSING_TENANT),
        (body(), [("tenant", b"\xff\xfe")], DlqReason.MISSING_TENANT),
        (body(), [("tenant", None)], DlqReason.MISSING_TENANT),
        (body(), [("tenant", b"nobody")], DlqReason.UNKNOWN_TENANT),
        (body(), [("tenant", b"acme"), ("tenant", b"globex")], DlqReason.TENANT_MISMATCH),
        (body(), [("tenant", b"acme"), ("tenant", b"acme")], DlqReason.TENANT_MISMATCH),
        (body(tenant="globex"), ACME, DlqReason.TENANT_MISMATCH),
        (b"\xff\xfe{}", ACME, DlqReason.MALFORMED_JSON),
        (b"{not json", ACME, DlqReason.MALFORMED_JSON),
        (None, ACME, DlqReason.MALFORMED_JSON),
        (b'{"id":"a","type":"echo","payload":{"x":NaN}}', ACME, DlqReason.MALFORMED_JSON),
        (b"[1,2]", ACME, DlqReason.INVALID_JOB),
        (b'"text"', ACME, DlqReason.INVALID_JOB),
        (json.dumps({"type": "echo"}).encode(), ACME, DlqReason.INVALID_JOB),
        (body(id=""), ACME, DlqReason.INVALID_JOB),
        (body(id=5), ACME, DlqReason.INVALID_JOB),
        (body(type=""), ACME, DlqReason.INVALID_JOB),
        (body(type=["echo"]), ACME, DlqReason.INVALID_JOB),
        (body(payload=[1]), ACME, DlqReason.INVALID_JOB),
        (body(deadline_s="soon"), ACME, DlqReason.INVALID_JOB),
        (body(deadline_s=-1), ACME, DlqReason.INVALID_JOB),
        (body(deadline_s=True), ACME, DlqReason.INVALID_JOB),
        (body(max_attempts=0), ACME, DlqReason.INVALID_JOB),
        (body(max_attempts=1.5), ACME, DlqReason.INVALID_JOB),
        (body(), [*ACME, ("job-id", b"other")], DlqReason.INVALID_JOB),
        (body(), [*ACME, ("attempt", b"x")], DlqReason.INVALID_JOB),
        (body(type="nope"), ACME, DlqReason.UNKNOWN_TYPE),
        (body(payload={"x": "y" * 2000}), ACME, DlqReason.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_input_gets_its_reason(
    value: bytes | None, headers: list[tuple[str, bytes | None]], reason: DlqReason
) -> None:
    result = parse(value, headers)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_type_not_allowed_for_tenant(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "solo.toml").write_text(
        'id = "solo"\ntier = "free"\n[jobs]\nallowed_types=["echo"]\n'
    )
    catalog = load_catalog(tenants, ROOT / "policies")
    source = Source("jobs", 0, 0, body(type="sleep"), (("tenant", b"solo"),), 0)
    result = parse_record(source=source, catalog=catalog, known_types=TYPES, max_payload_bytes=999)
    assert isinstance(result, Rejection)
    assert result.reason == DlqReason.TYPE_NOT_ALLOWED
    assert (result.tenant, result.job_id) == ("solo", "j1")


def test_rejection_keeps_known_identity() -> None:
    result = parse(body(type="nope"), ACME)
    assert isinstance(result, Rejection)
    assert (result.tenant, result.job_id) == ("acme", "j1")


header_names = st.sampled_from(
    ["tenant", "job-id", "attempt", "not-before", "idempotency-key", "x"]
)
header_values = st.one_of(
    st.none(),
    st.binary(max_size=20),
    st.sampled_from([b"acme", b"globex", b"1", b"-3", b"j1"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values | st.text(max_size=5),
            "type": st.sampled_from(["echo", "sleep", "nope"]) | json_values,
            "payload": json_values,
            "tenant": st.sampled_from(["acme", "globex"]) | json_values,
            "deadline_s": json_values,
            "max_attempts": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=600, deadline=None)
@given(
    value=st.none() | bodies,
    headers=st.lists(st.tuples(header_names, header_values), max_size=5),
)
def test_fuzz_every_input_is_a_job_or_a_reason(
    value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    result = parse(value, headers, limit=150)
    assert isinstance(result, Job | Rejection)
    if isinstance(result, Job):
        assert CATALOG.get(result.tenant) is not None
        assert result.type in TYPES
        assert result.id
        assert [v for k, v in headers if k == "tenant"] == [result.tenant.encode()]
    else:
        assert isinstance(result.reason, DlqReason)
