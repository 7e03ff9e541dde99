"""Secrets end to end: real Tansu, real OpenBao, the gateway in process."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from penguiflow import Message, Node, NodePolicy
from pydantic import SecretStr

from gateway.catalog import load_catalog
from gateway.dev.services import OpenBao, free_port
from gateway.errors import JobError
from gateway.flows import FlowGraph, JobContext, builtin_job_types
from gateway.observability import JsonFormatter
from gateway.service import Gateway
from gateway.settings import Settings

from conftest import JobClient, VaultServer, bootstrap_vault, read_topic, results_by_id, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _leaky(ctx: JobContext) -> FlowGraph:
    """A careless user flow: puts the secret in its result or its exception text."""

    async def leak(message: Message, _: Any) -> Any:
        value = await ctx.secrets.get("app", "api_key")
        if message.payload.get("raise"):
            raise JobError(f"could not log in with {value}", retryable=message.payload["retry"])
        return {"token": value, "note": f"used {value} and {ctx.secrets}"}

    node = Node(leak, name="leak", policy=NodePolicy(validate="none"))
    return [(node, ())]


async def _gateway(settings: Settings) -> Gateway:
    types = builtin_job_types()
    types.register("leaky", _leaky)
    gateway = Gateway(settings, load_catalog(settings.tenants_dir, settings.policies_dir), types)
    await gateway.start()
    return gateway


@pytest.fixture
def vault_settings(settings: Settings, openbao: VaultServer) -> Settings:
    return settings.model_copy(update={"vault": openbao.gateway_vault})


@pytest.fixture
async def gateway(vault_settings: Settings) -> AsyncIterator[Gateway]:
    running = await _gateway(vault_settings)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every gateway log line, formatted exactly as `gateway run` writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_each_tenant_gets_its_own_secrets_and_not_another(
    gateway: Gateway, client: JobClient, openbao: VaultServer, captured_logs: io.StringIO
) -> None:
    catalog = gateway.catalog()
    expected = {}
    for tenant in catalog:
        for path in tenant.secret_paths:
            job_id = f"{tenant.id}-{path}"
            await client.job(tenant.id, job_id, "secret_digest", path=path, key="api_key")
            value = openbao.secret(tenant.id, path)["api_key"]
            expected[job_id] = hashlib.sha256(value.encode()).hexdigest()
    await client.job("acme", "sneaky", "secret_digest", path="../globex/app", key="api_key")
    await client.flush()
    settings = client.settings
    results = results_by_id(
        await read_topic(settings, settings.topics.results, until=len(expected) + 1)
    )
    for job_id, digest in expected.items():
        (body,) = results[job_id]
        assert body["status"] == "succeeded", body
        assert body["result"]["sha256"] == digest
    assert len(expected) >= 4  # every shipped tenant, initech with two paths
    (sneaky,) = results["sneaky"]
    assert sneaky["status"] == "failed"
    assert sneaky["error"]["code"] == "secret_forbidden"
    audit = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    audit = [a for a in audit if a["logger"] == "gateway.audit"]
    assert [(a["event"], a["tenant"], a["job_id"]) for a in audit] == [
        ("secret_forbidden", "acme", "sneaky")
    ]
    assert "globex" not in json.dumps(audit[0]["tenant"])


async def test_vault_outage_loses_nothing_and_fails_nothing(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    bao = OpenBao(free_port(), tmp_path / "a.log")
    bao.start()
    try:
        # The root token survives a dev-mode restart; the AppRole (in memory) would not.
        vault = bootstrap_vault(bao).model_copy(
            update={
                "token": SecretStr(bao.root_token),
                "role_id": None,
                "secret_id": None,
                "cache_ttl_s": 0.5,
                "max_stale_s": 600,
            }
        )
        running = await _gateway(settings.model_copy(update={"vault": vault}))
        try:
            await client.job("acme", "warm", "secret_digest", path="app", key="api_key")
            await client.flush()
            await wait_for(lambda: running.recorder.completed >= 1, 30)

            bao.stop()
            await asyncio.sleep(0.7)  # past the cache TTL: what serves now is stale
            for n in range(5):  # cached for acme: keep completing during the outage
                await client.job("acme", f"cached-{n}", "secret_digest", path="app", key="api_key")
            for n in range(5):  # never read: retried, never failed, even with one attempt
                body = {
                    "id": f"cold-{n}",
                    "type": "secret_digest",
                    "payload": {"path": "db", "key": "api_key"},
                    "max_attempts": 1,
                }
                await client.send("initech", body)
            await client.flush()
            topics = settings.topics
            during = await read_topic(settings, topics.results, until=6, timeout_s=20)
            finished = results_by_id(during)
            assert {f"cached-{n}" for n in range(5)} <= set(finished)
            assert not any(k.startswith("cold-") for k in finished), finished.keys()
            retries = await read_topic(settings, topics.retry, until=5, timeout_s=20)
            assert len(retries) >= 5

            await asyncio.sleep(1.0)
            restarted = OpenBao(bao.port, tmp_path / "b.log", root_token=bao.root_token)
            bao = restarted
            bao.start()
            bootstrap_vault(bao)  # dev mode forgets everything: policies, roles, secrets

            after = await read_topic(settings, topics.results, until=11, timeout_s=60)
            final = results_by_id(after)
            assert set(final) == {"warm"} | {f"cached-{n}" for n in range(5)} | {
                f"cold-{n}" for n in range(5)
            }
            for job_id, bodies in final.items():
                assert [b["status"] for b in bodies] == ["succeeded"], (job_id, bodies)
            dlq = await read_topic(settings, topics.dlq, timeout_s=2)
            assert dlq == []
            assert running.secrets is not None
            assert running.secrets.stats.stale_served >= 1
        finally:
            await running.stop()
    finally:
        bao.stop()


async def test_no_secret_value_leaks_anywhere(
    vault_settings: Settings,
    client: JobClient,
    openbao: VaultServer,
    captured_logs: io.StringIO,
    tmp_path: Path,
) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    for source in sorted(vault_settings.tenants_dir.glob("*.toml")):
        text = source.read_text().replace('"secret_digest"]', '"secret_digest", "leaky"]')
        (tenants / source.name).write_text(text)
    settings = vault_settings.model_copy(update={"tenants_dir": tenants})
    gateway = await _gateway(settings)
    try:
        sent = 0
        for n in range(3):
            await client.job("acme", f"ok-{n}", "secret_digest", path="app", key="api_key")
            await client.job("initech", f"db-{n}", "secret_digest", path="db", key="password")
            await client.job("acme", f"leak-result-{n}", "leaky")
            sent += 3
        await client.job("acme", "leak-error", "leaky", **{"raise": True, "retry": False})
        await client.job("acme", "leak-retry", "leaky", **{"raise": True, "retry": True})
        await client.job("globex", "forbidden", "secret_digest", path="../acme/app", key="api_key")
        await client.job("globex", "missing", "secret_digest", path="app", key="nope")
        await client.send("acme", b"{not json")
        sent += 4
        await client.flush()
        topics = settings.topics
        results = await read_topic(settings, topics.results, until=sent, timeout_s=60)
        assert len(results_by_id(results)) == sent
        by_id = results_by_id(results)
        assert by_id["leak-result-0"][0]["status"] == "succeeded"
        assert "[redacted]" in by_id["leak-result-0"][0]["result"]["token"]
        assert by_id["leak-retry"][0]["attempts"] > 1  # retried, then dead-lettered
        assert by_id["leak-error"][0]["error"]["code"] == "job_error"
        stats_text = repr(gateway.secrets.stats) if gateway.secrets else ""
    finally:
        await gateway.stop()

    emitted = [captured_logs.getvalue(), stats_text]
    for topic in topics.all():
        for record in await read_topic(settings, topic, timeout_s=2):
            emitted.append(repr(record.value))
            emitted.append(repr(record.headers))
    haystack = "\n".join(emitted)
    assert "max_attempts_exceeded" in haystack
    assert "secret_digest" in haystack  # we scanned real output
    assert "leak-error" in haystack
    catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
    values = [
        value
        for tenant in catalog
        for path in tenant.secret_paths
        for value in openbao.secret(tenant.id, path).values()
    ]
    assert len(values) >= 8
    hits = [v[:4] + "…" for v in values if v in haystack]
    assert hits == [], f"secret values found in emitted output: {hits}"
