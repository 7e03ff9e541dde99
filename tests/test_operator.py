"""Operator control on a real broker: pause and resume across replicas and restarts, bulk
cancel, DLQ browse and redrive, priorities, and the admin API's authentication."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.catalog import load_catalog
from gateway.service import Gateway
from gateway.settings import Settings, child_env

from conftest import (
    ROOT,
    GatewayProcess,
    JobClient,
    epoch,
    quota_tenant,
    read_topic,
    results_by_id,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "operator-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def write_tenants(directory: Path, quotas: dict[str, dict[str, Any]]) -> Path:
    directory.mkdir(exist_ok=True)
    for tenant, quota in quotas.items():
        (directory / f"{tenant}.toml").write_text(quota_tenant(tenant, **quota))
    return directory


def operated(settings: Settings, tenants: Path, **updates: Any) -> Settings:
    return settings.model_copy(
        update={
            "tenants_dir": tenants,
            "ops": settings.ops.model_copy(
                update={"enabled": True, "port": 0, "token": SecretStr(TOKEN)}
            ),
            **updates,
        }
    )


@contextlib.asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir))
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


def ops(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.ops_port}", timeout=15)


def _at(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["at"].replace("Z", "+00:00")).timestamp()


async def statuses(settings: Settings, tenant: str) -> list[dict[str, Any]]:
    records = await read_topic(settings, settings.topics.status, timeout_s=2)
    bodies = [json.loads(r.value) for r in records]
    return [b for b in bodies if b["tenant"] == tenant]


def ops_port(process: GatewayProcess) -> int | None:
    lines = [line for line in process.log_lines() if line.get("event") == "ops_started"]
    return int(lines[-1]["port"]) if lines else None


def operated_process(make: Any, settings: Settings, name: str) -> GatewayProcess:
    process: GatewayProcess = make(
        settings,
        name,
        GATEWAY_OPS__ENABLED="true",
        GATEWAY_OPS__PORT="0",
        GATEWAY_OPS__TOKEN=TOKEN,
    )
    process.start()
    return process


async def test_pause_and_resume_across_replicas_and_a_restart(
    settings: Settings, client: JobClient, tmp_path: Path, gateway_process: Any
) -> None:
    tenants = write_tenants(
        tmp_path / "tenants",
        {
            "paced": {"conc": 4, "rate": 100, "burst": 10, "queued": 20},
            "other": {"conc": 4, "rate": 100, "burst": 10, "queued": 100},
        },
    )
    control = settings.control.model_copy(update={"paused_recheck_s": 1.0})
    configured = settings.model_copy(update={"tenants_dir": tenants, "control": control})
    one = operated_process(gateway_process, configured, "one")
    two = operated_process(gateway_process, configured, "two")
    await wait_for(lambda: ops_port(one) and ops_port(two), 60)
    ids = [f"p{n}" for n in range(120)]
    for job_id in ids:  # keyed by job id: spread over both replicas' partitions
        await client.job("paced", job_id, "sleep", seconds=0.2)
    await client.flush()
    await wait_for(lambda: _started(configured, "paced", 8), 60)
    # Each replica shows its own share of the tenant's quota and the whole cluster's
    # work: both replicas hold some of it (keyed by job id), the slots add up to 4.
    listings = []
    for process in (one, two):
        base = f"http://127.0.0.1:{ops_port(process)}"
        async with httpx.AsyncClient(base_url=base, timeout=15) as admin:
            listing = (await admin.get("/admin/v1/tenants", headers=ADMIN)).json()
        listings.append({row["tenant"]: row for row in listing["tenants"]})
    for rows in listings:
        paced = rows["paced"]
        assert paced["cluster"]["replicas"] == 2
        mine = paced["running"] + paced["queued"] + paced["parked"]
        assert paced["cluster"]["running"] + paced["cluster"]["waiting"] > mine > 0
        assert 1 <= paced["share"]["max_concurrency"] <= 3
    # Whole slots, apportioned alike (one more while a report is on its way).
    assert sum(rows["paced"]["share"]["max_concurrency"] for rows in listings) in (4, 5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops_port(one)}", timeout=15) as admin:
        answer = await admin.post("/admin/v1/tenants/paced/pause", headers=ADMIN)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"tenant": "paced", "state": "paused"}
        paused_at = time.time()
        await asyncio.sleep(3)
        listing = (await admin.get("/admin/v1/tenants", headers=ADMIN)).json()
    rows = {row["tenant"]: row for row in listing["tenants"]}
    assert rows["paced"]["state"] == "paused"
    assert rows["other"]["state"] == "active"
    # Other tenants are unaffected while it is paused.
    await client.job("other", "o1", "echo")
    await client.flush()
    await wait_for(lambda: _result(configured, "o1"), 20)
    # No new starts anywhere within 1 s of the pause.
    late = [s for s in await statuses(configured, "paced") if s["status"] == "running"]
    assert all(_at(s) < paused_at + 1.0 for s in late), max(_at(s) for s in late) - paused_at
    deferred = [s for s in await statuses(configured, "paced") if s["status"] == "deferred"]
    assert deferred, "a paused tenant's jobs wait in jobs.deferred"
    # Both replicas stop while the tenant is paused; a fresh one keeps it paused.
    for process in (one, two):
        process.signal(signal.SIGTERM)
    assert one.wait(60) == 0
    assert two.wait(60) == 0
    fresh = operated_process(gateway_process, configured, "fresh")
    await wait_for(lambda: ops_port(fresh), 60)
    await wait_for(lambda: _assigned(fresh), 60)
    restarted_at = time.time()
    await asyncio.sleep(4)
    late = [s for s in await statuses(configured, "paced") if s["status"] == "running"]
    assert all(_at(s) < restarted_at for s in late)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ops_port(fresh)}", timeout=15
    ) as admin:
        resumed_at = time.time()
        answer = await admin.post("/admin/v1/tenants/paced/resume", headers=ADMIN)
        assert answer.status_code == 202
    records = await read_topic(configured, configured.topics.results, until=121, timeout_s=90)
    results = results_by_id(records)
    assert all(results[job_id][0]["status"] == "succeeded" for job_id in ids)
    assert sum(len(results[job_id]) for job_id in ids) == len(ids)
    # The backlog completes at its quota: never more than its 4 slots at once.
    spans = [
        (epoch(found["started_at"]), epoch(found["finished_at"]))
        for job_id in ids
        for found in results[job_id]
        if epoch(found["started_at"]) >= resumed_at - 0.5
    ]
    assert len(spans) > 40, "most of the backlog ran after the resume"
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    assert max(itertools.accumulate(step for _, step in edges)) <= 4
    assert await read_topic(configured, configured.topics.dlq, timeout_s=1) == []
    fresh.signal(signal.SIGTERM)
    assert fresh.wait(60) == 0


def _assigned(process: GatewayProcess) -> bool:
    return any(line.get("event") == "partitions_assigned" for line in process.log_lines())


async def _started(settings: Settings, tenant: str, count: int) -> bool:
    running = [s for s in await statuses(settings, tenant) if s["status"] == "running"]
    return len(running) >= count


async def _result(settings: Settings, job_id: str) -> bool:
    records = await read_topic(settings, settings.topics.results, timeout_s=1)
    return job_id in results_by_id(records)


async def test_bulk_cancel_of_queued_delayed_and_running_jobs(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    tenants = write_tenants(
        tmp_path / "tenants",
        {
            "bulk": {"conc": 4, "rate": 500, "burst": 50, "queued": 200},
            "other": {"conc": 4, "rate": 500, "burst": 50, "queued": 500},
        },
    )
    configured = operated(settings, tenants)
    bulk = [f"b{n}" for n in range(2000)]
    others = [f"o{n}" for n in range(50)]
    async with replica(configured) as gateway:
        for job_id in bulk:
            await client.job("bulk", job_id, "sleep", seconds=60)
        await client.flush()
        # Running, buffered, and the rest deferred to jobs.deferred.
        await wait_for(lambda: _started(configured, "bulk", 4), 30)
        async with ops(gateway) as admin:
            answer = await admin.post(
                "/admin/v1/jobs/cancel", json={"tenant": "bulk"}, headers=ADMIN
            )
        assert answer.status_code == 202, answer.text
        assert answer.json()["requested"] >= 4
        for job_id in others:
            await client.job("other", job_id, "echo")
        await client.flush()
        records = await read_topic(
            configured, configured.topics.results, until=len(bulk) + len(others), timeout_s=120
        )
    results = results_by_id(records)
    assert Counter(results[j][0]["status"] for j in bulk) == {"cancelled": len(bulk)}
    assert Counter(results[j][0]["status"] for j in others) == {"succeeded": len(others)}
    assert all(len(results[j]) == 1 for j in bulk)


async def test_dlq_browse_and_redrive_once_paced(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    tenants = write_tenants(
        tmp_path / "tenants", {"acme": {"conc": 8, "rate": 500, "burst": 50, "queued": 500}}
    )
    configured = operated(settings, tenants, catalog_poll_s=0.2)
    async with replica(configured) as gateway:
        # Records for a tenant that does not exist yet, and garbage from a known one.
        for n in range(7):
            await client.send("newco", {"id": f"n{n}", "type": "echo", "payload": {"n": n}})
        await client.send("acme", b"{not json")
        await client.flush()
        await read_topic(configured, configured.topics.dlq, until=8, timeout_s=30)
        async with ops(gateway) as admin:
            pages, cursor, seen = 0, None, []
            while True:
                params = {"tenant": "newco", "limit": "3", **({"cursor": cursor} if cursor else {})}
                page = (await admin.get("/admin/v1/dlq", params=params, headers=ADMIN)).json()
                seen += page["entries"]
                pages += 1
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert pages >= 3, [(e["partition"], e["offset"], e["job_id"]) for e in seen]
            assert sorted(e["job_id"] for e in seen) == [f"n{n}" for n in range(7)]
            assert {e["reason"] for e in seen} == {"unknown_tenant"}
            assert all(len(e["preview"]) <= 1024 and not e["redriven"] for e in seen)
            bad = await admin.get("/admin/v1/dlq", params={"cursor": "!!"}, headers=ADMIN)
            assert bad.status_code == 400
            # The tenant is added (hot reload), then its records are redriven at 10/s.
            (tenants / "newco.toml").write_text(
                quota_tenant("newco", conc=8, rate=500, burst=50, queued=500)
            )
            await wait_for(lambda: gateway.catalog().get("newco") is not None, 10)
            await asyncio.sleep(0.5)  # the API process gets the new catalog too
            body = {"reason": "unknown_tenant", "max": 100, "rate_per_s": 10}
            dry = (
                await admin.post(
                    "/admin/v1/dlq/redrive", json={**body, "dry_run": True}, headers=ADMIN
                )
            ).json()
            assert (dry["matched"], dry["redriven"], dry["dry_run"]) == (7, 7, True)
            answer = await admin.post("/admin/v1/dlq/redrive", json=body, headers=ADMIN)
            assert answer.status_code == 202
            assert answer.json()["redriven"] == 7
            records = await read_topic(configured, configured.topics.results, until=7, timeout_s=30)
            assert {json.loads(r.value)["status"] for r in records} == {"succeeded"}
            again = (await admin.post("/admin/v1/dlq/redrive", json=body, headers=ADMIN)).json()
            assert (again["matched"], again["redriven"], again["already_redriven"]) == (7, 0, 7)
            metrics = (await admin.get("/metrics")).text
        jobs = await read_topic(configured, configured.topics.jobs, timeout_s=2)
        redriven = sorted(
            r.timestamp for r in jobs if any(k == "redriven-from" for k, _ in r.headers)
        )
        assert len(redriven) == 7  # each DLQ record once
        gaps = [b - a for a, b in itertools.pairwise(redriven)]
        assert min(gaps) >= 70, gaps  # paced at 10/s (100 ms apart, some slack)
        assert 'gateway_dlq_pending{reason="unknown_tenant"} 0.0' in metrics
        assert 'gateway_dlq_pending{reason="malformed_json"} 1.0' in metrics
        assert 'gateway_admin_actions_total{action="redrive"} 2.0' in metrics


async def test_a_high_priority_job_jumps_its_own_tenants_line_only(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    tenants = write_tenants(
        tmp_path / "tenants",
        {
            "busy": {"conc": 1, "rate": 1000, "burst": 10, "queued": 2000},
            "peer": {"conc": 1, "rate": 1000, "burst": 10, "queued": 2000},
        },
    )
    configured = settings.model_copy(update={"tenants_dir": tenants, "max_inflight": 2})
    async with replica(configured):
        for n in range(1000):
            await client.job("busy", f"b{n}", "sleep", seconds=0.01)
        for n in range(300):
            await client.job("peer", f"q{n}", "sleep", seconds=0.01)
        await client.flush()
        await wait_for(lambda: _started(configured, "busy", 20), 30)
        sent_at = time.time()
        await client.send("busy", {"id": "urgent", "type": "sleep", "priority": 9})
        await client.flush()
        await wait_for(lambda: _result(configured, "urgent"), 30)
        busy = [s for s in await statuses(configured, "busy") if s["status"] == "running"]
        peer = [s for s in await statuses(configured, "peer") if s["status"] == "running"]
    urgent_at = next(_at(s) for s in busy if s["id"] == "urgent")
    overtaken = [s for s in busy if sent_at <= _at(s) < urgent_at]
    backlog = 1000 - len([s for s in busy if _at(s) < urgent_at])
    # It started at its tenant's next turns after arriving (the record's trip through
    # the broker takes a few of them), ahead of a backlog of hundreds.
    assert len(overtaken) <= 10, len(overtaken)
    assert backlog > 300, backlog
    # The peer kept its share meanwhile: about one start for each of busy's.
    window = sorted(at for s in busy if sent_at - 2 <= (at := _at(s)) <= urgent_at)
    peers_in_window = [s for s in peer if window[0] <= _at(s) <= window[-1]]
    assert len(peers_in_window) >= 0.6 * len(window)


async def test_the_admin_api_wants_the_operator_token_and_only_that(
    settings: Settings, tmp_path: Path
) -> None:
    configured = operated(
        settings,
        settings.tenants_dir,
        http=settings.http.model_copy(update={"enabled": True, "port": 0}),
    )
    async with replica(configured) as gateway:
        async with ops(gateway) as admin:
            for headers in (
                {},
                {"Authorization": "Bearer demo-key-acme"},
                {"Authorization": "Bearer nope"},
            ):
                answer = await admin.get("/admin/v1/tenants", headers=headers)
                assert answer.status_code == 401
                assert answer.headers["WWW-Authenticate"] == "Bearer"
            ok = await admin.get("/admin/v1/tenants", headers=ADMIN)
            assert ok.status_code == 200
            assert {row["tenant"] for row in ok.json()["tenants"]} == {"acme", "globex", "initech"}
            unknown = await admin.post("/admin/v1/tenants/nobody/pause", headers=ADMIN)
            assert unknown.status_code == 404
            document = (await admin.get("/openapi.json")).json()
            assert "/admin/v1/dlq/redrive" in document["paths"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as tenant:
            absent = await tenant.get("/admin/v1/tenants", headers=ADMIN)
            assert absent.status_code == 404
        # The CLI speaks to the same API.
        env = child_env(configured)
        env.update({"GATEWAY_OPS__URL": f"http://127.0.0.1:{gateway.ops_port}"})
        # In a thread: the gateway answering the CLI runs on this test's loop.
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "tenants", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        assert {row["tenant"] for row in json.loads(done.stdout)["tenants"]} >= {"acme"}
        env["GATEWAY_OPS__TOKEN"] = "wrong"
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "dlq", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert refused.returncode != 0
        assert "401" in refused.stderr
    # Without a token the admin API does not exist at all.
    plain = settings.model_copy(
        update={"ops": settings.ops.model_copy(update={"enabled": True, "port": 0})}
    )
    async with replica(plain) as gateway, ops(gateway) as admin:
        assert (await admin.get("/admin/v1/tenants", headers=ADMIN)).status_code == 404
        assert "/admin/v1/tenants" not in (await admin.get("/openapi.json")).json()["paths"]
