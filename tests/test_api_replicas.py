"""Two `gateway run` processes in one group: submit through one, read and cancel through the other."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import psutil
import pytest

from gateway.settings import Settings

from conftest import GatewayProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ACME = {"Authorization": "Bearer demo-key-acme"}  # the shipped example tenants' keys
GLOBEX = {"Authorization": "Bearer demo-key-globex"}


def http_port(process: GatewayProcess) -> int | None:
    """The port from the replica's `http_started` log line (it listens on port 0)."""
    for line in process.log_lines():
        if line.get("event") == "http_started":
            return int(line["port"])
    return None


def api_pid(process: GatewayProcess) -> int:
    """The PID of the replica's API process, from its `api_process_started` log line."""
    return next(
        int(line["pid"])
        for line in process.log_lines()
        if line.get("event") == "api_process_started"
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], done: Any, timeout_s: float = 20
) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await client.get(path, headers=headers)
        if done(response):
            return response
        await asyncio.sleep(0.05)
    pytest.fail(f"{path}: last answer {response.status_code} {response.text}")


async def test_submit_on_one_replica_read_and_cancel_on_the_other(
    settings: Settings, gateway_process: Any
) -> None:
    env = {"GATEWAY_HTTP__ENABLED": "true", "GATEWAY_HTTP__PORT": "0"}
    one = gateway_process(settings, "one", **env)
    two = gateway_process(settings, "two", **env)
    one.start()
    two.start()
    await wait_for(lambda: http_port(one) and http_port(two), 30)
    a = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port(one)}", timeout=10)
    b = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port(two)}", timeout=10)
    async with a, b:
        for client in (a, b):
            await until(client, "/readyz", {}, lambda r: r.status_code == 200)

        submitted = await a.post(
            "/v1/jobs", json={"type": "echo", "payload": {"x": 1}}, headers=ACME
        )
        echo_id = submitted.json()["id"]
        done = await until(
            b, f"/v1/jobs/{echo_id}", ACME, lambda r: r.status_code == 200 and r.json()["result"]
        )
        assert done.json()["status"] == "succeeded"
        assert done.json()["result"]["result"] == {"x": 1}

        submitted = await a.post(
            "/v1/jobs", json={"type": "sleep", "payload": {"seconds": 30}}, headers=ACME
        )
        sleep_id = submitted.json()["id"]
        await until(
            b,
            f"/v1/jobs/{sleep_id}",
            ACME,
            lambda r: r.status_code == 200 and r.json()["status"] == "running",
        )
        # Another tenant, through the other replica, learns nothing and changes nothing.
        denied = await b.post(f"/v1/jobs/{sleep_id}/cancel", headers=GLOBEX)
        unknown = await b.post("/v1/jobs/" + "0" * len(sleep_id) + "/cancel", headers=GLOBEX)
        assert denied.status_code == 404
        assert (denied.headers.raw, denied.content) == (unknown.headers.raw, unknown.content)

        asked = time.monotonic()
        cancel = await b.post(f"/v1/jobs/{sleep_id}/cancel", headers=ACME)
        assert cancel.status_code == 202
        over = await until(
            a,
            f"/v1/jobs/{sleep_id}",
            ACME,
            lambda r: r.json()["status"] == "cancelled" and r.json()["result"],
        )
        assert time.monotonic() - asked < 5
        assert over.json()["result"]["duration_ms"] < 10_000
        again = await a.post(f"/v1/jobs/{sleep_id}/cancel", headers=ACME)
        assert again.status_code == 409

    # A replica killed outright takes its API process with it (the channel closes);
    # the other stops in order, its API process first.
    orphan = api_pid(one)
    one.kill()
    await wait_for(lambda: not alive(orphan), 10)
    two.signal(signal.SIGTERM)
    assert two.wait(30) == 0
    assert not alive(api_pid(two))
    audits = [
        line
        for process in (one, two)
        for line in process.log_lines()
        if line.get("logger") == "gateway.audit"
    ]
    assert [(x["event"], x["tenant"], x["action"]) for x in audits] == [
        ("cross_tenant_denied", "globex", "cancel")
    ]
    assert "acme" not in json.dumps(audits)
