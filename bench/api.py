"""Issue 6 benchmark: GET /v1/jobs/{id} latency while the gateway works through jobs.

A real `gateway run` process (HTTP on a free port) against Tansu. This process is the
load: an aiokafka producer feeding `echo` jobs at --jobs-rate, and an open-loop HTTP
client sending GETs at --rate over a few keep-alive connections. Latency is measured
from each request's scheduled send time (a late start counts against the gateway, no
coordinated omission). Baseline in the same run: the same GET rate with no job load.

Run: .venv/bin/python -m bench.api [--duration 30] [--rate 500] [--jobs-rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import multiprocessing
import os
import random
import secrets
import signal
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import Process
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import ROOT, bench_settings, broker
from gateway.dev.services import free_port
from gateway.settings import Settings, child_env

KEY = f"bench-{secrets.token_urlsafe(16)}"
TENANT = f"""
id = "bench"
tier = "enterprise"
api_keys_sha256 = ["{hashlib.sha256(KEY.encode()).hexdigest()}"]
[quota]
max_concurrency = 10000
rate_per_s = 1000000.0
burst = 1000000
max_queued = 1000000
[jobs]
allowed_types = ["echo"]
"""


@dataclass
class Window:
    """What one measured window saw."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    with_result: int = 0
    sent: int = 0
    wall_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """One keep-alive HTTP/1.1 connection; a minimal client keeps the load generator cheap."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        self.writer.write(request.encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def cpu_s(processes: list[psutil.Process]) -> float:
    """User plus system CPU seconds of these processes so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


# From --gateway-env: settings to try on the gateway under test.
GATEWAY_ENV: dict[str, str] = {}


def gateway_env(settings: Settings) -> dict[str, str]:
    """The environment of `settings` for the gateway under test (its port is set later)."""
    return child_env(
        settings,
        {
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_HTTP__ENABLED": "true",
            "GATEWAY_VAULT__ENABLED": "false",
        },
    )


async def start_gateway(settings: Settings, log_path: Path) -> tuple[Process, int]:
    """`gateway run` as a subprocess; returns it and its HTTP port once it is ready."""
    env = gateway_env(settings)
    port = free_port()
    env["GATEWAY_HTTP__PORT"] = str(port)
    env.update(GATEWAY_ENV)
    profile = os.environ.get("BENCH_PROFILE")  # a cProfile output path, to find hot spots
    argv = ["-m", "cProfile", "-o", profile] if profile else []
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            "-m",
            "gateway",
            "run",
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 60
    probe = Connection(port)
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            status, _ = await probe.get("/readyz")
            if status == 200:
                probe.close()
                return proc, port
        except OSError:
            probe.close()
        await asyncio.sleep(0.1)
    raise RuntimeError("gateway not ready")


def _produce(
    bootstrap: str,
    topic: str,
    prefix: str,
    warm: int,
    rate: float,
    duration_s: float,
    acked: Any,
    go: Any,
) -> None:
    """Child process: `warm` jobs at once, then, after `go`, `rate` jobs/s for `duration_s`.

    Job n has id `prefix` + n; `acked` counts the jobs the broker has acknowledged, so
    the parent knows which ids exist without sharing the producer's CPU.
    """

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        sent = 0

        async def send(count: int) -> None:
            nonlocal sent
            futures = []
            for n in range(sent, sent + count):
                job_id = f"{prefix}{n:08d}"
                body = json.dumps({"id": job_id, "type": "echo", "payload": {"n": n}}).encode()
                futures.append(
                    await producer.send(
                        topic, body, key=job_id.encode(), headers=[("tenant", b"bench")]
                    )
                )
            sent += count
            await asyncio.gather(*futures)
            acked.value = sent

        try:
            await send(warm)
            while not go.is_set():
                await asyncio.sleep(0.01)
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < duration_s:
                due = warm + int(elapsed * rate) - sent
                if due > 0:
                    await send(due)
                await asyncio.sleep(0.01)
        finally:
            await producer.stop()

    asyncio.run(run())


