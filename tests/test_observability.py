"""Metrics and logs from a real run: /metrics parses, families are there, logs are JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.catalog import load_catalog
from gateway.observability import JsonFormatter
from gateway.service import Gateway
from gateway.settings import HttpSettings, OpsSettings, Settings

from conftest import JobClient, VaultServer, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOG_FIELDS = {"job_id", "trace_id", "tenant", "replica", "attempt", "outcome", "duration_ms"}


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line of the run, formatted as `gateway run` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(replica="replica-under-test"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from the exposition text."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample_labels, value in found.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_and_logs_of_a_mixed_run(
    settings: Settings,
    client: JobClient,
    openbao: VaultServer,
    json_logs: io.StringIO,
) -> None:
    configured = settings.model_copy(
        update={
            "vault": openbao.gateway_vault,
            "http": HttpSettings(port=0),
            "ops": OpsSettings(port=0),
            "replica": "replica-under-test",
        }
    )
    gateway = Gateway(configured, load_catalog(configured.tenants_dir, configured.policies_dir))
    await gateway.start()
    try:
        job_ids = [f"echo-{n}" for n in range(20)]
        for job_id in job_ids:
            await client.job("acme", job_id, "echo", n=1)
        await client.job("initech", "digest-1", "secret_digest", path="app", key="api_key")
        await client.job("initech", "digest-2", "secret_digest", path="app", key="api_key")
        await client.job("globex", "flaky", "fail", retryable=True, succeed_on_attempt=2)
        await client.send("acme", b"{not json")
        await client.flush()
        job_ids += ["digest-1", "digest-2", "flaky"]
        topics = configured.topics
        await read_topic(configured, topics.results, until=23, timeout_s=60)
        await client.job("initech", "digest-3", "secret_digest", path="app", key="api_key")
        await client.flush()
        job_ids.append("digest-3")
        await read_topic(configured, topics.results, until=24, timeout_s=60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
            denied = await http.get(
                "/v1/jobs/digest-1", headers={"Authorization": "Bearer demo-key-acme"}
            )
            assert denied.status_code == 404
            # A commit after the last result is what the commit histogram needs.
            await wait_for(lambda: gateway.metrics.commit_duration._sum.get() > 0, 10)
            assert (await http.get("/metrics")).status_code == 404  # not on the tenant port
        ops = f"http://127.0.0.1:{gateway.ops_port}"
        async with httpx.AsyncClient(base_url=ops) as http:
            response = await http.get("/metrics")
        assert response.status_code == 200
        text = response.text
    finally:
        await gateway.stop()

    found = samples(text)
    assert total(found, "gateway_jobs_total", tenant="acme", type="echo", outcome="succeeded") == 20
    assert total(found, "gateway_jobs_total", tenant="globex", outcome="retrying") == 1
    assert total(found, "gateway_jobs_total", tenant="globex", outcome="succeeded") == 1
    assert total(found, "gateway_retries_total", tenant="globex", reason="requested_failure") == 1
    assert total(found, "gateway_dlq_total", reason="malformed_json") == 1
    assert total(found, "gateway_job_duration_seconds_count", tenant="acme") == 20
    assert total(found, "gateway_node_latency_seconds_count", tenant="acme", node="echo") == 20
    assert total(found, "gateway_tenant_started_total", tenant="acme") == 20
    assert total(found, "gateway_tenant_completed_total", tenant="acme") == 20
    assert "gateway_tenant_throttled_total" in found
    for gauge in ("gateway_tenant_running", "gateway_tenant_queued", "gateway_tenant_deferred"):
        assert {labels["tenant"] for labels, _ in found[gauge]} >= {"acme", "globex", "initech"}
    assert found["gateway_consumer_lag"], "lag per assigned partition"
    assert all(value >= 0 for _, value in found["gateway_consumer_lag"])
    assert total(found, "gateway_commit_duration_seconds_count") >= 1
    assert total(found, "gateway_vault_calls_total", kind="read") == 1  # single flight + cache
    assert total(found, "gateway_vault_cache_lookups_total", result="hit") >= 1
    assert 0 < total(found, "gateway_vault_cache_hit_ratio") < 1
    assert total(found, "gateway_vault_up") == 1
    assert total(found, "gateway_cross_tenant_denials_total", tenant="acme", action="get") == 1
    label_values = {v for series in found.values() for labels, _ in series for v in labels.values()}
    assert not label_values & set(job_ids), "job ids must never become labels"

    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    finished = [line for line in lines if line["event"] == "job_finished"]
    assert len(finished) >= 24
    for line in finished:
        assert set(line) >= LOG_FIELDS, line
        assert line["trace_id"] == f"job-{line['job_id']}"
    assert all(line["replica"] == "replica-under-test" for line in lines)
    assert all("payload" not in line for line in lines)
