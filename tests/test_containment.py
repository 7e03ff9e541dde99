"""Containment on a real broker: no record can stop, stall or restart-loop the gateway.

Hostile records of every kind the `jobs` contract bounds, interleaved with good jobs,
through a real `gateway run` process, then a restart; an unexpected error in one
record's handling; a long-lived task that dies; results too large to publish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer import message_accumulator as accumulator
from aiokafka.producer import producer as producer_module
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from penguiflow import Message, Node, NodePolicy

import gateway.admission
from gateway.catalog import load_catalog
from gateway.flows import FlowGraph, JobContext, builtin_job_types
from gateway.service import Gateway
from gateway.settings import Settings

from conftest import JobClient, committed_offsets, read_topic, results_by_id, wait_for

pytestmark = pytest.mark.integration

ACME = ("tenant", b"acme")


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _body(job_id: str, **fields: Any) -> bytes:
    return json.dumps({"id": job_id, "type": "echo", **fields}).encode()


# (case, value, headers after `tenant=acme` unless the case sets its own, DLQ reason,
#  job id that gets a `rejected` result or None)
HOSTILE: list[tuple[str, bytes | None, list[tuple[str, bytes]] | None, str, str | None]] = [
    (
        "huge-deadline",
        b'{"id":"h1","type":"echo","deadline_s":' + b"1" * 400 + b"}",
        [],
        "invalid_job",
        "h1",
    ),
    (
        "huge-int-5000",
        b'{"id":"h2","type":"echo","payload":{"n":' + b"9" * 5000 + b"}}",
        [],
        "malformed_json",
        None,
    ),
    ("nan", b'{"id":"h3","type":"echo","payload":{"x":NaN}}', [], "malformed_json", None),
    ("infinity", b'{"id":"h4","type":"echo","deadline_s":1e999}', [], "malformed_json", None),
    ("negative-deadline", _body("h5", deadline_s=-3), [], "invalid_job", "h5"),
    ("absurd-deadline", _body("h6", deadline_s=1e300), [], "invalid_job", "h6"),
    ("max-attempts-1e30", _body("h7", max_attempts=10**30), [], "invalid_job", "h7"),
    ("max-attempts-0", _body("h8", max_attempts=0), [], "invalid_job", "h8"),
    ("not-before-absurd", _body("h9"), [("not-before", b"9" * 40)], "invalid_job", "h9"),
    ("attempt-absurd", _body("h10"), [("attempt", b"100000")], "invalid_job", "h10"),
    ("deep-100000", b"[" * 100_000 + b"]" * 100_000, [], "malformed_json", None),
    (
        "deep-80",
        json.dumps({"id": "h11", "type": "echo", "payload": {"a": _deep(80)}}).encode(),
        [],
        "invalid_job",
        "h11",
    ),
    (
        "lone-surrogate",
        b'{"id":"h12","type":"echo","payload":{"s":"\\ud800"}}',
        [],
        "invalid_job",
        "h12",
    ),
    ("surrogate-id", b'{"id":"\\udc00","type":"echo"}', [], "invalid_job", None),
    ("bad-utf8-tenant", _body("h13"), [("tenant", b"\xff\xfe")], "missing_tenant", None),
    ("bad-utf8-job-id", _body("h14"), [("job-id", b"\xc3\x28")], "invalid_job", None),
    ("null-value", None, [("job-id", b"h15")], "malformed_json", "h15"),
    (
        "duplicate-tenant",
        _body("h16"),
        [("tenant", b"acme"), ("tenant", b"globex")],
        "tenant_mismatch",
        None,
    ),
    (
        "duplicate-job-id",
        _body("h17"),
        [("job-id", b"h17"), ("job-id", b"h17")],
        "invalid_job",
        None,
    ),
    ("huge-id", _body("i" * 5000), [], "invalid_job", None),
    ("huge-job-id-header", b"not json", [("job-id", b"j" * 400_000)], "invalid_headers", None),
    ("many-headers", _body("h18"), [(f"x{i}", b"1") for i in range(70)], "invalid_headers", None),
    ("priority-10", _body("h19", priority=10), [], "invalid_job", "h19"),
    (
        "four-megabytes",
        b'{"id":"h20","type":"echo","payload":{"b":"' + b"b" * 4_000_000 + b'"}}',
        [],
        "payload_too_large",
        None,
    ),
]


async def _send_hostile(client: JobClient, case: str, value: bytes | None, headers: Any) -> None:
    extra = list(headers or [])
    if not any(name == "tenant" for name, _ in extra):
        extra.insert(0, ACME)
    # The case name first, so even a DLQ copy cut to fit keeps it.
    key = case.encode() if value is None else None  # the client refuses null key and value
    await client.send(None, value, headers=[("case", case.encode()), *extra], key=key)


async def test_hostile_records_between_good_jobs_then_a_restart(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    first = gateway_process(settings, "first")
    first.start()
    good: list[str] = []

    async def send_good(n: int, prefix: str) -> None:
        for i in range(n):
            job_id = f"{prefix}{i}"
            good.append(job_id)
            await client.job("globex" if i % 2 else "acme", job_id, "echo", i=i)

    await send_good(30, "before-")
    for index, (case, value, headers, _, _) in enumerate(HOSTILE):
        await _send_hostile(client, case, value, headers)
        await send_good(2, f"between{index}-")
    # The largest payload the contract admits, echoed: its result still fits.
    big = "x" * 900_000
    good.append("big-echo")
    await client.job("acme", "big-echo", "echo", blob=big)
    await send_good(30, "after-")
    await client.flush()

    rejected = {case_id for *_, case_id in HOSTILE if case_id}
    expected = len(good) + len(rejected)
    results = await read_topic(settings, settings.topics.results, until=expected, timeout_s=120)
    by_id = results_by_id(results)
    assert all(by_id.get(job_id, [{}])[0].get("status") == "succeeded" for job_id in good), [
        j for j in good if j not in by_id
    ][:5]
    dlq = await read_topic(settings, settings.topics.dlq, until=len(HOSTILE), timeout_s=60)
    reasons = {
        dict(r.headers)["case"].decode(): dict(r.headers)["dlq-reason"].decode() for r in dlq
    }
    assert reasons == {case: reason for case, _, _, reason, _ in HOSTILE}
    limit = settings.kafka.max_request_bytes
    assert all(len(r.value or b"") + sum(len(v) for _, v in r.headers) <= limit for r in dlq)
    assert first.proc.poll() is None, "the gateway exited"

    # A restart does not meet any of them again: they were all committed.
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0
    second = gateway_process(settings, "second")
    second.start()
    await send_good(20, "restart-")
    await client.flush()
    results = await read_topic(
        settings, settings.topics.results, until=len(good) + len(rejected), timeout_s=120
    )
    by_id = results_by_id(results)
    assert all(len(by_id[job_id]) == 1 for job_id in good), "a job ran twice"
    assert {j for j, bodies in by_id.items() if bodies[0]["status"] == "rejected"} == rejected
    assert by_id["big-echo"][0]["result"]["blob"] == big
    dlq = await read_topic(settings, settings.topics.dlq, timeout_s=5)
    assert Counter(dict(r.headers)["case"] for r in dlq).most_common(1)[0][1] == 1
    assert second.proc.poll() is None
    second.signal(signal.SIGTERM)
    assert second.wait(60) == 0
    for process in (first, second):
        events = {line.get("event") for line in process.log_lines()}
        assert not events & {"task_failed", "fatal_error", "record_failed"}, events


def _bloat(ctx: JobContext) -> FlowGraph:
    async def bloat(message: Message, _: Any) -> Any:
        return {"blob": "z" * int(message.payload["size"])}

    return [(Node(bloat, name="bloat", policy=NodePolicy(validate="none")), [])]


async def test_an_unexpected_error_dead_letters_that_record_and_the_loop_goes_on(
    settings: Settings, client: JobClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gateway.admission.parse_record

    def exploding(**kwargs: Any) -> Any:
        if kwargs["source"].value == b'{"boom": true}':
            raise RuntimeError("a bug in the gateway")
        return real(**kwargs)

    monkeypatch.setattr(gateway.admission, "parse_record", exploding)
    running = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        await client.job("acme", "pre", "echo")
        await client.send("acme", b'{"boom": true}')
        await client.job("acme", "post", "echo")
        await client.flush()
        results = results_by_id(await read_topic(settings, settings.topics.results, until=2))
        assert results["pre"][0]["status"] == results["post"][0]["status"] == "succeeded"
        (dead,) = await read_topic(settings, settings.topics.dlq, until=1)
        headers = dict(dead.headers)
        assert headers["dlq-reason"] == b"internal_error"
        assert b"RuntimeError" in headers["dlq-detail"]
        assert b"a bug in the gateway" not in headers["dlq-detail"]  # no exception text
        assert dead.value == b'{"boom": true}'
        assert running.exit_code == 0
    finally:
        await running.stop()


class _RawName(str):
    """A header name whose UTF-8 form is bytes that are not UTF-8 at all: what a
    producer in another language can write, and aiokafka's consumer cannot decode."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-name"