class Jobs:
    """The parent's view of the producer process: which job ids exist, and since when."""

    def __init__(self, prefix: str, acked: Any) -> None:
        self.prefix = prefix
        self.acked = acked
        self.times: list[float] = []  # sampled every 10 ms at most: small and sorted
        self.counts: list[int] = []

    def known_id(self, min_age_s: float) -> str:
        """A random id acknowledged at least `min_age_s` ago (its result should be there)."""
        now = time.monotonic()
        if not self.times or now - self.times[-1] > 0.01:
            self.times.append(now)
            self.counts.append(self.acked.value)
        at = bisect.bisect_right(self.times, now - min_age_s) - 1
        count = self.counts[max(at, 0)]
        return f"{self.prefix}{random.randrange(max(1, count)):08d}"


async def get_load(port: int, jobs: Jobs, rate: float, duration_s: float, conns: int) -> Window:
    """Open-loop GETs: request i is due at start + i/rate, whichever connection is free."""
    window = Window()
    queue: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue(maxsize=100_000)

    async def worker() -> None:
        connection = Connection(port)
        try:
            while (item := await queue.get()) is not None:
                due, job_id = item
                try:
                    status, body = await asyncio.wait_for(
                        connection.get(f"/v1/jobs/{job_id}"), timeout=5
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    connection.close()
                    key = type(exc).__name__
                else:
                    key = str(status)
                    if status == 200 and b'"result":{' in body:
                        window.with_result += 1
                window.latencies_ms.append((time.monotonic() - due) * 1000)
                window.statuses[key] = window.statuses.get(key, 0) + 1
        finally:
            connection.close()

    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    start = time.monotonic()
    total = int(rate * duration_s)
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, jobs.known_id(2.0)))
        window.sent += 1
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    window.wall_s = time.monotonic() - start
    return window


