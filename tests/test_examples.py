"""The example job types, loaded through GATEWAY_FLOWS into a real `gateway run` process,
with a real broker, a real Vault and a local HTTP endpoint for the webhook."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import load_catalog
from gateway.dev.services import bootstrap_local
from gateway.flows import load_job_types

from conftest import ROOT, JobClient, VaultServer, read_topic, results_by_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "whk-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]


class _Endpoint(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []  # one list for the test's server
    fail_first: set[str] = set()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        entry = {
            "auth": self.headers.get("Authorization"),
            "key": self.headers.get("Idempotency-Key"),
            "body": body,
        }
        self.received.append(entry)
        job_id = body["job_id"]
        status = 200
        if job_id in self.fail_first:
            self.fail_first.discard(job_id)
            status = 503
        elif entry["auth"] != f"Bearer {TOKEN}":
            status = 401
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_examples_register_through_gateway_flows() -> None:
    types = load_job_types(["examples.webhook", "examples.invoice"])
    assert {"webhook", "invoice", "echo"} <= set(types)


async def test_example_job_types_run_in_gateway_run(
    settings: Any,
    client: JobClient,
    openbao: VaultServer,
    endpoint: str,
    gateway_process: Any,
    tmp_path: Path,
) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "shop.toml").write_text(
        'id = "shop"\ntier = "pro"\n[jobs]\nallowed_types = ["webhook", "invoice"]\n'
        '[secrets]\npaths = ["webhook"]\n'
    )
    configured = settings.model_copy(
        update={
            "tenants_dir": tenants,
            "retry": settings.retry.model_copy(update={"base_s": 0.2, "jitter": 0.0}),
        }
    )
    catalog = load_catalog(tenants, settings.policies_dir)
    configured = bootstrap_local(openbao.bao.addr, openbao.bao.root_token, catalog, configured)
    openbao.admin().secrets.kv.v2.create_or_update_secret(
        path="tenants/shop/webhook", secret={"url": endpoint, "token": TOKEN}
    )
    _Endpoint.received.clear()
    _Endpoint.fail_first = {"hook-2"}
    process = gateway_process(
        configured,
        "examples",
        GATEWAY_FLOWS="examples.webhook,examples.invoice",
        PYTHONPATH=str(ROOT),
    )
    process.start()
    await client.send("shop", {"id": "hook-1", "type": "webhook", "payload": {"event": {"n": 1}}})
    await client.send("shop", {"id": "hook-2", "type": "webhook", "payload": {"event": {"n": 2}}})
    lines = [
        {"sku": "a", "qty": 2, "unit_price": 9.5},
        {"sku": "b", "qty": 1, "unit_price": "0.125"},
    ]
    invoice = {"currency": "EUR", "tax_rate": 0.2, "lines": lines}
    await client.send("shop", {"id": "inv-1", "type": "invoice", "payload": invoice})
    await client.send("shop", {"id": "inv-bad", "type": "invoice", "payload": {"lines": "x"}})
    await client.flush()

    records = await read_topic(configured, configured.topics.results, until=4, timeout_s=90)
    results = {job_id: bodies[0] for job_id, bodies in results_by_id(records).items()}
    assert results["hook-1"]["status"] == "succeeded", results["hook-1"]
    assert results["hook-1"]["result"]["status"] == 200
    # The first delivery of hook-2 got a 503: retried, with the same idempotency key.
    assert (results["hook-2"]["status"], results["hook-2"]["attempts"]) == ("succeeded", 2)
    deliveries = [r for r in _Endpoint.received if r["body"]["job_id"] == "hook-2"]
    assert len(deliveries) == 2
    assert deliveries[0]["key"] == deliveries[1]["key"]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in _Endpoint.received)
    assert results["inv-1"]["result"] == {
        "currency": "EUR",
        "lines": 2,
        "net": "19.12",
        "tax": "3.82",
        "total": "22.94",
    }
    assert results["inv-bad"]["status"] == "failed"
    assert results["inv-bad"]["error"]["code"] == "invalid_invoice"
    # The tenant's token went to its endpoint and nowhere else.
    assert TOKEN not in process.log_path.read_text()
    for topic in (configured.topics.results, configured.topics.status, configured.topics.dlq):
        for record in await read_topic(configured, topic, timeout_s=2):
            assert TOKEN.encode() not in (record.value or b"")
