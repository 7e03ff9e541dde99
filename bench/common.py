"""Shared pieces of the benchmarks: a broker, a roomy tenant catalog, load and measurement."""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from gateway.service import ensure_topics
from gateway.services import Tansu, free_port
from gateway.settings import KafkaSettings, Settings, TopicSettings

ROOT = Path(__file__).resolve().parent.parent

BENCH_TENANT = """
id = "{id}"
tier = "enterprise"
[quota]
max_concurrency = {conc}
rate_per_s = {rate}
burst = {burst}
max_queued = {queued}
weight = {weight}
[jobs]
allowed_types = ["echo", "sleep", "fail"]
default_deadline_s = 60
"""


@contextmanager
def broker() -> Iterator[Tansu]:
    """A Tansu broker for one benchmark run."""
    directory = Path(tempfile.mkdtemp(prefix="bench-tansu-"))
    tansu = Tansu(free_port(), directory / "tansu.log")
    tansu.start()
    try:
        yield tansu
    finally:
        tansu.stop()
        shutil.rmtree(directory, ignore_errors=True)


def catalog_dir(tenants: dict[str, dict[str, Any]]) -> Path:
    """A temporary tenants/ directory; each tenant dict overrides the roomy defaults."""
    directory = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    for tenant_id, overrides in tenants.items():
        values = {"conc": 10_000, "rate": 1e6, "burst": 10**6, "queued": 10**6, "weight": 1}
        values.update(overrides)
        (directory / f"{tenant_id}.toml").write_text(BENCH_TENANT.format(id=tenant_id, **values))
    return directory


async def bench_settings(bootstrap: str, tenants_dir: Path, **overrides: Any) -> Settings:
    """Fresh topics and group on the broker, tuned as the README recommends for Tansu."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(
        **{
            name: f"{prefix}.{name}"
            for name in ("jobs", "results", "status", "control", "retry", "deferred", "dlq")
        }
    )
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=f"{prefix}-group",
        fetch_max_wait_ms=50,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    overrides.setdefault("http", {"port": 0})  # a free port, never a fixed one
    settings = Settings(
        kafka=kafka,
        topics=topics,
        tenants_dir=tenants_dir,
        policies_dir=ROOT / "policies",
        **overrides,
    )
    await ensure_topics(kafka, topics)
    return settings


async def produce_jobs(
    settings: Settings, count: int, tenant: str, job_type: str, payload: dict[str, Any]
) -> list[str]:
    """Produce `count` jobs as fast as the producer goes; returns their ids."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=5)
    await producer.start()
    ids = []
    try:
        for n in range(count):
            job_id = f"{tenant}-{n}-{uuid.uuid4().hex[:6]}"
            body = json.dumps({"id": job_id, "type": job_type, "payload": payload}).encode()
            await producer.send(
                settings.topics.jobs,
                body,
                key=job_id.encode(),
                headers=[("tenant", tenant.encode())],
            )
            ids.append(job_id)
        await producer.flush()
    finally:
        await producer.stop()
    return ids


@dataclass
class Measure:
    """Wall and CPU time of this process over a window, and peak RSS."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    @contextmanager
    def window(self) -> Iterator[Measure]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall_s = time.perf_counter() - wall
            self.cpu_s = time.process_time() - cpu


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
