"""End to end on a real Tansu broker: jobs in, results and dead letters out, offsets committed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.catalog import load_catalog
from gateway.service import Gateway
from gateway.settings import Settings

from conftest import JobClient, committed_offsets, read_topic, results_by_id, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    running = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


MALFORMED: list[tuple[str | None, bytes | None, list[tuple[str, bytes]], str]] = [
    ("acme", b"{not json", [], "malformed_json"),
    ("acme", b"\xff\xfe\x00", [], "malformed_json"),
    (None, json.dumps({"id": "m1", "type": "echo"}).encode(), [], "missing_tenant"),
    ("nobody", json.dumps({"id": "m2", "type": "echo"}).encode(), [], "unknown_tenant"),
    (
        "acme",
        json.dumps({"id": "m3", "type": "echo", "tenant": "globex"}).encode(),
        [],
        "tenant_mismatch",
    ),
    ("acme", json.dumps({"id": "m4", "type": "teleport"}).encode(), [], "unknown_type"),
    ("acme", json.dumps({"type": "echo"}).encode(), [], "invalid_job"),
    (
        "acme",
        json.dumps({"id": "m5", "type": "echo"}).encode(),
        [("tenant", b"globex")],
        "tenant_mismatch",
    ),
    (
        "acme",
        json.dumps({"id": "m6", "type": "echo", "payload": {"x": "y" * 1_100_000}}).encode(),
        [],
        "payload_too_large",
    ),
]


async def test_two_hundred_jobs_and_malformed_records(gateway: Gateway, client: JobClient) -> None:
    settings = client.settings
    expected: dict[str, tuple[str, str]] = {}
    for n in range(200):
        tenant = "acme" if n % 2 else "globex"
        kind = n % 10
        job_id = f"job-{n}"
        if kind == 0:
            await client.job(tenant, job_id, "fail")  # permanent failure
            expected[job_id] = (tenant, "failed")
        elif kind == 1:
            await client.job(tenant, job_id, "sleep", seconds=0.01)
            expected[job_id] = (tenant, "succeeded")
        else:
            await client.job(tenant, job_id, "echo", n=n)
            expected[job_id] = (tenant, "succeeded")
        if n % 25 == 0:
            bad_tenant, value, extra, _ = MALFORMED[(n // 25) % len(MALFORMED)]
            await client.send(bad_tenant, value, headers=extra)
    sent_bad = [MALFORMED[(n // 25) % len(MALFORMED)] for n in range(0, 200, 25)]
    for bad_tenant, value, extra, _ in MALFORMED[len(sent_bad) :]:
        await client.send(bad_tenant, value, headers=extra)
    await client.flush()

    # A dead-lettered job whose tenant and id are both certain also gets a `rejected`
    # result; with conflicting tenant claims (m3, m5) or an unread body (m6) it does not.
    rejected_with_id = {"m4"}
    results = await read_topic(
        settings, settings.topics.results, until=200 + len(rejected_with_id), settle_s=1.0
    )
    grouped = results_by_id(results)
    jobs = {k: v for k, v in grouped.items() if k.startswith("job-")}
    assert len(jobs) == 200
    assert all(len(v) == 1 for v in jobs.values()), "one terminal record per job id"
    for job_id, (tenant, status) in expected.items():
        body = jobs[job_id][0]
        assert (body["tenant"], body["status"]) == (tenant, status), job_id
        assert body["finished_at"].endswith("Z")
    assert jobs["job-2"][0]["result"] == {"n": 2}
    assert jobs["job-0"][0]["error"]["code"] == "requested_failure"
    assert {k for k, v in grouped.items() if v[0]["status"] == "rejected"} == rejected_with_id

    dlq = await read_topic(settings, settings.topics.dlq, until=len(MALFORMED), settle_s=1.0)
    reasons = Counter(dict(r.headers)["dlq-reason"].decode() for r in dlq)
    assert reasons == Counter(reason for *_, reason in MALFORMED)
    for record in dlq:
        headers = dict(record.headers)
        assert headers["source-topic"].decode() == settings.topics.jobs
        assert int(headers["source-offset"]) >= 0

    # Offsets committed behind finished work cover every record. (Tansu's ListOffsets
    # answers are unreliable, so the log end is taken from the records themselves.)
    sent = await read_topic(settings, settings.topics.jobs, until=209)
    assert len(sent) == 209
    ends = {
        p: 1 + max(r.offset for r in sent if r.partition == p) for p in {r.partition for r in sent}
    }

    async def covered() -> bool:
        return await committed_offsets(settings, settings.topics.jobs) == ends

    await wait_for(covered, 15)


async def test_status_transitions_are_published(gateway: Gateway, client: JobClient) -> None:
    await client.job("acme", "s1", "echo")
    await client.flush()
    statuses = await read_topic(
        client.settings, client.settings.topics.status, until=2, settle_s=0.5
    )
    bodies = [json.loads(r.value) for r in statuses if json.loads(r.value)["id"] == "s1"]
    assert [b["status"] for b in bodies] == ["running", "succeeded"]
    assert all(dict(r.headers)["tenant"] == b"acme" for r in statuses)


async def test_a_finished_job_sent_again_is_not_run_again(
    settings: Settings, client: JobClient
) -> None:
    # A fresh gateway knows finished jobs only from `jobs.results`: by the contract's
    # headers, or by the body of a record written without them.
    results = settings.topics.results
    await client.producer.send(
        results,
        json.dumps({"id": "old-h", "tenant": "acme", "status": "succeeded"}).encode(),
        key=b"old-h",
        headers=[("tenant", b"acme"), ("job-id", b"old-h"), ("status", b"succeeded")],
    )
    await client.producer.send(
        results,
        json.dumps({"id": "old-b", "tenant": "acme", "status": "failed", "attempts": 2}).encode(),
        key=b"old-b",
    )
    # Headers that do not say "finished" (here a non-terminal status) are not trusted
    # over them, whatever the body says: that job runs.
    await client.producer.send(
        results,
        json.dumps({"id": "odd", "tenant": "acme", "status": "succeeded"}).encode(),
        key=b"odd",
        headers=[("tenant", b"acme"), ("job-id", b"odd"), ("status", b"retrying")],
    )
    for job_id in ("old-h", "old-b", "odd", "new"):
        await client.job("acme", job_id, "echo")
    # Another tenant's job with a finished id of acme's is its own job, and runs.
    await client.job("globex", "old-h", "echo")
    await client.flush()
    running = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        records = await read_topic(settings, results, until=6, settle_s=1.0)
    finally:
        await running.stop()
    bodies = [json.loads(r.value) for r in records]
    assert Counter((b["tenant"], b["id"]) for b in bodies) == {
        ("acme", "old-h"): 1,
        ("acme", "old-b"): 1,
        ("acme", "odd"): 2,
        ("acme", "new"): 1,
        ("globex", "old-h"): 1,
    }
    committed = await committed_offsets(settings, settings.topics.jobs)
    assert sum(offset or 0 for offset in committed.values()) == 5  # skipped ones finished too
