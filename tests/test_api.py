"""The HTTP control API over real HTTP, on one in-process gateway and a real Tansu broker.

One gateway serves the whole module (starting one costs seconds); every test uses
its own job ids, and counters are compared before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
from penguiflow import Headers, Message, Node, NodePolicy
from pydantic import SecretStr
from starlette.routing import Route

from gateway.api.channel import ChannelError, Denied, LogLine, open_channel
from gateway.api.statusview import StatusView
from gateway.api.supervisor import child_settings
from gateway.api.tenant import TenantApi
from gateway.catalog import load_catalog
from gateway.child import child_environ
from gateway.dev.services import Tansu
from gateway.flows import FlowGraph, JobContext, JobTypes, builtin_job_types
from gateway.observability import JsonFormatter
from gateway.service import Gateway, ensure_topics
from gateway.settings import Settings, VaultSettings
from gateway.tasks import Supervisor

from conftest import all_committed, make_settings, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

KEYS = {
    tenant: f"test-{tenant}-{secrets.token_urlsafe(16)}" for tenant in ("acme", "globex", "solo")
}
TENANT = """
id = "{id}"
tier = "pro"
api_keys_sha256 = ["{hash}"]
[quota]
max_concurrency = {conc}
[jobs]
allowed_types = {types}
max_attempts = {attempts}
"""
BODY_LIMIT = 64 * 1024

# Nodes of the "watched" type record that they started and that they were stopped.
STARTED: set[str] = set()
STOPPED: set[str] = set()


def _watched(ctx: JobContext) -> FlowGraph:
    async def watched(message: Message, _: Any) -> Any:
        STARTED.add(ctx.job_id)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            STOPPED.add(ctx.job_id)
            raise
        return message.payload

    return [(Node(watched, name="watched", policy=NodePolicy(validate="none")), [])]


def _sneaky(ctx: JobContext) -> FlowGraph:
    async def sneaky(message: Message, _: Any) -> Any:
        # A flow of an acme job builds a message for another tenant: invariant 2.
        return Message(payload={}, headers=Headers(tenant="globex"), trace_id=message.trace_id)

    return [(Node(sneaky, name="sneaky", policy=NodePolicy(validate="none")), [])]


@dataclass
class Live:
    gateway: Gateway
    http: httpx.AsyncClient
    settings: Settings
    ops: httpx.AsyncClient


@pytest.fixture(scope="module")
def tenants_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tenants")
    specs = {
        "acme": (8, ["echo", "sleep", "fail", "watched", "sneaky"], 1),
        "globex": (8, ["echo", "sleep", "fail"], 3),
        "solo": (1, ["echo", "sleep"], 1),
    }
    for tenant, (conc, types, attempts) in specs.items():
        digest = hashlib.sha256(KEYS[tenant].encode()).hexdigest()
        (directory / f"{tenant}.toml").write_text(
            TENANT.format(
                id=tenant, hash=digest, conc=conc, types=json.dumps(types), attempts=attempts
            )
        )
    return directory


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tansu: Tansu, tenants_dir: Path) -> AsyncIterator[Live]:
    settings = make_settings(
        tansu.bootstrap,
        tenants_dir=tenants_dir,
        http={"port": 0, "max_body_bytes": BODY_LIMIT},
        ops={"port": 0},
        # Retries wait 3 s, long enough to cancel a job while it waits.
        retry={"base_s": 3.0, "factor": 1.0, "cap_s": 3.0, "jitter": 0.0, "max_attempts": 3},
    )
    await ensure_topics(settings.kafka, settings.topics)
    types: JobTypes = builtin_job_types()
    types.register("watched", _watched)
    types.register("sneaky", _sneaky)
    gateway = Gateway(settings, load_catalog(tenants_dir, settings.policies_dir), types)
    await gateway.start()
    try:
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10
            ) as client,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.ops_port}", timeout=10) as ops,
        ):
            yield Live(gateway, client, settings, ops)
    finally:
        await gateway.stop()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def submit(live: Live, tenant: str, job_type: str, **body: Any) -> str:
    response = await live.http.post(
        "/v1/jobs", json={"type": job_type, **body}, headers=auth(tenant)
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    job_id: str = response.json()["id"]
    return job_id


async def wait_status(
    live: Live, tenant: str, job_id: str, statuses: set[str], timeout_s: float = 15
) -> dict[str, Any]:
    """Poll GET until the job reaches one of `statuses` (with its result, if terminal)."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await live.http.get(f"/v1/jobs/{job_id}", headers=auth(tenant))
        if response.status_code == 200:
            body = response.json()
            terminal = body["status"] not in ("queued", "deferred", "running", "retrying")
            if body["status"] in statuses and (body["result"] is not None or not terminal):
                return body
        await asyncio.sleep(0.05)
    pytest.fail(f"{job_id} did not reach {statuses}: last {body}")


