"""`gateway run --workers 2` as a real process tree on a real broker: the work is shared,
the machine answers as one, a killed worker comes back, SIGTERM drains every worker,
and a tenant's quota holds across the workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings

from conftest import (
    ROOT,
    GatewayProcess,
    JobClient,
    VaultServer,
    committed_offsets,
    first_result,
    jobs_partitions,
    quota_tenant,
    rate_between,
    read_topic,
    results_at_least,
    start_times,
    wait_all_results,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "operator-token-for-worker-tests"
REPLICA = "box"  # the gateway process; its worker 1 is box-w1


def quick(settings: Settings, **update: Any) -> Settings:
    """A group that notices a dead member within 3 s."""
    kafka = settings.kafka.model_copy(
        update={"session_timeout_ms": 3000, "heartbeat_interval_ms": 300}
    )
    return settings.model_copy(update={"kafka": kafka, **update})


def machine(make: Any, settings: Settings, name: str = "box", **env: str) -> GatewayProcess:
    """`gateway run --workers 2` with the operators' listener on a free port."""
    process: GatewayProcess = make(
        settings,
        name,
        ("--workers", "2"),
        GATEWAY_REPLICA=REPLICA,
        GATEWAY_OPS__ENABLED="true",
        GATEWAY_OPS__PORT="0",
        GATEWAY_OPS__TOKEN=TOKEN,
        **env,
    )
    process.start()
    return process


def ops_port(process: GatewayProcess) -> int | None:
    lines = process.events("ops_started")
    return int(lines[-1]["port"]) if lines else None


def worker_pid(process: GatewayProcess, worker: int = 1) -> int | None:
    """The PID of the worker's latest start, from the gateway process's log."""
    lines = [
        line
        for line in process.log_lines()
        if line.get("event") in ("worker_started", "worker_restarted")
        and line.get("worker") == worker
    ]
    return int(lines[-1]["pid"]) if lines else None


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def owned(process: GatewayProcess, settings: Settings) -> tuple[set[int], set[int]]:
    """The `jobs` partitions of the gateway process and of its worker 1, from the log."""
    topic = settings.topics.jobs
    return (
        jobs_partitions(process, topic, REPLICA),
        jobs_partitions(process, topic, f"{REPLICA}-w1"),
    )


def split(process: GatewayProcess, settings: Settings) -> bool:
    """Both own partitions of `jobs`, and together all of them."""
    mine, its = owned(process, settings)
    return bool(mine and its) and sorted(mine | its) == list(range(settings.kafka.partitions))


