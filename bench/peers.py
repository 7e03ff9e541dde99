"""Issue 8 benchmark: the gateway against its peers, same Tansu broker, same machine, same run.

Systems (each in its own process, so CPU seconds and peak RSS are its own):
raw pipe, bare PenguiFlow, the guide's 8-worker loop, FastStream, pyrallel-consumer
(Python 3.12 venv, when it installed) and the gateway (`python -m gateway run`).
Workloads: `echo` and `sleep` 20 ms backlogs sent at once, and the noisy-neighbour mix
(the quiet tenant alone at 10/s, then the same while the flood tenant bursts).
See bench/peer_systems.py and bench/peer_load.py for what each one does exactly.

Run: python -m bench.peers [--quick | --smoke] [--systems a,b] [--workloads a,b]
     (`make bench` / `make bench-quick` run it from the bench venv, .venv-bench)

Writes bench/results/peers.json, the PNG plots, and the tables between the peers
markers in BENCHMARKS.md (unless --no-markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import ROOT, bench_settings, broker, catalog_dir, commit
from bench.peer_load import (
    FLOOD,
    FULL,
    QUICK,
    QUIET,
    SMOKE,
    WORKLOADS,
    Phase,
    Sizes,
    figures,
    run_workload,
)
from bench.peer_systems import peak_rss_mb, reset_peak_rss
from gateway.settings import Settings, child_env

SYSTEMS = ("raw", "bare", "guide", "faststream", "pyrallel", "gateway")
CONCURRENCY = 256  # the gateway's GATEWAY_MAX_INFLIGHT; FastStream, pyrallel and bare match it
PYRALLEL_VENV = ROOT / ".venv-pyrallel"
RESULTS = ROOT / "bench" / "results"

# The noisy mix's tenants in the gateway's catalog, as in the pools benchmark (issue 4):
# the flood tenant may run 64 at once and start `--flood-rate` jobs/s with 2,000
# buffered; the quiet one 8 at once, 50/s, 200 buffered. Weight 1 each.
FLOOD_QUOTA = {"conc": 64, "rate": 600.0, "burst": 600, "queued": 2000, "weight": 1}
QUIET_QUOTA = {"conc": 8, "rate": 50.0, "burst": 50, "queued": 200, "weight": 1}


# -- measuring a system process from outside -----------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SystemProcess:
    """One system under test as a child process, with its log in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # our own interpreter and module
                argv,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # only prctl, no locks taken
            )
        self.ps = psutil.Process(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU of the process and its live children."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            times = self.ps.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in self.ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
        return total

    def processes(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            return [self.proc.pid, *(c.pid for c in self.ps.children(recursive=True))]
        return [self.proc.pid]

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code (None if killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
        return self.proc.returncode

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


class KafkaTarget:
    """Sends jobs to a system's `jobs` topic and watches its `results` topic."""

    def __init__(self, settings: Settings, process: SystemProcess) -> None:
        self._settings = settings
        self._process = process
        bootstrap = settings.kafka.bootstrap_servers
        self._burst = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self._paced = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        self._watcher = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        self._done: dict[str, float] = {}
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._burst.start()
        await self._paced.start()
        await self._watcher.start()
        topic = self._settings.topics.results
        await self._watcher.topics()
        parts = self._watcher.partitions_for_topic(topic) or set()
        if not parts:
            raise RuntimeError(f"results topic {topic} has no partitions")
        self._watcher.assign([TopicPartition(topic, p) for p in parts])
        await self._watcher.seek_to_beginning()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            batches = await self._watcher.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    job_id = record.key.decode() if record.key else ""
                    if job_id in self._done:
                        self.duplicates += 1
                    else:
                        # The result record's CreateTime: when the system published it.
                        self._done[job_id] = record.timestamp / 1000

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._burst.stop()
        await self._paced.stop()
        await self._watcher.stop()

    async def send(self, body: dict[str, Any], *, paced: bool) -> None:
        producer = self._paced if paced else self._burst
        await producer.send(
            self._settings.topics.jobs,
            json.dumps(body).encode(),
            key=body["id"].encode(),
            headers=[("tenant", body["tenant"].encode())],
        )

    async def flush(self) -> None:
        await self._burst.flush()
        await self._paced.flush()

    def done_at(self, job_id: str) -> float | None:
        return self._done.get(job_id)

    async def wait_done(self, ids: set[str], deadline: float) -> None:
        pending = {i for i in ids if i not in self._done}
        while pending and time.time() < deadline:
            if not self._process.alive():
                raise RuntimeError(f"the system exited; log tail:\n{self._process.log_tail()}")
            await asyncio.sleep(0.05)
            pending = {i for i in pending if i not in self._done}

    def cpu_s(self) -> float:
        return self._process.cpu_s()

    def reset_peak_rss(self) -> None:
        for pid in self._process.processes():
            reset_peak_rss(pid)

    def peak_rss_mb(self) -> float:
        return sum(peak_rss_mb(pid) for pid in self._process.processes())


# -- launching each system -----------------------------------------------------------


GATEWAY_ENV_EXTRA: dict[str, str] = {}  # --gateway-env KEY=VALUE, for experiments


def _gateway_env(settings: Settings) -> dict[str, str]:
    quiet = {
        "GATEWAY_MAX_INFLIGHT": str(CONCURRENCY),
        "GATEWAY_CATALOG_POLL_S": "0",
        # Per-job INFO lines off, as for every other system here (none logs per job).
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_HTTP__ENABLED": "false",
        "GATEWAY_VAULT__ENABLED": "false",
    }
    return child_env(settings, {**quiet, **GATEWAY_ENV_EXTRA})


def _argv(system: str, settings: Settings) -> tuple[list[str], dict[str, str]]:
    kafka, topics = settings.kafka, settings.topics
    if system == "gateway":
        return [sys.executable, "-m", "gateway", "run"], _gateway_env(settings)
    common = ["--bootstrap", kafka.bootstrap_servers, "--jobs", topics.jobs]
    common += ["--results", topics.results, "--group", kafka.group_id]
    common += ["--workers", str(CONCURRENCY)]
    if system == "pyrallel":
        python = str(PYRALLEL_VENV / "bin" / "python")
        return [python, "-m", "bench.peer_pyrallel", *common], dict(os.environ)
    return [sys.executable, "-m", "bench.peer_systems", system, *common], dict(os.environ)


def unavailable(system: str) -> str | None:
    """Why a system cannot run here, or None."""
    if system == "faststream" and importlib.util.find_spec("faststream") is None:
        return "faststream is not installed in this venv (make bench installs it in .venv-bench)"
    if system == "pyrallel":
        failed = PYRALLEL_VENV.with_name(".venv-pyrallel.failed")
        if failed.exists():
            return "pyrallel-consumer did not install: " + failed.read_text().strip()[-300:]
        if not (PYRALLEL_VENV / ".installed").exists():
            return "no .venv-pyrallel (make bench creates it with Python 3.12)"
    return None


# -- one run: a system, a workload ---------------------------------------------------


@dataclass
class PhaseSummary:
    """Figures of one phase, overall and per tenant, and the quiet tenant's series."""

    name: str
    overall: dict[str, float]
    tenants: dict[str, dict[str, float]]
    duplicates: int
    quiet_series: list[tuple[float, float | None]] = field(default_factory=list)


@dataclass
class RunResult:
    system: str
    workload: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    phases: list[PhaseSummary] = field(default_factory=list)
    error: str | None = None
    note: str = ""
    took_s: float = 0.0
    round: int = 1

    def phase(self, name: str) -> PhaseSummary | None:
        return next((p for p in self.phases if p.name == name), None)


def summarise(phase: Phase, duplicates: int = 0) -> PhaseSummary:
    tenants = sorted({t for t, _ in phase.sent.values()})
    series: list[tuple[float, float | None]] = []
    for job_id, (tenant, at) in sorted(phase.sent.items(), key=lambda kv: kv[1][1]):
        if tenant == QUIET:
            done = phase.done.get(job_id)
            latency = (done - at) * 1000 if done is not None else None
            series.append((round(at - phase.started, 3), latency))
    return PhaseSummary(
        name=phase.name,
        overall=dataclasses.asdict(figures(phase)),
        tenants={t: dataclasses.asdict(figures(phase, t)) for t in tenants},
        duplicates=duplicates,
        quiet_series=series,
    )


async def run_kafka_system(
    system: str, workload: str, sizes: Sizes, bootstrap: str, workdir: Path, flood_rate: float
) -> list[PhaseSummary]:
    flood = {**FLOOD_QUOTA, "rate": flood_rate, "burst": max(1, round(flood_rate))}
    tenants = catalog_dir({"bench": {}, FLOOD: flood, QUIET: QUIET_QUOTA})
    try:
        settings = await bench_settings(bootstrap, tenants, max_inflight=CONCURRENCY)
        argv, env = _argv(system, settings)
        process = SystemProcess(argv, env, workdir / f"{system}-{workload}.log")
        target = KafkaTarget(settings, process)
        try:
            await target.start()
            phases = await run_workload(target, workload, sizes, slow=system == "guide")
        finally:
            await target.stop()
            code = process.stop()
        if code not in (0, None, -signal.SIGTERM):
            print(f"  note: {system} exited with {code}; log {process.log_path}")
        return [
            summarise(p, target.duplicates if i == len(phases) - 1 else 0)
            for i, p in enumerate(phases)
        ]
    finally:
        shutil.rmtree(tenants, ignore_errors=True)


async def run_bare(workload: str, sizes: Sizes, workdir: Path) -> tuple[list[PhaseSummary], str]:
    out = workdir / f"bare-{workload}.json"
    argv = [sys.executable, "-m", "bench.peer_systems", "bare", "--workload", workload]
    argv += ["--workers", str(CONCURRENCY), "--out", str(out)]
    argv += ["--sizes", json.dumps(dataclasses.asdict(sizes))]
    process = SystemProcess(argv, dict(os.environ), workdir / f"bare-{workload}.log")
    while process.alive():
        await asyncio.sleep(0.1)
    if process.proc.returncode != 0:
        raise RuntimeError(f"bare loop exited {process.proc.returncode}:\n{process.log_tail()}")
    raw = json.loads(out.read_text())
    phases = [summarise(Phase.from_json(p)) for p in raw["phases"]]
    return phases, f"{raw['workers']} at once"


async def run_one(
    system: str, workload: str, sizes: Sizes, bootstrap: str, workdir: Path, flood_rate: float
) -> RunResult:
    result = RunResult(system, workload, os.getloadavg())
    started = time.monotonic()
    try:
        if system == "bare":
            result.phases, result.note = await run_bare(workload, sizes, workdir)
        else:
            result.phases = await run_kafka_system(
                system, workload, sizes, bootstrap, workdir, flood_rate
            )
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
    result.load_after = os.getloadavg()
    took = result.took_s = round(time.monotonic() - started, 1)
    summary = result.error or _one_line(result)
    print(
        f"  {system:<10} {workload:<6} {took:6.1f} s  load {result.load_before[0]:.2f}  {summary}"
    )
    return result


def _one_line(result: RunResult) -> str:
    last = result.phases[-1]
    o = last.overall
    text = (
        f"{o['jobs_per_s']:.0f} jobs/s, p50 {o['p50_ms']:.0f} ms, p99 {o['p99_ms']:.0f} ms,"
        f" CPU {o['cpu_s_per_1000']:.2f} s/1000, RSS {o['peak_rss_mb']:.0f} MiB,"
        f" {o['done']:.0f}/{o['sent']:.0f} done"
    )
    solo = result.phase("solo")
    if solo is not None and QUIET in last.tenants:
        text += (
            f"; quiet p99 solo {solo.tenants[QUIET]['p99_ms']:.0f} ms,"
            f" flood {last.tenants[QUIET]['p99_ms']:.0f} ms"
        )
    return text


# -- main ----------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        yield path
    finally:
        if keep:
            print(f"system logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _sizes(args)
    systems = [s for s in args.systems if s in SYSTEMS]
    skipped = {s: why for s in systems if (why := unavailable(s)) is not None}
    started = datetime.now(UTC)
    print(f"peers benchmark: {len(systems)} systems x {len(args.workloads)} workloads, {sizes}")
    for system, why in skipped.items():
        print(f"  {system}: skipped, {why}")
    results: list[RunResult] = []
    with _workdir(args.keep_logs) as workdir, broker() as tansu:
        for workload in args.workloads:
            # Rounds over all systems, so a load spike hits one round, not one system.
            for round_ in range(1 if workload == "noisy" else sizes.repeats):
                for system in (s for s in systems if s not in skipped):
                    result = await run_one(
                        system, workload, sizes, tansu.bootstrap, workdir, args.flood_rate
                    )
                    result.round = round_ + 1
                    results.append(result)
    return {
        "started": started.isoformat(timespec="seconds"),
        "mode": args.mode,
        "sizes": dataclasses.asdict(sizes),
        "gateway_quotas": {"flood": {**FLOOD_QUOTA, "rate": args.flood_rate}, "quiet": QUIET_QUOTA},
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "commit": commit()},
        "skipped": skipped,
        "gateway_env_extra": dict(GATEWAY_ENV_EXTRA),
        "runs": [dataclasses.asdict(r) for r in results],
    }


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = {"full": FULL, "quick": QUICK, "smoke": SMOKE}[args.mode]
    overrides = {
        name: value
        for name in ("echo_jobs", "sleep_jobs", "flood_jobs", "quiet_s", "solo_s", "repeats")
        if (value := getattr(args, name)) is not None
    }
    return dataclasses.replace(sizes, **overrides)


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    parser.set_defaults(mode="full")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS))
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--echo-jobs", type=int)
    parser.add_argument("--sleep-jobs", type=int)
    parser.add_argument("--flood-jobs", type=int)
    parser.add_argument("--quiet-s", type=float)
    parser.add_argument("--solo-s", type=float)
    parser.add_argument("--repeats", type=int, help="rounds of the echo and sleep workloads")
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=FLOOD_QUOTA["rate"],
        help="the flood tenant's rate_per_s in the gateway's catalog (noisy mix)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra GATEWAY_* setting for the gateway process (repeatable)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--markdown",
        type=Path,
        help="file whose peers section to rewrite (full mode: BENCHMARKS.md)",
    )
    parser.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument(
        "--plots", action=argparse.BooleanOptionalAction, help="write the PNGs (default: full mode)"
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help="only report: tables and plots from a saved peers.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    GATEWAY_ENV_EXTRA.update(item.split("=", 1) for item in args.gateway_env)
    logging.basicConfig(level=logging.WARNING)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        args.mode = report["mode"]
    else:
        report = asyncio.run(run(args))
        args.results_dir.mkdir(parents=True, exist_ok=True)
        name = "peers.json" if args.mode == "full" else f"peers-{args.mode}.json"
        (args.results_dir / name).write_text(json.dumps(report, indent=1))
    from bench import peer_report  # matplotlib is imported only to report

    full = args.mode == "full"
    markdown = args.markdown or (ROOT / "BENCHMARKS.md" if full else None)
    peer_report.report(
        report,
        results_dir=args.results_dir,
        markdown=None if args.no_markdown else markdown,
        plots=full if args.plots is None else args.plots,
    )
    return 1 if any(r["error"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
