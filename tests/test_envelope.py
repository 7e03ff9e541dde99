"""Envelope parsing: each bad input gets its contract reason; nothing raises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.catalog import load_catalog
from gateway.envelope import (
    DlqReason,
    InputLimits,
    Job,
    Rejection,
    Source,
    parse_record,
    valid_id,
)
from gateway.flows import builtin_job_types
from gateway.outcomes import deferral_records, rejection_records
from gateway.records import record_size
from gateway.settings import TopicSettings

ROOT = Path(__file__).resolve().parent.parent
CATALOG = load_catalog(ROOT / "tenants", ROOT / "policies")
TYPES = builtin_job_types()


NOW_MS = 1_800_000_000_000


def limits(payload: int = 1024) -> InputLimits:
    return InputLimits(max_payload_bytes=payload, max_delay_ms=86_400_000)


def parse(value: bytes | None, headers: list[tuple[str, bytes | None]], limit: int = 1024) -> Any:
    source = Source("jobs", 0, 7, value, tuple(headers), 0)
    return parse_record(
        source=source, catalog=CATALOG, known_types=TYPES, limits=limits(limit), now_ms=NOW_MS
    )


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
    result = parse_record(
        source=source, catalog=catalog, known_types=TYPES, limits=limits(999), now_ms=NOW_MS
    )
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


@settings(max_examples=300, deadline=None)
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


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# -- containment: the contract's limits, and totality over hostile input ----------------

HUGE = 10**400


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b'{"id":"x","type":"echo","deadline_s":' + b"1" * 400 + b"}", ACME, "invalid_job"),
        (b'{"id":"x","type":"echo","payload":{"n":' + b"1" * 5000 + b"}}", ACME, "malformed_json"),
        (body(deadline_s=-1), ACME, "invalid_job"),
        (body(deadline_s=0), ACME, "invalid_job"),
        (body(deadline_s=10**6), ACME, "invalid_job"),  # over acme's max_deadline_s
        (b'{"id":"x","type":"echo","deadline_s":1e999}', ACME, "malformed_json"),
        (b'{"id":"x","type":"echo","payload":{"x":NaN}}', ACME, "malformed_json"),
        (b'{"id":"x","type":"echo","payload":{"x":-Infinity}}', ACME, "malformed_json"),
        (body(max_attempts=10**30), ACME, "invalid_job"),
        (body(max_attempts=0), ACME, "invalid_job"),
        (body(max_attempts=101), ACME, "invalid_job"),
        (body(max_attempts=2.0), ACME, "invalid_job"),
        (body(priority=10), ACME, "invalid_job"),
        (body(priority=-1), ACME, "invalid_job"),
        (body(priority="high"), ACME, "invalid_job"),
        (body(), [*ACME, ("not-before", b"1" * 30)], "invalid_job"),
        (body(), [*ACME, ("not-before", b"-5")], "invalid_job"),
        (body(), [*ACME, ("not-before", str(NOW_MS + 10**12).encode())], "invalid_job"),
        (body(), [*ACME, ("attempt", b"0")], "invalid_job"),
        (body(), [*ACME, ("attempt", b"101")], "invalid_job"),
        (body(), [*ACME, ("attempt", "\u0663".encode())], "invalid_job"),  # an Arabic 3
        (b"[" * 100_000 + b"]" * 100_000, ACME, "malformed_json"),
        (
            json.dumps({"id": "x", "type": "echo", "payload": _deep(70)}).encode(),
            ACME,
            "invalid_job",
        ),
        (b'{"id":"x","type":"echo","payload":{"s":"\\ud800"}}', ACME, "invalid_job"),
        (b'{"id":"x","type":"echo","payload":{"\\udfff":1}}', ACME, "invalid_job"),
        (b'{"id":"\\ud800","type":"echo"}', ACME, "invalid_job"),
        (body(id="x" * 201), ACME, "invalid_job"),
        (body(id="a\nb"), ACME, "invalid_job"),
        (body(type="t" * 201), ACME, "invalid_job"),
        (body(), [*ACME, ("job-id", b"\xff")], "invalid_job"),
        (body(), [*ACME, ("job-id", b"j1"), ("job-id", b"j1")], "invalid_job"),
        (body(), [*ACME, ("idempotency-key", b"\xff\xfe")], "invalid_job"),
        (body(), [*ACME, ("idempotency-key", b"k" * 201)], "invalid_job"),
        (body(), [*ACME, *[("x", b"1")] * 65], "invalid_headers"),
        (body(), [*ACME, ("x", b"v" * 17_000)], "invalid_headers"),
        (b"not json", [*ACME, ("job-id", b"i" * 400_000)], "invalid_headers"),
        (body(), [*ACME, ("attempt", b"1"), ("attempt", b"1")], "invalid_headers"),
        (None, [*ACME, ("job-id", b"n1")], "malformed_json"),
    ],
)
def test_hostile_records_get_their_reason(
    value: bytes | None, headers: list[tuple[str, bytes | None]], reason: str
) -> None:
    result = parse(value, headers, limit=2_000_000)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail
    assert len(result.detail) <= 300
    detail_bytes = result.detail.encode()  # always encodable, whatever the input was
    assert detail_bytes


def test_a_null_value_with_a_job_id_header_names_the_job() -> None:
    result = parse(None, [*ACME, ("job-id", b"n1")])
    assert isinstance(result, Rejection)
    assert (result.tenant, result.job_id) == ("acme", "n1")


def test_gateway_headers_do_not_count_against_the_tenant_bound() -> None:
    headers = [*ACME, *[(f"h{i}", b"v") for i in range(63)]]
    headers += [("attempt", b"2"), ("not-before", b"5"), ("redriven-from", b"jobs.dlq/0/1")]
    job = parse(body(), headers)
    assert isinstance(job, Job), job
    assert job.attempt == 2


def test_big_integers_inside_a_payload_are_fine() -> None:
    job = parse(body(payload={"n": HUGE}), ACME, limit=10_000)
    assert isinstance(job, Job)
    assert job.payload == {"n": HUGE}
    assert job.priority == 5


weird_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
    max_size=12,
)
weird_numbers = st.one_of(
    st.integers(min_value=-(10**450), max_value=10**450),
    st.floats(allow_nan=True, allow_infinity=True),
)
weird_json = st.recursive(
    st.none() | st.booleans() | weird_numbers | weird_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(weird_text, children, max_size=3)
    ),
    max_leaves=8,
)


def _json_text(value: Any) -> bytes:
    # json.dumps writes NaN/Infinity and escapes lone surrogates: the hostile forms.
    return json.dumps(value, allow_nan=True).encode()


hostile_bodies = st.one_of(
    st.binary(max_size=300),
    weird_json.map(_json_text),
    st.fixed_dictionaries(
        {},
        optional={
            "id": weird_json | weird_text,
            "type": st.sampled_from(["echo", "sleep"]) | weird_text,
            "payload": weird_json,
            "tenant": st.sampled_from(["acme", "globex"]) | weird_json,
            "deadline_s": weird_numbers | weird_json,
            "max_attempts": weird_numbers | weird_json,
            "priority": weird_numbers | weird_json,
        },
    ).map(_json_text),
    st.integers(min_value=1, max_value=200).map(lambda n: b"[" * n + b"]" * n),
)
hostile_headers = st.lists(
    st.tuples(
        st.sampled_from(["tenant", "job-id", "attempt", "not-before", "idempotency-key"])
        | weird_text,
        st.none() | st.binary(max_size=40) | st.sampled_from([b"acme", b"j1", b"3", b"1" * 25]),
    ),
    max_size=8,
)


@settings(max_examples=500, deadline=None)
@given(value=st.none() | hostile_bodies, headers=hostile_headers)
def test_property_any_record_is_a_job_or_a_reason_and_its_records_fit(
    value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    result = parse(value, headers, limit=250)
    assert isinstance(result, Job | Rejection)
    topics = TopicSettings()
    if isinstance(result, Rejection):
        assert isinstance(result.reason, DlqReason)
        records = rejection_records(result, topics=topics, at=1.0, max_bytes=4096)
    else:
        assert CATALOG.get(result.tenant) is not None
        assert valid_id(result.id)
        assert 0 <= result.priority <= 9
        records = deferral_records(result, topics=topics, at=1.0, not_before_ms=NOW_MS)
    for record in records:
        assert record_size(record) <= 4096 or record.topic != topics.dlq
