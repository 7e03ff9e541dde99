"""The tenant API's own rules, on its ASGI app (no broker: `publish` is the seam):
rate limits, a retry after a failed submission, the request path of a miss."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.statusview import StatusView
from gateway.api.tenant import TenantApi
from gateway.catalog import load_catalog
from gateway.errors import ProduceError
from gateway.flows import builtin_job_types
from gateway.records import JobStatus, OutRecord, Status
from gateway.settings import Settings
from gateway.tasks import Supervisor

ROOT = Path(__file__).resolve().parent.parent
TENANT = """
id = "{id}"
tier = "free"
api_keys_sha256 = ["{hash}"]
[quota]
submit_rate_per_s = {rate}
submit_burst = {burst}
[jobs]
allowed_types = ["echo"]
"""


class Broker:
    """Stands in for the outbox: records what was published, fails when told to."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []
        self.fail_on: str | None = None

    async def publish(self, records: Sequence[OutRecord], *, tenant: str = "") -> None:
        for record in records:
            if self.fail_on is not None and record.topic == self.fail_on:
                self.fail_on = None
                raise ProduceError("broker did not acknowledge within 30s")
            self.records.append(record)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TenantApi, Broker]]:
    import hashlib

    tenants = tmp_path / "tenants"
    tenants.mkdir()
    for tenant, rate, burst in (("slow", 1, 2), ("fast", 1000, 1000), ("other", 1000, 1000)):
        digest = hashlib.sha256(f"key-{tenant}".encode()).hexdigest()
        (tenants / f"{tenant}.toml").write_text(
            TENANT.format(id=tenant, hash=digest, rate=rate, burst=burst)
        )
    settings = Settings(tenants_dir=tenants, policies_dir=ROOT / "policies")
    catalog = load_catalog(tenants, settings.policies_dir)
    supervisor = Supervisor()
    broker = Broker()
    denied: list[tuple[str, ...]] = []
    tenant_api = TenantApi(
        settings=settings,
        catalog=lambda: catalog,
        job_types=builtin_job_types(),
        publish=broker.publish,
        status_view=StatusView(settings, supervisor=supervisor),
        readiness=_ready,
        on_denied=lambda *args: denied.append(args),
        supervisor=supervisor,
    )
    await tenant_api.start()
    transport = httpx.ASGITransport(app=tenant_api.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            client.denied = denied  # type: ignore[attr-defined]
            yield client, tenant_api, broker
    finally:
        await tenant_api.stop()
        await supervisor.close()


async def _ready() -> list[str]:
    return []


def key(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{tenant}"}


async def test_submissions_are_rate_limited_per_tenant(api: Any) -> None:
    client, _, _ = api
    answers = [
        (await client.post("/v1/jobs", json={"type": "echo"}, headers=key("slow"))).status_code
        for _ in range(3)
    ]
    assert answers == [202, 202, 429]
    limited = await client.post("/v1/jobs", json={"type": "echo"}, headers=key("slow"))
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # Another tenant is not limited by the first one's volume.
    fast = await client.post("/v1/jobs", json={"type": "echo"}, headers=key("fast"))
    assert fast.status_code == 202


async def test_a_retry_after_a_failed_submission_produces_the_job(api: Any) -> None:
    client, tenant_api, broker = api
    broker.fail_on = "jobs"  # the `queued` status goes out, then the job record fails
    first = await client.post("/v1/jobs", json={"type": "echo", "id": "r1"}, headers=key("fast"))
    assert first.status_code == 503
    assert [r.topic for r in broker.records] == ["jobs.status"]
    # The status view reads that `queued` back from jobs.status.
    tenant_api._status.observe(JobStatus("fast", "r1", Status.QUEUED, 1, "t"))
    again = await client.post("/v1/jobs", json={"type": "echo", "id": "r1"}, headers=key("fast"))
    assert again.status_code == 202
    assert [r.topic for r in broker.records] == ["jobs.status", "jobs"]  # the job, now
    # Once it runs, a retry of the same id produces nothing new.
    tenant_api._status.observe(JobStatus("fast", "r1", Status.RUNNING, 1, "t"))
    third = await client.post("/v1/jobs", json={"type": "echo", "id": "r1"}, headers=key("fast"))
    assert (third.status_code, third.json()["status"]) == (202, "running")
    assert len(broker.records) == 2


async def test_a_deadline_over_the_tenants_maximum_is_refused(api: Any) -> None:
    client, _, _ = api
    body = {"type": "echo", "deadline_s": 10_000}  # the free tier allows 300
    answer = await client.post("/v1/jobs", json=body, headers=key("fast"))
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["deadline_s"]


async def test_misses_are_answered_alike_and_audited_afterwards(api: Any) -> None:
    client, tenant_api, _ = api
    tenant_api._status.observe(JobStatus("other", "theirs", Status.RUNNING, 1, "t"))
    mine = await client.get("/v1/jobs/theirs", headers=key("fast"))
    unknown = await client.get("/v1/jobs/nobodys", headers=key("fast"))
    assert (mine.status_code, mine.content) == (unknown.status_code, unknown.content)
    assert mine.headers == unknown.headers
    for _ in range(100):
        if client.denied:
            break
        await asyncio.sleep(0.01)
    assert client.denied == [("fast", "theirs", "get", "127.0.0.1:123")]


async def test_the_tenant_port_serves_no_metrics(api: Any) -> None:
    client, _, _ = api
    assert (await client.get("/metrics")).status_code == 404
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/metrics" not in paths
    assert "429" in paths["/v1/jobs"]["post"]["responses"]


def test_the_gateway_process_is_not_dumpable_and_loads_no_http_or_dev_code() -> None:
    code = (
        "from gateway.process import is_dumpable, make_undumpable\n"
        "assert is_dumpable() is True\n"
        "assert make_undumpable()\n"
        "assert is_dumpable() is False\n"
        "import gateway.service, sys\n"
        "loaded = [m for m in sys.modules if m.startswith(('starlette', 'uvicorn', 'gateway.dev'))]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr
