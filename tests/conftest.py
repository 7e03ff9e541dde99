"""Fixtures: one real Tansu broker per session, isolated topics and groups per test."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.catalog import load_catalog
from gateway.dev.services import OpenBao, Tansu, bootstrap_local, free_port
from gateway.service import ensure_topics
from gateway.settings import KafkaSettings, Settings, TopicSettings, child_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A real Tansu broker on a free loopback port, stopped by PID at the end."""
    broker = Tansu(free_port(), tmp_path_factory.mktemp("tansu") / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class VaultServer:
    """A bootstrapped OpenBao: shipped tenants, demo secrets, the gateway's AppRole."""

    bao: OpenBao
    gateway_vault: Any  # VaultSettings that log in as the gateway (AppRole)

    def admin(self) -> hvac.Client:
        return hvac.Client(url=self.bao.addr, token=self.bao.root_token, timeout=5)

    def secret(self, tenant: str, path: str) -> dict[str, str]:
        """A secret's values, read with the admin token (tests compare digests)."""
        response = self.admin().secrets.kv.v2.read_secret_version(
            path=f"tenants/{tenant}/{path}", raise_on_deleted_version=True
        )
        return dict(response["data"]["data"])


def bootstrap_vault(bao: OpenBao) -> Any:
    """Bootstrap the shipped catalog into `bao`; VaultSettings for the gateway's AppRole."""
    base = Settings(tenants_dir=ROOT / "tenants", policies_dir=ROOT / "policies")
    catalog = load_catalog(base.tenants_dir, base.policies_dir)
    return bootstrap_local(bao.addr, bao.root_token, catalog, base).vault


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultServer]:
    """A real OpenBao in dev mode on a free loopback port, bootstrapped, stopped by PID."""
    bao = OpenBao(free_port(), tmp_path_factory.mktemp("openbao") / "openbao.log")
    bao.start()
    try:
        yield VaultServer(bao, bootstrap_vault(bao))
    finally:
        bao.stop()


_QUOTA_TENANT = """
id = "{id}"
tier = "pro"
[quota]
max_concurrency = {conc}
rate_per_s = {rate}
burst = {burst}
max_queued = {queued}
weight = {weight}
[jobs]
allowed_types = {types}
default_deadline_s = 60
max_attempts = 5
"""


def quota_tenant(
    tenant_id: str,
    *,
    conc: int,
    rate: float,
    burst: int,
    queued: int,
    weight: int = 1,
    types: Sequence[str] = ("echo", "sleep"),
) -> str:
    """A tenant file with the given quota, allowed the given job types."""
    return _QUOTA_TENANT.format(
        id=tenant_id,
        conc=conc,
        rate=rate,
        burst=burst,
        queued=queued,
        weight=weight,
        types=json.dumps(list(types)),
    )


def make_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings for one test: unique topics and group, fast timings."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(
        jobs=f"{prefix}.jobs",
        results=f"{prefix}.results",
        status=f"{prefix}.status",
        control=f"{prefix}.control",
        retry=f"{prefix}.retry",
        deferred=f"{prefix}.deferred",
        dlq=f"{prefix}.dlq",
    )
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=f"{prefix}-group",
        fetch_max_wait_ms=50,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        commit_interval_ms=200,
        partitions=overrides.pop("partitions", 4),
    )
    values: dict[str, Any] = {
        "kafka": kafka,
        "topics": topics,
        "tenants_dir": ROOT / "tenants",
        "policies_dir": ROOT / "policies",
        "shutdown_grace_s": 5.0,
        # No HTTP API (its own process) unless a test asks: `http={"port": 0}` serves it
        # on a free port (see Gateway.http_port), `ops={"port": 0}` the operators'
        # listener (Gateway.ops_port).
        "http": {"port": 0, "enabled": False},
        "ops": {"port": 0, "enabled": False},
        "retry": {"base_s": 0.2, "factor": 2.0, "cap_s": 2.0, "jitter": 0.5, "max_attempts": 3},
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces `settings` in a subprocess (JSON logs, no HTTP)."""
    return child_env(
        settings,
        {
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_HTTP__ENABLED": "false",
            "GATEWAY_OPS__ENABLED": "false",
        },
    )


@pytest.fixture
async def settings(tansu: Tansu) -> Settings:
    """Per-test settings with the topics already created."""
    made = make_settings(tansu.bootstrap)
    await ensure_topics(made.kafka, made.topics)
    return made


@dataclass
class JobClient:
    """Produces jobs and reads every output topic, as a user of the contract would."""

    settings: Settings
    producer: AIOKafkaProducer

    async def send(
        self,
        tenant: str | None,
        body: dict[str, Any] | bytes | None,
        *,
        headers: list[tuple[str, bytes]] | None = None,
        key: bytes | None = None,
    ) -> None:
        """Produce one record to `jobs`."""
        value = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        all_headers = list(headers or [])
        if tenant is not None:
            all_headers.insert(0, ("tenant", tenant.encode()))
        await self.producer.send(self.settings.topics.jobs, value, key=key, headers=all_headers)

    async def job(self, tenant: str, job_id: str, job_type: str, **payload: Any) -> None:
        """Produce a well-formed job."""
        body = {"id": job_id, "type": job_type, "payload": payload}
        await self.send(tenant, body, key=job_id.encode())

    async def flush(self) -> None:
        """Wait until everything sent is acknowledged."""
        await self.producer.flush()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[JobClient]:
    """A producer-side client bound to the test's topics."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=2, max_request_size=4 << 20
    )
    await producer.start()
    try:
        yield JobClient(settings, producer)
    finally:
        await producer.stop()


async def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: int | None = None,
    timeout_s: float = 60.0,
    settle_s: float = 0.0,
) -> list[Any]:
    """Every record of a topic from the start, waiting until `until` records (bounded)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            fresh = [r for rs in batches.values() for r in rs]
            records.extend(fresh)
            if fresh:
                quiet_since = time.monotonic()
            if until is not None and len(records) >= until:
                if time.monotonic() - quiet_since >= settle_s:
                    break
            elif until is None and time.monotonic() - quiet_since > max(settle_s, 1.0):
                break
        return records
    finally:
        await consumer.stop()


async def result_ids(settings: Settings) -> Counter[str]:
    """How many results each job id has so far."""
    records = await read_topic(settings, settings.topics.results, timeout_s=3.0)
    return Counter(json.loads(r.value)["id"] for r in records)


async def wait_all_results(settings: Settings, ids: set[str], timeout_s: float) -> Counter[str]:
    """Result counts once every id in `ids` has one (bounded; fails naming the missing)."""
    deadline = time.monotonic() + timeout_s
    seen: Counter[str] = Counter()
    while time.monotonic() < deadline:
        seen = await result_ids(settings)
        if ids <= set(seen):
            return seen
        await asyncio.sleep(0.5)
    missing = ids - set(seen)
    pytest.fail(f"{len(missing)} jobs without a result, e.g. {sorted(missing)[:5]}")


async def results_at_least(settings: Settings, count: int) -> bool:
    """At least `count` records on the results topic (duplicates included)."""
    records = await read_topic(settings, settings.topics.results, timeout_s=1.0)
    return len(records) >= count


def results_by_id(records: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """Result bodies grouped by job id."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        body = json.loads(record.value)
        grouped.setdefault(body["id"], []).append(body)
    return grouped


async def committed_offsets(settings: Settings, topic: str) -> dict[int, int | None]:
    """The group's committed offset per partition, read with consumer.committed()."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = sorted(consumer.partitions_for_topic(topic) or set())
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        await consumer.stop()


async def all_committed(settings: Settings) -> bool:
    """Whether the group has committed every `jobs` partition up to its end."""
    records = await read_topic(settings, settings.topics.jobs, timeout_s=2)
    ends: dict[int, int] = {}
    for record in records:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    committed = await committed_offsets(settings, settings.topics.jobs)
    return all(committed.get(p) == end for p, end in ends.items())


class GatewayProcess:
    """`python -m gateway run [ARGS]` as a real subprocess with its own log file."""

    def __init__(
        self, settings: Settings, log_path: Path, args: Sequence[str] = (), **env: str
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.args = list(args)
        self.env = {**settings_env(settings), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"raw": line})
        return lines

    def events(self, event: str) -> list[dict[str, Any]]:
        """Its log lines of one event, oldest first (a worker's lines are in its log too)."""
        return [line for line in self.log_lines() if line.get("event") == event]


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Any]:
    """Factory for gateway subprocesses; every one is killed at the end of the test."""
    started: list[GatewayProcess] = []

    def make(
        settings: Settings, name: str = "gw", args: Sequence[str] = (), **env: str
    ) -> GatewayProcess:
        path = tmp_path / f"{name}-{len(started)}.log"
        process = GatewayProcess(settings, path, args, **env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.kill()


async def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> None:
    """Poll an async or sync predicate until true, or fail the test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s}s")


def jobs_partitions(
    process: GatewayProcess, jobs_topic: str, replica: str | None = None
) -> set[int]:
    """The `jobs` partitions a gateway (the one named `replica`, if given) owns after its
    latest rebalance, from its log."""
    assigned = [
        line
        for line in process.events("partitions_assigned")
        if replica is None or line.get("replica") == replica
    ]
    if not assigned:
        return set()
    pattern = re.compile(rf"topic='{re.escape(jobs_topic)}', partition=(\d+)")
    return {int(n) for p in assigned[-1]["partitions"] for n in pattern.findall(p)}


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 stamp of a result record."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def start_times(settings: Settings, tenant: str) -> list[float]:
    """started_at of every result of `tenant`, sorted (read once the gateways stopped)."""
    records = await read_topic(settings, settings.topics.results, timeout_s=30)
    bodies = [json.loads(r.value) for r in records]
    assert all(b["status"] == "succeeded" for b in bodies)
    return sorted(epoch(b["started_at"]) for b in bodies if b["tenant"] == tenant)


def rate_between(starts: list[float], begin: float, end: float) -> float:
    """Starts per second in [begin, end)."""
    return sum(1 for s in starts if begin <= s < end) / (end - begin)


async def first_result(settings: Settings) -> None:
    """Wait (bounded) until `jobs.results` has a record."""
    await read_topic(settings, settings.topics.results, until=1, timeout_s=60)
