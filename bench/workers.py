"""Issue 17 benchmark: `gateway run --workers 2` against `--workers 1` on one Tansu.

Each round runs `echo` and `sleep` (50 ms) backlogs through `gateway run --workers 1`
(the baseline) and `--workers 2`, alternating which goes first, each on fresh topics
and a fresh group. A run waits until the machine answers `/readyz` (every worker has
joined the group), then produces the backlog as fast as one producer goes and
measures the completion rate from the end of production until 90% of the backlog is
done (so neither the ramp-up nor a worker idling on a drained partition at the end
counts): jobs finished in that window over its length, from the results' `finished_at`.
Also reported: the CPU seconds the gateway's processes (workers and API process) and
the broker used per 1,000 jobs (from before production to the last result), and the
load average, since the broker, this script and the workers share the machine's cores.
The gateway logs at WARNING, as in the other throughput benchmarks (no line per job).

Run: .venv/bin/python -m bench.workers [--rounds 3] [--echo-jobs N] [--sleep-jobs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    ChildProcess,
    ResultWatcher,
    bench_settings,
    broker,
    catalog_dir,
    gateway_env,
    machine_note,
    produce_jobs,
)
from gateway.dev.services import free_port
from gateway.settings import Settings

WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "echo": ("echo", {"n": 1}),
    "sleep": ("sleep", {"seconds": 0.05}),
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One measured run."""

    workload: str
    workers: int
    jobs_per_s: float
    cpu_gateway_s: float  # per 1,000 jobs in the window
    cpu_broker_s: float
    window_jobs: int


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (the workers and the API process)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids.extend(process_tree(int(child)))
    return pids


async def wait_ready(process: ChildProcess, ops_port: int, timeout_s: float = 120.0) -> None:
    """Until the machine's operators' listener answers /readyz 200."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if not process.alive():
                raise RuntimeError(f"the gateway exited; see {process.log_path}")
            try:
                if (await client.get(f"http://127.0.0.1:{ops_port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"not ready within {timeout_s:g}s; see {process.log_path}")


async def one_run(
    tansu_pid: int | None,
    bootstrap: str,
    tenants: Path,
    logs: Path,
    workload: str,
    workers: int,
    jobs: int,
) -> Run:
    """`gateway run --workers N` working off `jobs` jobs of one workload."""
    ops_port = free_port()
    settings: Settings = await bench_settings(
        bootstrap, tenants, http={"enabled": False}, ops={"port": ops_port}
    )
    job_type, payload = WORKLOADS[workload]
    watcher = ResultWatcher(bootstrap, settings.topics.results)
    await watcher.start()
    process = ChildProcess(
        [sys.executable, "-m", "gateway", "run", "--workers", str(workers)],
        # As the other throughput benchmarks: no line per job in the log.
        gateway_env(settings, GATEWAY_LOG_LEVEL="WARNING"),
        logs / f"{workload}-{workers}-{time.monotonic_ns()}.log",
    )
    process.start()
    try:
        await wait_ready(process, ops_port)
        await asyncio.sleep(1.0)  # the group settled; nothing in flight yet
        assert process.proc is not None
        pids = process_tree(process.proc.pid)
        cpu_before = sum(map(cpu_seconds, pids)), cpu_seconds(tansu_pid)
        ids = set(await produce_jobs(settings, jobs, "bench", job_type, payload))
        produced_at = time.time()
        if not await watcher.wait(ids, timeout_s=600, processes=(process,)):
            raise RuntimeError(f"not every job finished; see {process.log_path}")
        cpu_after = sum(map(cpu_seconds, pids)), cpu_seconds(tansu_pid)
    finally:
        process.stop()
        await watcher.stop()
    finished = sorted(s.finished for s in watcher.seen if s.id in ids and s.finished)
    mark = finished[math.ceil(0.9 * len(finished)) - 1]
    window = [f for f in finished if produced_at <= f <= mark]
    rate = len(window) / (mark - produced_at) if mark > produced_at else float("nan")
    per_thousand = 1000 / len(ids)  # the CPU was measured over all of them
    return Run(
        workload,
        workers,
        rate,
        (cpu_after[0] - cpu_before[0]) * per_thousand,
        (cpu_after[1] - cpu_before[1]) * per_thousand,
        len(window),
    )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(runs: list[Run], rounds: int) -> None:
    print(
        f"\n| workload | --workers | jobs/s: median (range) over {rounds} rounds |"
        " gateway CPU s / 1,000 jobs | broker CPU s / 1,000 jobs |"
    )
    print("|---|---|---|---|---|")
    for workload in WORKLOADS:
        for workers in (1, 2):
            mine = [r for r in runs if r.workload == workload and r.workers == workers]
            if not mine:
                continue
            cpu = statistics.median(r.cpu_gateway_s for r in mine)
            broker_cpu = statistics.median(r.cpu_broker_s for r in mine)
            print(
                f"| {workload} | {workers} | {_spread([r.jobs_per_s for r in mine])} |"
                f" {cpu:.2f} | {broker_cpu:.2f} |"
            )
    print()
    for workload in WORKLOADS:
        one = [r.jobs_per_s for r in runs if r.workload == workload and r.workers == 1]
        two = [r.jobs_per_s for r in runs if r.workload == workload and r.workers == 2]
        if one and two:
            paired = [b / a for a, b in zip(one, two, strict=True)]
            print(
                f"ratio {workload} --workers 2 / --workers 1: median of the rounds' ratios"
                f" {statistics.median(paired):.2f} (range {min(paired):.2f}-{max(paired):.2f})"
            )


async def main(rounds: int, echo_jobs: int, sleep_jobs: int) -> None:
    print(f"before: {machine_note()}")
    tenants = catalog_dir({"bench": {}})
    logs = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    sizes = {"echo": echo_jobs, "sleep": sleep_jobs}
    runs: list[Run] = []
    with broker() as tansu:
        for round_ in range(rounds):
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            for workload in WORKLOADS:
                for workers in order:
                    run = await one_run(
                        tansu.pid,
                        tansu.bootstrap,
                        tenants,
                        logs,
                        workload,
                        workers,
                        sizes[workload],
                    )
                    runs.append(run)
                    print(
                        f"round {round_ + 1} {workload:<5} --workers {workers}:"
                        f" {run.jobs_per_s:,.0f} jobs/s ({run.window_jobs} jobs in the window),"
                        f" gateway {run.cpu_gateway_s:.2f} / broker {run.cpu_broker_s:.2f}"
                        f" CPU s per 1,000; {machine_note()}",
                        flush=True,
                    )
    report(runs, rounds)
    print(f"after: {machine_note()}")
    shutil.rmtree(logs, ignore_errors=True)
    shutil.rmtree(tenants, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echo-jobs", type=int, default=15_000)
    parser.add_argument("--sleep-jobs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1 round, 3,000 jobs each")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.echo_jobs, args.sleep_jobs = 1, 3000, 3000
    asyncio.run(main(args.rounds, args.echo_jobs, args.sleep_jobs))
