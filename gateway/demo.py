"""`gateway demo`: Tansu + OpenBao + one gateway + a scripted mixed workload + a summary."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gateway.catalog import Catalog, load_catalog
from gateway.service import Gateway, ensure_topics
from gateway.services import local_services
from gateway.settings import Settings
from gateway.vault_bootstrap import bootstrap_local

__all__ = ["run_demo"]


@dataclass
class _TenantStats:
    sent: int = 0
    done: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _Scoreboard:
    tenants: dict[str, _TenantStats] = field(default_factory=lambda: defaultdict(_TenantStats))
    sent_at: dict[str, float] = field(default_factory=dict)
    dlq: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    # (tenant, path) -> SHA-256 of the secret's api_key, read with the admin token.
    expected_digests: dict[tuple[str, str], str] = field(default_factory=dict)
    digests: Counter[str] = field(default_factory=Counter)

    def table(self, gateway: Gateway) -> Table:
        table = Table(title=f"gateway demo: {time.monotonic() - self.started:5.1f}s")
        columns = (
            "tenant",
            "sent",
            "done",
            "done/s",
            "running",
            "queued",
            "throttled",
            "p50 ms",
            "p99 ms",
        )
        for column in columns:
            table.add_column(column, justify="right")
        table.add_column("outcomes")
        pools = {f.tenant: f for f in gateway.pools.snapshot()}
        elapsed = max(0.1, time.monotonic() - self.started)
        for tenant, stats in sorted(self.tenants.items()):
            figures = pools.get(tenant)
            queued, running, throttled = (
                (figures.queued, figures.running, figures.throttled) if figures else (0, 0, 0)
            )
            done = sum(stats.done.values())
            outcomes = ", ".join(f"{k}={v}" for k, v in sorted(stats.done.items()))
            table.add_row(
                tenant,
                str(stats.sent),
                str(done),
                f"{done / elapsed:.1f}",
                str(running),
                str(queued),
                str(throttled),
                f"{stats.percentile(0.5):.0f}",
                f"{stats.percentile(0.99):.0f}",
                outcomes,
            )
        if self.dlq:
            table.caption = "DLQ: " + ", ".join(f"{k}={v}" for k, v in sorted(self.dlq.items()))
        return table


async def _produce(
    producer: AIOKafkaProducer,
    board: _Scoreboard,
    topic: str,
    tenant: str,
    job_type: str,
    payload: dict[str, Any],
) -> None:
    job_id = f"{tenant}-{job_type}-{uuid.uuid4().hex[:10]}"
    body = json.dumps({"id": job_id, "type": job_type, "payload": payload}).encode()
    board.sent_at[job_id] = time.monotonic()
    board.tenants[tenant].sent += 1
    await producer.send(topic, body, key=job_id.encode(), headers=[("tenant", tenant.encode())])


async def _workload(
    producer: AIOKafkaProducer, board: _Scoreboard, topic: str, duration: float
) -> None:
    # The scripted moments: secrets injected per tenant, a retry that then succeeds,
    # a poison record, and a noisy burst.
    for tenant, path in board.expected_digests:
        await _produce(
            producer, board, topic, tenant, "secret_digest", {"path": path, "key": "api_key"}
        )
    await _produce(
        producer, board, topic, "acme", "fail", {"retryable": True, "succeed_on_attempt": 2}
    )
    await producer.send(topic, b"{not json", headers=[("tenant", b"acme")])
    await producer.send(topic, b'{"id":"x","type":"echo"}', headers=[("tenant", b"nobody")])
    # globex is on the free tier (10 jobs/s, burst 20): its flood is visibly throttled
    # while acme and initech keep their own latency.
    for _ in range(120):
        await _produce(producer, board, topic, "globex", "sleep", {"seconds": 0.05})
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for tenant in ("acme", "initech"):
            await _produce(producer, board, topic, tenant, "echo", {"n": 1})
            await _produce(producer, board, topic, tenant, "sleep", {"seconds": 0.02})
        await producer.flush()
        await asyncio.sleep(0.1)


async def _collect(consumer: AIOKafkaConsumer, board: _Scoreboard, results: str, dlq: str) -> None:
    while True:
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                if record.topic == dlq:
                    reason = dict(record.headers).get("dlq-reason", b"?").decode()
                    board.dlq[reason] += 1
                    continue
                body = json.loads(record.value)
                if body["type"] == "secret_digest" and body["status"] == "succeeded":
                    result = body["result"]
                    wanted = board.expected_digests.get((body["tenant"], result["path"]))
                    board.digests["matched" if result["sha256"] == wanted else "wrong"] += 1
                stats = board.tenants[body["tenant"]]
                stats.done[body["status"]] += 1
                sent = board.sent_at.pop(body["id"], None)
                if sent is not None:
                    stats.latencies_ms.append((time.monotonic() - sent) * 1000)


async def run_demo(
    settings: Settings, *, duration_s: float, dashboard: bool, log_dir: Path
) -> bool:
    """Run the scripted demo; True when every job reached a terminal result."""
    console = Console()
    catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
    with local_services(log_dir) as services:
        vault_addr = services.openbao.addr if services.openbao is not None else "-"
        console.print(
            f"tansu on {services.tansu.bootstrap}, openbao on {vault_addr}, logs in {log_dir}"
        )
        kafka = settings.kafka.model_copy(
            update={
                "bootstrap_servers": services.tansu.bootstrap,
                "fetch_max_wait_ms": 50,
                "session_timeout_ms": 6000,
            }
        )
        # Like the broker and Vault, the API takes a free port unless one is set.
        http = settings.http
        if "port" not in http.model_fields_set:
            http = http.model_copy(update={"port": 0})
        demo_settings = settings.model_copy(
            update={
                "kafka": kafka,
                "http": http,
                "retry": settings.retry.model_copy(update={"base_s": 0.5}),
            }
        )
        board = _Scoreboard()
        if services.openbao is not None:
            bao = services.openbao
            demo_settings = bootstrap_local(bao.addr, bao.root_token, catalog, demo_settings)
            board.expected_digests = _expected_digests(bao.addr, bao.root_token, catalog)
            console.print(f"vault bootstrapped: {len(catalog)} tenants, gateway logs in by AppRole")
        await ensure_topics(kafka, demo_settings.topics)
        gateway = Gateway(demo_settings, catalog)
        await gateway.start()
        if gateway.http_port is not None:
            console.print(
                f"control API on http://{http.host}:{gateway.http_port} "
                "(keys: demo-key-acme, demo-key-globex, demo-key-initech)"
            )
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
        consumer = AIOKafkaConsumer(
            demo_settings.topics.results,
            demo_settings.topics.dlq,
            bootstrap_servers=kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await producer.start()
        await consumer.start()
        collector = asyncio.create_task(
            _collect(consumer, board, demo_settings.topics.results, demo_settings.topics.dlq)
        )
        try:
            work = asyncio.create_task(
                _workload(producer, board, demo_settings.topics.jobs, duration_s)
            )
            deadline = time.monotonic() + duration_s + 60
            live = (
                Live(board.table(gateway), console=console, refresh_per_second=4)
                if dashboard
                else None
            )
            with live if live is not None else contextlib.nullcontext():
                last = 0.0
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                    if live is not None:
                        live.update(board.table(gateway))
                    elif time.monotonic() - last > 2:
                        last = time.monotonic()
                        done = sum(sum(s.done.values()) for s in board.tenants.values())
                        console.print(f"progress: {done} results, {len(board.sent_at)} pending")
                    if work.done() and not board.sent_at:
                        break
            await work
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            await gateway.stop()
        console.print(board.table(gateway))
        ok = not board.sent_at and board.digests["matched"] == len(board.expected_digests)
        console.print(
            f"secrets: {board.digests['matched']}/{len(board.expected_digests)} digests matched"
            f" what Vault holds, {board.digests['wrong']} wrong"
        )
        console.print(
            "summary: "
            + (
                "every job reached a terminal result"
                if ok
                else f"{len(board.sent_at)} jobs without a result"
            )
        )
        return ok


def _expected_digests(addr: str, admin_token: str, catalog: Catalog) -> dict[tuple[str, str], str]:
    """What each tenant's `secret_digest` job must return (digests only, never values)."""
    client = hvac.Client(url=addr, token=admin_token, timeout=10)
    digests = {}
    for tenant in catalog:
        for path in tenant.secret_paths:
            secret = client.secrets.kv.v2.read_secret_version(
                path=f"tenants/{tenant.id}/{path}", raise_on_deleted_version=True
            )
            value = secret["data"]["data"]["api_key"]
            digests[(tenant.id, path)] = hashlib.sha256(value.encode()).hexdigest()
    return digests