async def count_results(settings: Settings, since_ms: int, until_ms: int) -> tuple[int, int]:
    """(results finished in [since, until], all results) from `jobs.results` timestamps."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(settings.topics.results) or set()
        consumer.assign([TopicPartition(settings.topics.results, p) for p in parts])
        inside = total = 0
        quiet = 0
        while quiet < 3:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            records = [r for rs in batches.values() for r in rs]
            quiet = 0 if records else quiet + 1
            total += len(records)
            inside += sum(1 for r in records if since_ms <= r.timestamp <= until_ms)
        return inside, total
    finally:
        await consumer.stop()


def describe(name: str, window: Window) -> str:
    rate = window.sent / window.wall_s if window.wall_s else 0.0
    return (
        f"{name:<28} {window.sent:>7} {rate:>7.0f} {window.pct(0.5):>7.2f} {window.pct(0.9):>7.2f} "
        f"{window.pct(0.99):>7.2f} {max(window.latencies_ms, default=0):>8.1f} {window.errors:>6}"
    )


async def main(
    duration_s: float, baseline_s: float, rate: float, jobs_rate: float, conns: int
) -> None:
    tenants = Path(tempfile.mkdtemp(prefix="bench-api-tenants-"))
    (tenants / "bench.toml").write_text(TENANT)
    logs = Path(tempfile.mkdtemp(prefix="bench-api-"))
    with broker() as tansu:
        settings = await bench_settings(tansu.bootstrap, tenants)
        proc, port = await start_gateway(settings, logs / "gateway.log")
        # The gateway process and its API process (gateway.apiprocess).
        gateway_ps = psutil.Process(proc.pid)
        family = [gateway_ps, *gateway_ps.children(recursive=True)]
        context = multiprocessing.get_context("spawn")
        acked, go = context.Value("q", 0), context.Event()
        prefix, warm = f"j{uuid.uuid4().hex[:6]}-", 1000
        producer = context.Process(
            target=_produce,
            args=(
                tansu.bootstrap,
                settings.topics.jobs,
                prefix,
                warm,
                jobs_rate,
                duration_s,
                acked,
                go,
            ),
        )
        producer.start()
        jobs = Jobs(prefix, acked)
        try:
            while acked.value < warm:  # ids to ask for from the first request on
                await asyncio.sleep(0.05)
            await asyncio.sleep(3.0)
            idle_cpu = cpu_s(family)
            baseline = await get_load(port, jobs, rate, baseline_s, conns)
            idle_cpu = (cpu_s(family) - idle_cpu) / baseline.wall_s

            load_before = os.getloadavg()
            cpu_before = [cpu_s([p]) for p in family]
            waited_before = [runqueue_wait_s(p.pid) for p in family]
            own_before = time.process_time()
            start_ms = int(time.time() * 1000)
            go.set()
            loaded = await get_load(port, jobs, rate, duration_s, conns)
            end_ms = int(time.time() * 1000)
            own_cpu = time.process_time() - own_before
            cpu_after = [cpu_s([p]) for p in family]
            rss_mib = [p.memory_info().rss / 2**20 for p in family]
            waited = [
                runqueue_wait_s(p.pid) - w for p, w in zip(family, waited_before, strict=True)
            ]
            load_after = os.getloadavg()
            await asyncio.to_thread(producer.join, 30)
        finally:
            if producer.is_alive():
                producer.terminate()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 60)
        finished, total = await count_results(settings, start_ms, end_ms)

    used = [after - before for after, before in zip(cpu_after, cpu_before, strict=True)]
    window_s = (end_ms - start_ms) / 1000
    print(
        f"GET /v1/jobs/{{id}} at {rate:g}/s over {conns} keep-alive connections; ms from the scheduled send"
    )
    print(
        f"{'window':<28} {'GETs':>7} {'GET/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8} {'errors':>6}"
    )
    print(describe(f"baseline, no jobs ({baseline_s:g} s)", baseline))
    print(describe(f"with {jobs_rate:g} echo jobs/s ({duration_s:g} s)", loaded))
    print(
        f"answers: baseline {baseline.statuses}, loaded {loaded.statuses}; with result: {loaded.with_result}"
    )
    print(
        f"jobs: {acked.value} sent, {total} results; {finished / window_s:.0f} jobs/s finished in the loaded window"
    )
    names = ["gateway", "API process", "other child"][: len(family)]
    print(
        f"gateway CPU (all its processes) in the baseline window: {idle_cpu * 100:.0f}% of one core"
    )
    print(
        "threads runnable but waiting for a CPU in the loaded window: "
        + ", ".join(f"{n} {w:.1f} s" for n, w in zip(names, waited, strict=False))
        + f" of {window_s:.0f} s"
    )
    print(
        "CPU in the loaded window: "
        + ", ".join(f"{n} {u / window_s * 100:.0f}%" for n, u in zip(names, used, strict=False))
        + f", HTTP client {own_cpu / window_s * 100:.0f}% of one core; gateway exit code {code}"
    )
    print(
        "resident memory after the loaded window: "
        + ", ".join(f"{n} {m:.0f} MiB" for n, m in zip(names, rss_mib, strict=False))
    )
    print(
        f"load average (1 min) before/after the loaded window: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"on {os.cpu_count()} cores"
    )
    print(
        f"p99 loaded / baseline: {loaded.pct(0.99) / baseline.pct(0.99):.2f}  (target: p99 < 20 ms, no errors)"
    )
    print(f"gateway log: {logs / 'gateway.log'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=30.0, help="seconds under job load")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds without job load")
    parser.add_argument("--rate", type=float, default=500.0, help="GET requests per second")
    parser.add_argument("--jobs-rate", type=float, default=500.0, help="echo jobs per second")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra GATEWAY_* setting for the gateway under test (repeatable)",
    )
    args = parser.parse_args()
    GATEWAY_ENV.update(item.split("=", 1) for item in args.gateway_env)
    asyncio.run(main(args.duration, args.baseline, args.rate, args.jobs_rate, args.connections))
