"""The load generator: mixed jobs for several tenants, produced through the broker's proxy.

A job counts as produced only once the broker acknowledged it, so the ledger never
expects a result for a record that may not exist. Produce before a fault and after
healing (a backlog being worked off is load); `produce(..., rate=R)` paces the records
at R per second.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.settings import Settings

__all__ = ["JobSpec", "LoadGenerator", "Mix"]


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    tenant: str
    type: str
    payload: dict[str, Any]


@dataclass
class Mix:
    """What the generator produces: tenants (by weight), and the share of each job type.

    `echo` returns its payload; `sleep` sleeps uniformly `sleep_ms` (1-200 ms by
    default); `secret_digest` reads `app`/`api_key` of its tenant (only the tenants in
    `secret_tenants`, which must be in the catalog with Vault bootstrapped).
    """

    tenants: dict[str, float]
    echo: float = 0.5
    sleep: float = 0.5
    secret: float = 0.0
    sleep_ms: tuple[float, float] = (1.0, 200.0)
    secret_tenants: dict[str, float] = field(default_factory=dict)

    def draw(self, rng: random.Random, job_id: str) -> JobSpec:
        kinds = ["echo", "sleep", "secret_digest"]
        kind = rng.choices(kinds, weights=[self.echo, self.sleep, self.secret])[0]
        if kind == "secret_digest":
            tenants = self.secret_tenants or self.tenants
            tenant = rng.choices(list(tenants), weights=list(tenants.values()))[0]
            return JobSpec(job_id, tenant, kind, {"path": "app", "key": "api_key"})
        tenant = rng.choices(list(self.tenants), weights=list(self.tenants.values()))[0]
        if kind == "sleep":
            low, high = self.sleep_ms
            seconds = round(rng.uniform(low, high) / 1000, 4)
            return JobSpec(job_id, tenant, kind, {"seconds": seconds})
        return JobSpec(job_id, tenant, kind, {"n": job_id, "pad": "x" * rng.randint(0, 200)})


class LoadGenerator:
    """Produces jobs to the cluster's `jobs` topic (through the proxy) and remembers
    every one the broker acknowledged."""

    def __init__(self, settings: Settings, mix: Mix, *, prefix: str = "j", seed: int = 1) -> None:
        self.settings = settings
        self.mix = mix
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.produced: dict[str, JobSpec] = {}
        self.failed_sends = 0
        self._next = 0
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            linger_ms=5,
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=15000,
            max_batch_size=256 * 1024,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def next_jobs(self, count: int, mix: Mix | None = None) -> list[JobSpec]:
        mix = mix or self.mix
        jobs = []
        for _ in range(count):
            self._next += 1
            jobs.append(mix.draw(self.rng, f"{self.prefix}{self._next}"))
        return jobs

    async def send(self, jobs: list[JobSpec]) -> int:
        """Produce `jobs` and wait for their acknowledgements; returns how many the
        broker acknowledged (only those count as produced)."""
        producer = self._producer
        assert producer is not None, "start() first"
        topic = self.settings.topics.jobs
        pending: list[tuple[JobSpec, asyncio.Future[Any]]] = []
        for job in jobs:
            body = {"id": job.id, "type": job.type, "payload": job.payload}
            try:
                future = await producer.send(
                    topic,
                    json.dumps(body).encode(),
                    key=job.id.encode(),
                    headers=[("tenant", job.tenant.encode())],
                )
            except KafkaError:
                self.failed_sends += 1
                continue
            pending.append((job, future))
        acked = 0
        for job, future in pending:
            try:
                await future
            except KafkaError:
                self.failed_sends += 1
                continue
            self.produced[job.id] = job
            acked += 1
        return acked

    async def produce(
        self, count: int, *, rate: float | None = None, mix: Mix | None = None, chunk: int = 500
    ) -> int:
        """Produce `count` new jobs, at `rate` per second when given (else at once, in
        chunks); returns how many were acknowledged."""
        acked = 0
        if rate is None:
            for start in range(0, count, chunk):
                acked += await self.send(self.next_jobs(min(chunk, count - start), mix))
            return acked
        began = time.monotonic()
        sent = 0
        while sent < count:
            due = min(count, int((time.monotonic() - began) * rate) + 1)
            if due > sent:
                batch = min(due - sent, chunk)
                sent += batch
                acked += await self.send(self.next_jobs(batch, mix))
            await asyncio.sleep(0.05)
        return acked

    def kinds(self) -> Counter[str]:
        return Counter(job.type for job in self.produced.values())