async def denials(live: Live, tenant: str, action: str) -> float:
    text = (await live.ops.get("/metrics")).text
    pattern = (
        r'^gateway_cross_tenant_denials_total\{action="'
        + action
        + r'",tenant="'
        + tenant
        + r'"\} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def schema_check(document: dict[str, Any], name: str, body: Any) -> None:
    """Validate an answer against a schema of the served OpenAPI document."""
    root = {"components": document["components"], "$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(root).validate(body)


def exact(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Everything a client can observe of an answer."""
    return response.status_code, list(response.headers.raw), response.content


# -- the matrix ------------------------------------------------------------------


async def test_endpoint_matrix_other_tenant_is_indistinguishable_from_unknown(
    live: Live,
) -> None:
    mine_done = await submit(live, "acme", "echo", payload={"n": 1})
    mine_running = await submit(live, "acme", "sleep", payload={"seconds": 30})
    theirs = await submit(live, "globex", "sleep", payload={"seconds": 30})
    unknown = uuid.uuid4().hex  # the same length as the generated ids above
    await wait_status(live, "acme", mine_done, {"succeeded"})
    await wait_status(live, "acme", mine_running, {"running"})
    await wait_status(live, "globex", theirs, {"running"})
    before = {a: await denials(live, "acme", a) for a in ("get", "cancel")}

    for method, template in (("GET", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/cancel")):
        # No key and a bad key: 401, whatever the id.
        for job_id in (mine_done, theirs, unknown):
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
                response = await live.http.request(method, template.format(job_id), headers=headers)
                assert response.status_code == 401, (method, job_id, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"] == "unauthorized"
        # Another tenant's job answers exactly as an unknown id: status, headers, body.
        other = await live.http.request(method, template.format(theirs), headers=auth("acme"))
        missing = await live.http.request(method, template.format(unknown), headers=auth("acme"))
        assert other.status_code == 404
        assert exact(other) == exact(missing)
        assert not any(name.lower() == b"date" for name, _ in other.headers.raw)

    # Submitting needs a key too; nothing is produced without one.
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {KEYS['acme']}"},
    ):
        refused = await live.http.post(
            "/v1/jobs", json={"type": "echo", "id": f"nokey-{unknown}"}, headers=headers
        )
        assert refused.status_code == 401
    assert (
        await live.http.get(f"/v1/jobs/nokey-{unknown}", headers=auth("acme"))
    ).status_code == 404

    document = (await live.http.get("/openapi.json")).json()
    own = await live.http.get(f"/v1/jobs/{mine_done}", headers=auth("acme"))
    assert own.status_code == 200
    schema_check(document, "Job", own.json())
    assert own.json()["result"]["result"] == {"n": 1}
    finished = await live.http.post(f"/v1/jobs/{mine_done}/cancel", headers=auth("acme"))
    assert finished.status_code == 409
    assert finished.json() == {
        "error": "already_terminal",
        "detail": "the job is already succeeded",
        "status": "succeeded",
    }
    schema_check(document, "AlreadyTerminal", finished.json())
    cancelling = await live.http.post(f"/v1/jobs/{mine_running}/cancel", headers=auth("acme"))
    assert cancelling.status_code == 202
    schema_check(document, "CancelAccepted", cancelling.json())
    await wait_status(live, "acme", mine_running, {"cancelled"})

    # acme's attempt to cancel did nothing to globex's job.
    await asyncio.sleep(0.5)
    still = await live.http.get(f"/v1/jobs/{theirs}", headers=auth("globex"))
    assert still.json()["status"] == "running"
    assert (
        await live.http.post(f"/v1/jobs/{theirs}/cancel", headers=auth("globex"))
    ).status_code == 202
    await wait_status(live, "globex", theirs, {"cancelled"})

    # Both attempts on globex's job were counted for the caller; the unknown id was
    # not (nobody owns it).
    for action in ("get", "cancel"):
        assert await denials(live, "acme", action) == before[action] + 1


async def test_cross_tenant_attempts_are_audited_without_the_owner(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    theirs = await submit(live, "globex", "echo")
    await wait_status(live, "globex", theirs, {"succeeded"})
    unknown = uuid.uuid4().hex
    for job_id in (theirs, unknown):
        assert (await live.http.get(f"/v1/jobs/{job_id}", headers=auth("solo"))).status_code == 404
        cancel = await live.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("solo"))
        assert cancel.status_code == 404

    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "gateway.audit"]
    assert len(lines) == 2, lines
    bodies = [json.loads(line) for line in lines]
    assert {b["action"] for b in bodies} == {"get", "cancel"}
    for body, line in zip(bodies, lines, strict=True):
        assert body["event"] == "cross_tenant_denied"
        assert (body["tenant"], body["job_id"]) == ("solo", theirs)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", body["source"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["at"])
        assert "globex" not in line, "the owner's tenant must never be written"


async def test_api_keys_are_never_logged(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    job_id = await submit(live, "acme", "echo")
    await wait_status(live, "acme", job_id, {"succeeded"})
    await live.http.get(f"/v1/jobs/{job_id}", headers=auth("globex"))
    await live.http.get("/v1/jobs/x", headers={"Authorization": "Bearer wrong-key-123"})
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert "job_submitted" in text
    for key in (*KEYS.values(), "wrong-key-123"):
        assert key not in text
        assert hashlib.sha256(key.encode()).hexdigest() not in text


# -- submission ------------------------------------------------------------------


async def test_submit_runs_the_job_under_the_callers_tenant(live: Live) -> None:
    job_id = f"given-{uuid.uuid4().hex[:8]}"
    response = await live.http.post(
        "/v1/jobs",
        json={"type": "echo", "payload": {"k": [1, 2]}, "id": job_id},
        headers=auth("acme"),
    )
    assert (response.status_code, response.json()) == (202, {"id": job_id, "status": "queued"})
    body = await wait_status(live, "acme", job_id, {"succeeded"})
    assert body["tenant"] == "acme"
    assert body["result"]["result"] == {"k": [1, 2]}
    assert body["result"]["tenant"] == "acme"

    generated = await submit(live, "acme", "echo")
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    await wait_status(live, "acme", generated, {"succeeded"})

    # The same id again runs nothing new and answers where the job is.
    again = await live.http.post(
        "/v1/jobs", json={"type": "echo", "id": job_id}, headers=auth("acme")
    )
    assert (again.status_code, again.json()) == (202, {"id": job_id, "status": "succeeded"})

    records = await read_topic(live.settings, live.settings.topics.jobs, timeout_s=5)
    mine = [r for r in records if r.key == job_id.encode()]
    assert len(mine) == 1
    assert dict(mine[0].headers)["tenant"] == b"acme"
    assert "tenant" not in json.loads(mine[0].value)
    results = await read_topic(live.settings, live.settings.topics.results, timeout_s=3)
    assert sum(1 for r in results if r.key == job_id.encode()) == 1


async def test_submit_honours_deadline(live: Live) -> None:
    job_id = await submit(live, "acme", "sleep", payload={"seconds": 30}, deadline_s=0.3)
    body = await wait_status(live, "acme", job_id, {"timed_out"})
    assert body["result"]["error"]["code"] == "deadline_exceeded"
    assert body["result"]["duration_ms"] < 3000


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"payload": {}}', "type"),
        (b'{"type": "echo", "payload": [1]}', "payload"),
        (b'{"type": "echo", "deadline_s": -1}', "deadline_s"),
        (b'{"type": "echo", "deadline_s": "5"}', "deadline_s"),
        (b'{"type": "echo", "id": "   "}', "id"),
        (b'{"type": "echo", "id": "' + b"x" * 257 + b'"}', "id"),
        (b'{"type": "echo", "tenant": "globex"}', "tenant"),
        (b'{"type": "echo", "surprise": 1}', "surprise"),
        (b'{"type": "echo", "payload": {"x": NaN}}', None),
    ],
)
async def test_invalid_bodies_are_422(live: Live, content: bytes, field: str | None) -> None:
    response = await live.http.post(
        "/v1/jobs",
        content=content,
        headers={**auth("acme"), "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_body"
    if field is not None:
        assert [field] in [e["loc"] for e in body["detail"]], body
    document = (await live.http.get("/openapi.json")).json()
    schema_check(document, "ValidationError", body)


async def test_tenant_in_body_is_refused_and_nothing_is_produced(live: Live) -> None:
    job_id = f"claims-{uuid.uuid4().hex[:8]}"
    response = await live.http.post(
        "/v1/jobs",
        json={"type": "echo", "id": job_id, "tenant": "globex"},
        headers=auth("acme"),
    )
    assert response.status_code == 422
    await asyncio.sleep(0.5)
    for tenant in ("acme", "globex"):
        response = await live.http.get(f"/v1/jobs/{job_id}", headers=auth(tenant))
        assert response.status_code == 404


async def test_unknown_or_not_allowed_type_is_400_listing_allowed(live: Live) -> None:
    for tenant, job_type, allowed in (
        ("acme", "teleport", ["echo", "fail", "sleep", "sneaky", "watched"]),
        ("solo", "fail", ["echo", "sleep"]),
        ("solo", "watched", ["echo", "sleep"]),
    ):
        response = await live.http.post("/v1/jobs", json={"type": job_type}, headers=auth(tenant))
        assert response.status_code == 400
        assert response.json()["error"] == "type_not_allowed"
        assert response.json()["allowed_types"] == allowed


async def test_oversized_bodies_are_413(live: Live) -> None:
    big = {"type": "echo", "payload": {"x": "y" * BODY_LIMIT}}
    declared = await live.http.post("/v1/jobs", json=big, headers=auth("acme"))
    assert declared.status_code == 413
    assert declared.json()["error"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        yield b'{"type": "echo", "payload": {"x": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"y" * 1024
        yield b'"}}'

    streamed = await live.http.post("/v1/jobs", content=chunks(), headers=auth("acme"))
    assert streamed.status_code == 413
    small = await live.http.post(
        "/v1/jobs", json={"type": "echo", "payload": {"x": "y" * 1000}}, headers=auth("acme")
    )
    assert small.status_code == 202


# -- cancel ------------------------------------------------------------------------


async def test_cancel_queued_job_never_starts(live: Live) -> None:
    # solo runs one job at a time: the sleep holds the slot, the echo waits its turn.
    blocker = await submit(live, "solo", "sleep", payload={"seconds": 30})
    await wait_status(live, "solo", blocker, {"running"})
    queued = await submit(live, "solo", "echo", payload={"n": 1})
    await wait_for(lambda: live.gateway.pools.find(("solo", queued)) is not None, 10)
    response = await live.http.post(f"/v1/jobs/{queued}/cancel", headers=auth("solo"))
    assert response.status_code == 202
    body = await wait_status(live, "solo", queued, {"cancelled"}, timeout_s=5)
    assert body["result"]["error"]["code"] == "cancelled"
    # It was cancelled while the blocker still ran: it never got the slot.
    assert (await wait_status(live, "solo", blocker, {"running"}))["status"] == "running"
    await live.http.post(f"/v1/jobs/{blocker}/cancel", headers=auth("solo"))
    await wait_status(live, "solo", blocker, {"cancelled"})
    # Nor did it start once the slot was free.
    await asyncio.sleep(0.5)
    statuses = await read_topic(live.settings, live.settings.topics.status, timeout_s=2)
    seen = [json.loads(r.value)["status"] for r in statuses if r.key == queued.encode()]
    assert seen == ["queued", "cancelled"]
    results = await read_topic(live.settings, live.settings.topics.results, timeout_s=2)
    assert sum(1 for r in results if r.key == queued.encode()) == 1


async def test_cancel_running_job_stops_its_node(live: Live) -> None:
    job_id = await submit(live, "acme", "watched")
    await wait_for(lambda: job_id in STARTED, 10, 0.02)
    asked = time.monotonic()
    response = await live.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("acme"))
    assert response.status_code == 202
    # The status it reports is the view's: `running` may not have been read back yet.
    assert response.json()["cancel"] == "requested"
    assert response.json()["status"] in ("queued", "running")
    body = await wait_status(live, "acme", job_id, {"cancelled"}, timeout_s=5)
    assert time.monotonic() - asked < 3
    assert job_id in STOPPED, "the node's task was cancelled"
    result = body["result"]
    assert (result["status"], result["error"]["code"]) == ("cancelled", "cancelled")
    assert result["duration_ms"] < 10_000  # the node would have slept 30 s

    # Its offset was finished: the group's commits reach the end of `jobs` (every
    # earlier test's jobs are over too).
    await wait_for(lambda: all_committed(live.settings), 15, 0.3)


async def test_cancel_while_waiting_for_a_retry(live: Live) -> None:
    # globex retries (3 s backoff here); the cancel reaches the record in its timer.
    job_id = await submit(
        live, "globex", "fail", payload={"retryable": True, "succeed_on_attempt": 2}
    )
    await wait_status(live, "globex", job_id, {"retrying"})
    response = await live.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("globex"))
    assert response.status_code == 202
    body = await wait_status(live, "globex", job_id, {"cancelled", "succeeded"}, timeout_s=10)
    assert body["status"] == "cancelled"
    assert body["result"]["attempts"] == 2


async def test_cancel_published_before_the_job_arrives_wins(live: Live) -> None:
    # Another replica's API (or any producer of the contract) cancels a job that this
    # replica has not read yet: the command is remembered and the job never starts.
    from aiokafka import AIOKafkaProducer

    job_id = f"early-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=live.settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        command = {
            "op": "cancel",
            "id": job_id,
            "tenant": "acme",
            "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        await producer.send_and_wait(
            live.settings.topics.control,
            json.dumps(command).encode(),
            key=job_id.encode(),
            headers=[("tenant", b"acme")],
        )
        await wait_for(lambda: ("acme", job_id) in live.gateway.pending_cancels, 10)
        job = {"id": job_id, "type": "sleep", "payload": {"seconds": 30}}
        await producer.send_and_wait(
            live.settings.topics.jobs,
            json.dumps(job).encode(),
            key=job_id.encode(),
            headers=[("tenant", b"acme")],
        )
    finally:
        await producer.stop()
    body = await wait_status(live, "acme", job_id, {"cancelled"}, timeout_s=10)
    assert body["result"]["error"]["code"] == "cancelled"
    statuses = await read_topic(live.settings, live.settings.topics.status, timeout_s=3)
    assert "running" not in [
        json.loads(r.value)["status"] for r in statuses if r.key == job_id.encode()
    ]


# -- the flow guard --------------------------------------------------------------


async def test_flow_message_for_another_tenant_fails_and_is_audited(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job_id = await submit(live, "acme", "sneaky")
    body = await wait_status(live, "acme", job_id, {"failed"})
    assert body["result"]["error"]["code"] == "tenant_violation"
    formatter = JsonFormatter()
    lines = [
        formatter.format(r)
        for r in caplog.records
        if r.name == "gateway.audit" and getattr(r, "job_id", None) == job_id
    ]
    assert len(lines) == 1
    audit = json.loads(lines[0])
    assert (audit["event"], audit["tenant"], audit["action"]) == (
        "tenant_violation",
        "acme",
        "flow_message",
    )
    assert "globex" not in lines[0]


# -- keys --------------------------------------------------------------------------


def new_key(tenant: str) -> subprocess.CompletedProcess[str]:
    """`gateway tenants new-key TENANT`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "tenants", "new-key", tenant],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


async def test_new_key_from_the_cli_authenticates_once_in_the_tenant_file(
    live: Live, tenants_dir: Path
) -> None:
    done = await asyncio.to_thread(new_key, "solo")
    found_key = re.search(r"api key \(shown once\): (\S+)", done.stdout)
    found_hash = re.search(r'api_keys_sha256: "([0-9a-f]{64})"', done.stdout)
    assert found_key is not None
    assert found_hash is not None
    key, digest = found_key[1], found_hash[1]
    assert len(key) >= 40
    assert done.stdout.count(key) == 1
    assert hashlib.sha256(key.encode()).hexdigest() == digest
    headers = {"Authorization": f"Bearer {key}"}
    assert (await live.http.get("/v1/jobs/x", headers=headers)).status_code == 401

    path = tenants_dir / "solo.toml"
    old = hashlib.sha256(KEYS["solo"].encode()).hexdigest()
    path.write_text(path.read_text().replace(f'["{old}"]', f'["{old}", "{digest}"]'))
    assert live.gateway.reloader.reload()

    # The new key is solo's now, once the reloaded catalog has reached the API process:
    # its own unknown job is a 404, not a 401.
    async def accepted() -> bool:
        return (await live.http.get("/v1/jobs/x", headers=headers)).status_code == 404

    await wait_for(accepted, 5, 0.02)
    job_id = await submit(live, "solo", "echo")
    body = await wait_status(live, "solo", job_id, {"succeeded"})
    again = await live.http.get(f"/v1/jobs/{job_id}", headers=headers)
    assert again.json() == body


# -- operations and the document ---------------------------------------------------


async def test_health_readiness_and_its_hook(live: Live) -> None:
    assert (await live.http.get("/healthz")).json() == {"status": "ok"}
    assert (await live.http.get("/readyz")).status_code == 200

    async def vault() -> str | None:
        return "vault unreachable"

    live.gateway.readiness_checks.append(vault)
    try:
        response = await live.http.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "reasons": ["vault unreachable"]}
    finally:
        live.gateway.readiness_checks.remove(vault)
    assert (await live.http.get("/readyz")).json() == {"ready": True, "reasons": []}


async def test_openapi_document_matches_the_routes(live: Live) -> None:
    document = (await live.http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method.upper()) for path, ops in document["paths"].items() for method in ops
    }
    app = TenantApi(
        settings=live.settings,
        catalog=lambda: load_catalog(live.settings.tenants_dir, live.settings.policies_dir),
        job_types=builtin_job_types(),
        publish=_never,
        status_view=StatusView(live.settings, supervisor=Supervisor()),
        readiness=_never,
        on_denied=lambda *_: None,
        supervisor=Supervisor(),
    ).app()
    routes = {
        (route.path.replace("{job_id:job_id}", "{id}"), method)
        for route in getattr(app, "routes", [])
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert routes == documented
    # Every documented operation answers with a documented status code.
    for path, method in sorted(documented):
        url = path.replace("{id}", uuid.uuid4().hex)
        response = await live.http.request(method, url, headers=auth("acme"), json={"type": "echo"})
        codes = document["paths"][path][method.lower()]["responses"]
        assert str(response.status_code) in codes, (method, path, response.status_code)
    assert "text/plain" in (await live.ops.get("/metrics")).headers["content-type"]
    # Metrics are for operators only: the tenant port does not serve them.
    assert (await live.http.get("/metrics")).status_code == 404


async def test_answers_are_not_held_back_by_delayed_acks(live: Live) -> None:
    # Headers and body leave in two writes; without TCP_NODELAY on accepted sockets
    # each answer waited ~40 ms for the client's delayed ACK.
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        response = await live.http.get("/healthz")
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
    assert sorted(timings)[10] < 0.02, timings


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def _status_is(client: httpx.AsyncClient, job_id: str, status: str) -> bool:
    response = await client.get(f"/v1/jobs/{job_id}", headers=auth("acme"))
    return response.status_code == 200 and response.json()["status"] == status


async def _never(*_: Any) -> Any:
    raise AssertionError("not called")


async def test_api_answers_while_the_job_loop_is_busy(live: Live) -> None:
    # The API has its own process: a burst of job work on the gateway's loop (here
    # 0.6 s of pure CPU, holding the gateway's interpreter lock) does not hold answers
    # back until it ends.
    port = live.gateway.http_port
    assert port is not None

    def probe() -> float:
        time.sleep(0.15)  # the burst is under way
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 200")
        return time.perf_counter() - started

    answered = asyncio.get_running_loop().run_in_executor(None, probe)
    until = time.perf_counter() + 0.6
    while time.perf_counter() < until:  # the main loop is blocked, holding the GIL
        pass
    assert await answered < 0.3


async def test_api_process_gets_no_vault_credentials(live: Live) -> None:
    settings = live.settings.model_copy(
        update={"vault": VaultSettings(token=SecretStr("s.parent-only"), role_id="r")}
    )
    child = child_settings(settings)
    assert not child.vault.configured
    assert "s.parent-only" not in pickle.dumps(child).decode("latin-1")
    assert child.kafka.client_id.endswith("-api")


async def test_a_finished_job_is_never_terminal_without_its_result(live: Live) -> None:
    # The replica that ran the job hands its result to its API process at once, so no
    # GET sees the terminal status (read back from jobs.status) before the result.
    job_id = await submit(live, "acme", "echo", payload={"n": 1})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body = (await live.http.get(f"/v1/jobs/{job_id}", headers=auth("acme"))).json()
        if body["status"] == "succeeded":
            assert body["result"] is not None
            assert body["result"]["result"] == {"n": 1}
            return
        await asyncio.sleep(0.002)
    pytest.fail("the job did not finish")


async def test_the_gateway_reads_only_checked_json_from_the_api_process() -> None:
    # The API process faces the network; a pickle from it (code, if it were loaded) is a
    # bad frame, never unpickled, and so is a deep or unknown message.
    ours, theirs = socket.socketpair()
    gateway_end = await open_channel(ours, "gateway")
    api_end = await open_channel(theirs, "api")
    try:
        api_end.send(Denied("acme", "j1", "get", "127.0.0.1:1"))
        assert await gateway_end.receive() == Denied("acme", "j1", "get", "127.0.0.1:1")
        # A log line cannot pose as the audit log, nor set reserved fields.
        api_end.send(LogLine("gateway.audit", 30, "cross_tenant_denied", {"audit": True, "x": 1}))
        line = await gateway_end.receive()
        assert line == LogLine("gateway.api", 30, "cross_tenant_denied", {"x": 1})
        api_end._writer.write(struct.pack(">I", 3) + pickle.dumps(1)[:3])
        with pytest.raises(ChannelError):
            await gateway_end.receive()
        assert gateway_end.closed
    finally:
        await gateway_end.close()
        await api_end.close()


async def test_the_api_process_environment_has_no_vault_credentials() -> None:
    environ = {
        "PATH": "/bin",
        "GATEWAY_VAULT__TOKEN": "s.x",
        "GATEWAY_VAULT__SECRET_ID": "y",
        "gateway_vault__role_id": "z",
        "VAULT_TOKEN": "s.y",
        "BAO_TOKEN": "s.z",
        "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    assert child_environ(environ) == {
        "PATH": "/bin",
        "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }


async def test_api_process_is_restarted_after_it_dies(live: Live) -> None:
    # Last in the module: the API process is replaced. Connections wait in the
    # gateway's listen backlog meanwhile; the same port answers again, and the new
    # process, like the first, has no Vault credentials in its environment.
    api = live.gateway.api
    assert api is not None
    assert api.pid is not None
    killed = api.pid
    sentinel = f"s.{uuid.uuid4().hex}"
    os.environ["GATEWAY_VAULT__TOKEN"] = sentinel
    os.kill(killed, signal.SIGKILL)
    await wait_for(lambda: api.restarts == 1 and api.pid not in (None, killed), 20)
    restarts = live.gateway.metrics.registry.get_sample_value("gateway_api_process_restarts_total")
    assert restarts == 1
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{live.gateway.http_port}", timeout=10
    ) as fresh:
        await wait_for(lambda: _ready(fresh), 20)
        job_id = await submit(live, "acme", "echo", payload={"after": "restart"})
        await wait_for(lambda: _status_is(fresh, job_id, "succeeded"), 20)
    try:
        environ = await asyncio.to_thread(Path(f"/proc/{api.pid}/environ").read_bytes)
    finally:
        del os.environ["GATEWAY_VAULT__TOKEN"]
    assert sentinel.encode() not in environ
    assert b"GATEWAY_VAULT__" not in environ