async def test_a_record_the_client_cannot_decode_is_dead_lettered_by_position(
    settings: Settings, client: JobClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiokafka decodes header names inside the fetch: the record is named by nothing.
    # The intake reads record by record to find it, dead-letters it by its offset, and
    # every good job around it runs; nothing stalls.
    for module in (accumulator, producer_module):
        monkeypatch.setattr(module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    writer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await writer.start()
    try:
        await client.job("acme", "before", "echo")
        await client.flush()
        good = json.dumps({"id": "bad-name", "type": "echo"}).encode()
        await writer.send_and_wait(
            settings.topics.jobs,
            good,
            key=b"before",  # the same partition as the job before it
            headers=[("tenant", b"acme"), (_RawName("x"), b"v")],
        )
    finally:
        await writer.stop()
    monkeypatch.undo()
    await client.send("acme", {"id": "after", "type": "echo"}, key=b"before")
    await client.flush()
    running = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        results = results_by_id(await read_topic(settings, settings.topics.results, until=2))
        assert results["before"][0]["status"] == results["after"][0]["status"] == "succeeded"
        (dead,) = await read_topic(settings, settings.topics.dlq, until=1)
        headers = dict(dead.headers)
        assert headers["dlq-reason"] == b"invalid_headers"
        assert b"not UTF-8" in headers["dlq-detail"]
        assert running.intake.fetch_problem is None
        assert running.exit_code == 0
        # The partition's commit moved past all three records.
        await wait_for(lambda: _committed_to(settings, 3), 15)
    finally:
        await running.stop()


async def _committed_to(settings: Settings, offset: int) -> bool:
    committed = await committed_offsets(settings, settings.topics.jobs)
    return max((o or 0 for o in committed.values()), default=0) == offset


async def test_a_dead_task_is_loud_and_the_gateway_exits_non_zero(
    settings: Settings, client: JobClient, caplog: pytest.LogCaptureFixture
) -> None:
    running = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        original = running.intake.commit

        async def broken(*_: Any, **__: Any) -> None:
            running.intake.commit = original  # type: ignore[method-assign]
            raise OSError("disk on fire")

        with caplog.at_level(logging.ERROR, logger="gateway.tasks"):
            running.intake.commit = broken  # type: ignore[method-assign]
            began = time.monotonic()
            await asyncio.wait_for(running.wait(), 10)
        assert time.monotonic() - began < 5
        assert running.exit_code == 1
        reasons = await running.not_ready_reasons()
        assert "task failed: gateway:commits: OSError" in reasons
        failed = [r for r in caplog.records if r.getMessage() == "task_failed"]
        assert [(r.task, r.error) for r in failed] == [("gateway:commits", "OSError")]  # type: ignore[attr-defined]
    finally:
        began = time.monotonic()
        await running.stop()
        assert time.monotonic() - began < 15


async def test_a_result_too_large_to_publish_fails_the_job_small(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "big.toml").write_text(
        'id = "big"\ntier = "pro"\n[jobs]\nallowed_types = ["bloat"]\n'
    )
    configured = settings.model_copy(update={"tenants_dir": tenants})
    types = builtin_job_types()
    types.register("bloat", _bloat)
    running = Gateway(configured, load_catalog(tenants, settings.policies_dir), types)
    await running.start()
    limit = settings.kafka.max_request_bytes
    try:
        for job_id, size in (("small", 10), ("bloated", limit + 10), ("after", 10)):
            await client.send("big", {"id": job_id, "type": "bloat", "payload": {"size": size}})
        await client.flush()
        records = await read_topic(settings, settings.topics.results, until=3)
        results = results_by_id(records)
        assert results["small"][0]["status"] == results["after"][0]["status"] == "succeeded"
        (body,) = results["bloated"]
        assert body["status"] == "failed"
        assert body["error"]["code"] == "result_too_large"
        assert body["result"] is None
        assert all(len(r.value) < 2048 or r.value.count(b"z") == 10 for r in records)
        statuses = await read_topic(settings, settings.topics.status, timeout_s=3)
        final = [json.loads(r.value) for r in statuses if r.key == b"bloated"][-1]
        assert final["status"] == "failed"
        assert running.exit_code == 0
    finally:
        await running.stop()


async def test_one_tenants_volume_never_evicts_another_tenants_live_job(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    # Statuses for GET are bounded (here 60 jobs); acme submits far more than that while
    # globex has one job running: globex's job keeps answering.

    configured = settings.model_copy(
        update={
            "history_size": 60,
            "http": settings.http.model_copy(update={"enabled": True, "port": 0}),
        }
    )
    running = Gateway(configured, load_catalog(settings.tenants_dir, settings.policies_dir))
    await running.start()
    try:
        base = f"http://127.0.0.1:{running.http_port}"
        acme = {"Authorization": "Bearer demo-key-acme"}
        globex = {"Authorization": "Bearer demo-key-globex"}
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            live = await http.post(
                "/v1/jobs", json={"type": "sleep", "payload": {"seconds": 20}}, headers=globex
            )
            assert live.status_code == 202
            live_id = live.json()["id"]
            for n in range(300):
                answer = await http.post(
                    "/v1/jobs", json={"type": "echo", "id": f"a{n}"}, headers=acme
                )
                assert answer.status_code == 202
            await wait_for(lambda: _known(http, "a299", acme), 30)
            answer = await http.get(f"/v1/jobs/{live_id}", headers=globex)
            assert answer.status_code == 200
            assert answer.json()["status"] in ("queued", "running")
            # acme's oldest fell out of acme's own share instead.
            assert (await http.get("/v1/jobs/a0", headers=acme)).status_code == 404
    finally:
        await running.stop()


async def _known(http: Any, job_id: str, headers: dict[str, str]) -> bool:
    return bool((await http.get(f"/v1/jobs/{job_id}", headers=headers)).status_code == 200)
