"""Shared pieces of the benchmarks: a broker, a roomy tenant catalog, load and measurement."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.dev.services import Tansu, free_port
from gateway.service import ensure_topics
from gateway.settings import KafkaSettings, Settings, TopicSettings, child_env

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


async def bench_settings(
    bootstrap: str,
    tenants_dir: Path,
    *,
    kafka_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """Fresh topics and group on the broker, tuned as the README recommends for Tansu."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(
        **{
            name: f"{prefix}.{name}"
            for name in ("jobs", "results", "status", "control", "retry", "deferred", "dlq")
        }
    )
    tuning: dict[str, Any] = {
        "fetch_max_wait_ms": 50,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 500,
        **(kafka_overrides or {}),
    }
    kafka = KafkaSettings(bootstrap_servers=bootstrap, group_id=f"{prefix}-group", **tuning)
    overrides.setdefault("http", {"port": 0})  # free ports, never fixed ones
    overrides.setdefault("ops", {"port": 0})
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


# -- gateways as processes, and what they publish -------------------------------------


def gateway_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that runs `settings` in `python -m gateway run` (JSON logs, no
    HTTP, no Vault), then `extra` (full GATEWAY_* names)."""
    quiet = {
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_HTTP__ENABLED": "false",
        "GATEWAY_VAULT__ENABLED": "false",
    }
    return child_env(settings, {**quiet, **extra})


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildProcess:
    """A benchmark subprocess (a gateway or the guide's loop) with its own log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # only prctl, no locks taken
            )

    def alive(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code (None if killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                return None
        return proc.returncode

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines of one event, oldest first."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                body = json.loads(line)
                if isinstance(body, dict) and body.get("event") == event:
                    found.append(body)
        return found


def gateway_process(settings: Settings, log_path: Path, **env: str) -> ChildProcess:
    """`python -m gateway run` with `settings`."""
    return ChildProcess(
        [sys.executable, "-m", "gateway", "run"], gateway_env(settings, **env), log_path
    )


def assigned_jobs_partitions(process: ChildProcess, jobs_topic: str) -> set[int]:
    """The `jobs` partitions a gateway owns after its latest rebalance (from its log)."""
    events = process.log_events("partitions_assigned")
    if not events:
        return set()
    pattern = re.compile(rf"topic='{re.escape(jobs_topic)}', partition=(\d+)")
    return {int(m) for p in events[-1].get("partitions", []) for m in pattern.findall(p)}


def epoch_s(rfc3339: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC stamp like 2026-01-02T03:04:05.678Z."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class Seen:
    """One result record as the benchmark saw it arrive."""

    id: str
    tenant: str
    status: str
    partition: int
    arrived: float  # this process's clock when the consumer handed the record over
    published: float  # the record's timestamp (the producer's create time)
    started: float | None  # body started_at / finished_at, when the system reports them
    finished: float | None


class ResultWatcher:
    """Reads a results topic live from its start and keeps every record's arrival time.

    A short fetch wait (Tansu always waits the full time) keeps the measurement's own
    delay small; it is the same for every system measured.
    """

    def __init__(self, bootstrap: str, topic: str, fetch_wait_ms: int = 10) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_wait_ms,
        )
        self._topic = topic
        self.seen: list[Seen] = []
        self.by_id: dict[str, list[Seen]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.topics()
        parts = self._consumer.partitions_for_topic(self._topic) or set()
        self._consumer.assign([TopicPartition(self._topic, p) for p in parts])
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            arrived = time.time()
            for records in batches.values():
                for record in records:
                    body = json.loads(record.value)
                    started, finished = body.get("started_at"), body.get("finished_at")
                    seen = Seen(
                        id=body["id"],
                        tenant=body.get("tenant", ""),
                        status=body.get("status", ""),
                        partition=record.partition,
                        arrived=arrived,
                        published=record.timestamp / 1000,
                        started=epoch_s(started) if started else None,
                        finished=epoch_s(finished) if finished else None,
                    )
                    self.seen.append(seen)
                    self.by_id.setdefault(seen.id, []).append(seen)

    def count(self, tenant: str) -> int:
        """Distinct job ids of a tenant with a result so far."""
        return len({s.id for s in self.seen if s.tenant == tenant})

    async def wait(
        self, ids: set[str], timeout_s: float, processes: tuple[ChildProcess, ...] = ()
    ) -> bool:
        """Wait (bounded) until every id has a result; False on timeout or when one of
        `processes` (the systems producing the results) has exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i in self.by_id for i in ids):
                return True
            if not all(p.alive() for p in processes):
                return False
            await asyncio.sleep(0.1)
        return False


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once; an interval ending at t closes before one starting at t."""
    events = sorted([(s, 1) for s, _ in intervals] + [(f, -1) for _, f in intervals])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


def machine_note() -> str:
    """Cores and load averages now (other work shares this machine)."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} {five:.2f} {fifteen:.2f}"


def _git(git: str, *args: str) -> str:
    """A git command's output in this checkout (stripped)."""
    return subprocess.run(
        [git, *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def commit() -> str:
    """The commit measured (`+changes` when the tree differs from it), or `unknown`."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        head = _git(git, "rev-parse", "--short", "HEAD")
        dirty = _git(git, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+changes" if dirty else head


async def wait_split(
    processes: list[ChildProcess], jobs_topic: str, partitions: int, timeout_s: float
) -> list[set[int]]:
    """Wait until the replicas' latest assignments split `jobs` between them, unchanged
    for 1 s; each replica's partitions. Raises if one exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    stable_since: float | None = None
    last: list[set[int]] = []
    while time.monotonic() < deadline:
        if not all(p.alive() for p in processes):
            raise RuntimeError("a gateway exited while joining the group")
        now = [assigned_jobs_partitions(p, jobs_topic) for p in processes]
        split = all(now) and sum(map(len, now)) == partitions
        split &= set().union(*now) == set(range(partitions))
        if split and now == last:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 1.0:
                return now
        else:
            stable_since = None
        last = now
        await asyncio.sleep(0.1)
    raise RuntimeError(f"replicas did not split the partitions: {last}")