def ops_client(process: GatewayProcess) -> httpx.AsyncClient:
    """A client of the machine's operators' listener (its port must be known)."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops_port(process)}", timeout=10)


async def ready(ops: httpx.AsyncClient) -> bool:
    return (await ops.get("/readyz")).status_code == 200


async def results(settings: Settings, until: int) -> list[dict[str, Any]]:
    records = await read_topic(settings, settings.topics.results, until=until, settle_s=1.0)
    return [json.loads(r.value) for r in records]


async def test_two_workers_share_the_work_and_answer_as_one_machine(
    settings: Settings, client: JobClient, openbao: VaultServer, gateway_process: Any
) -> None:
    configured = quick(settings, vault=openbao.gateway_vault)
    process = machine(gateway_process, configured, GATEWAY_HTTP__ENABLED="true")
    await wait_for(lambda: ops_port(process), 60)
    ops = ops_client(process)
    http_port = process.events("http_started")[-1]["port"]
    tenant_api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
    async with ops, tenant_api:
        await wait_for(lambda: ready(ops), 60)
        ids = set()
        for n in range(300):
            await client.job("initech", f"e{n}", "echo", n=n)
            ids.add(f"e{n}")
        for n in range(100):
            await client.job("acme", f"s{n}", "sleep", seconds=0.01)
            ids.add(f"s{n}")
        for n in range(20):
            await client.job("initech", f"d{n}", "secret_digest", path="app", key="api_key")
            ids.add(f"d{n}")
        await client.flush()
        # Through the API process, which hands GET the results both workers forward.
        key = {"Authorization": "Bearer demo-key-acme"}
        for n in range(20):
            body = {"type": "echo", "id": f"h{n}", "payload": {"n": n}}
            assert (await tenant_api.post("/v1/jobs", json=body, headers=key)).status_code == 202
            ids.add(f"h{n}")
        pending = {f"h{n}" for n in range(20)}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                answer = (await tenant_api.get(f"/v1/jobs/{job_id}", headers=key)).json()
                if answer["status"] == "succeeded":
                    assert answer["result"] is not None, "terminal without its result"
                    pending.discard(job_id)
            await asyncio.sleep(0.01)
        assert not pending

        bodies = await results(configured, len(ids))
        seen = Counter(body["id"] for body in bodies)
        assert set(seen) == ids
        assert max(seen.values()) == 1, "a job ran twice"
        assert {body["status"] for body in bodies} == {"succeeded"}

        # Both workers own partitions of `jobs`, together all of them, and ran jobs
        # (secret reads too: the worker got the Vault credentials over its channel).
        assert split(process, configured)
        ran = Counter(
            (line["replica"], line["type"])
            for line in process.events("job_finished")
            if line.get("outcome") == "succeeded"
        )
        assert ran[(REPLICA, "echo")]
        assert ran[(f"{REPLICA}-w1", "echo")]
        assert ran[(f"{REPLICA}-w1", "secret_digest")]

        # One scrape, every family once, each worker's series under its label.
        text = (await ops.get("/metrics")).text
        types = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
        assert max(types.values()) == 1, [name for name, n in types.items() if n > 1]
        for worker in ("0", "1"):
            assert f'type="echo",worker="{worker}"}}' in text
            assert f'gateway_worker_up{{worker="{worker}"}} 1.0' in text
        assert 'gateway_worker_restarts_total{worker="1"} 0.0' in text
        # The API process's own series (one for the machine) carry no worker label.
        requests = [
            line for line in text.splitlines() if line.startswith("gateway_http_request_duration")
        ]
        assert requests
        assert not any("worker=" in line for line in requests)
        assert (await ops.get("/readyz")).json() == {"ready": True, "reasons": []}
        tenants = await ops.get("/admin/v1/tenants", headers={"Authorization": f"Bearer {TOKEN}"})
        assert tenants.status_code == 200
        assert {row["tenant"] for row in tenants.json()["tenants"]} >= {"acme", "initech"}

    # Neither the worker nor the API process has a Vault credential in its environment.
    secret_id = openbao.gateway_vault.secret_id.get_secret_value()
    api_pid = process.events("api_process_started")[-1]["pid"]
    for pid in (worker_pid(process), api_pid):
        environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
        assert b"GATEWAY_VAULT__" not in environ
        assert secret_id.encode() not in environ
    workers = [worker_pid(process), api_pid]
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0
    await wait_for(lambda: not any(alive(pid) for pid in workers if pid), 5)


async def test_a_killed_worker_is_restarted_and_nothing_is_lost(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    configured = quick(settings, max_inflight=64)
    process = machine(gateway_process, configured)
    await wait_for(lambda: ops_port(process), 60)
    async with ops_client(process) as ops:
        await wait_for(lambda: ready(ops), 60)
        ids = {f"k{n}" for n in range(1500)}
        for n in range(1500):
            await client.job("initech" if n % 2 else "acme", f"k{n}", "sleep", seconds=0.005)
        await client.flush()
        await wait_for(lambda: results_at_least(configured, 200), 60)
        killed = worker_pid(process)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        # The machine says which worker is not ready and why, then it is back.
        await wait_for(lambda: _reason_names_worker(ops), 10)
        await wait_for(lambda: worker_pid(process) not in (None, killed), 60)
        exited = [(line["worker"], line["exit_code"]) for line in process.events("worker_exited")]
        assert exited == [(1, -9)]
        seen = await wait_all_results(configured, ids, 120)
        assert set(seen) == ids
        # A second result only for work the killed worker had in flight, uncommitted.
        duplicates = sum(n - 1 for n in seen.values())
        assert duplicates <= configured.max_inflight + configured.kafka.max_poll_records
        await wait_for(lambda: ready(ops), 30)
        text = (await ops.get("/metrics")).text
        assert 'gateway_worker_restarts_total{worker="1"} 1.0' in text
        assert 'gateway_worker_up{worker="1"} 1.0' in text
    restarted = process.events("worker_restarted")
    assert [(line["worker"], line["exit_code"]) for line in restarted] == [(1, -9)]
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0


async def _reason_names_worker(ops: httpx.AsyncClient) -> bool:
    answer = await ops.get("/readyz")
    return answer.status_code == 503 and any(
        reason.startswith("worker 1: ") for reason in answer.json()["reasons"]
    )


async def test_sigterm_drains_every_worker_and_exits_zero_within_the_grace(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    # Worker 1 gets short jobs, the gateway process jobs longer than the session timeout:
    # worker 1 has drained long before. Had it left the group then, the rebalance would
    # have given the long jobs half a session timeout (1.5 s) before cancelling them.
    configured = quick(settings, shutdown_grace_s=8.0)
    process = machine(gateway_process, configured)
    await wait_for(lambda: split(process, configured), 60)
    mine, its = owned(process, configured)
    ids = set()
    for partition in sorted(mine | its):
        seconds = 5.0 if partition in mine else 0.3
        for n in range(3):
            job_id = f"p{partition}-{n}"
            body = {"id": job_id, "type": "sleep", "payload": {"seconds": seconds}}
            await client.producer.send(
                configured.topics.jobs,
                json.dumps(body).encode(),
                partition=partition,
                headers=[("tenant", b"acme")],
            )
            ids.add(job_id)
    await client.flush()
    statuses = await read_topic(configured, configured.topics.status, until=12, timeout_s=30)
    assert {json.loads(r.value)["id"] for r in statuses} == ids
    pid = worker_pid(process)
    stopped_at = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0
    took = time.monotonic() - stopped_at
    assert took < configured.shutdown_grace_s + 5.0, took
    assert pid is not None
    assert not alive(pid)
    # Every job running at the signal finished within the grace, once, and is committed.
    seen = Counter(body["id"] for body in await results(configured, len(ids)))
    assert seen == dict.fromkeys(ids, 1)
    committed = await committed_offsets(configured, configured.topics.jobs)
    assert sum(offset or 0 for offset in committed.values()) == len(ids)
    stopped = process.events("worker_stopped")
    assert [(line["worker"], line["exit_code"]) for line in stopped] == [(1, 0)]
    assert not process.events("jobs_cancelled_unfinished")


async def test_a_second_signal_ends_every_process_at_once(
    settings: Settings, client: JobClient, gateway_process: Any
) -> None:
    configured = quick(settings, shutdown_grace_s=30.0)
    process = machine(gateway_process, configured)
    await wait_for(lambda: ops_port(process), 60)
    async with ops_client(process) as ops:
        await wait_for(lambda: ready(ops), 60)
    for n in range(8):
        await client.job("acme", f"forever{n}", "sleep", seconds=60)
    await client.flush()
    await read_topic(configured, configured.topics.status, until=8, timeout_s=30)
    worker = worker_pid(process)
    assert worker is not None
    process.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    began = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 130
    assert time.monotonic() - began < 3.0
    await wait_for(lambda: not alive(worker), 3)


async def test_two_workers_hold_each_tenant_to_its_rate_however_records_are_keyed(
    settings: Settings, client: JobClient, gateway_process: Any, tmp_path: Path
) -> None:
    # Each worker is a replica to the quota shares (gateway.shares): a tenant keyed by
    # tenant (one partition, so one worker) gets its whole rate there, and one keyed by
    # job id (both workers) gets it once between them, not once per worker.
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    for tenant in ("bytenant", "byjob"):
        (tenants / f"{tenant}.toml").write_text(
            quota_tenant(tenant, conc=8, rate=40, burst=4, queued=1000)
        )
    configured = quick(settings, tenants_dir=tenants, policies_dir=ROOT / "policies")
    process = machine(gateway_process, configured)
    await wait_for(lambda: split(process, configured), 60)
    assigned = owned(process, configured)
    for n in range(500):
        body = {"id": f"t{n}", "type": "sleep", "payload": {"seconds": 0.02}}
        await client.send("bytenant", body, key=b"bytenant")
        await client.job("byjob", f"j{n}", "sleep", seconds=0.02)
    await client.flush()
    await first_result(configured)
    await asyncio.sleep(9.0)
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert owned(process, configured) == assigned, "rebalanced"
    ran = {line["replica"] for line in process.events("job_finished") if line["tenant"] == "byjob"}
    assert ran == {REPLICA, f"{REPLICA}-w1"}
    rates = {}
    for tenant in ("bytenant", "byjob"):
        starts = await start_times(configured, tenant)
        rates[tenant] = rate_between(starts, starts[0] + 1.5, starts[0] + 8.5)
    for tenant, rate in rates.items():
        assert 40 * 0.88 <= rate <= 40 * 1.12, f"{tenant}: {rate:.1f}/s at 40/s ({rates})"
