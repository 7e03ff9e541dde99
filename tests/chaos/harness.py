"""The chaos cluster: Tansu (and OpenBao) behind fault proxies, and `gateway run` replicas.

`ChaosCluster` starts a `ProxiedTansu` (every client, the load generator's and the
ledger's included, reaches the broker only through its proxy), optionally a
`ProxiedOpenBao` bootstrapped with the shipped catalog as the `openbao` fixture does,
and any number of `gateway run` subprocesses (`Replica`) with settings from
`make_settings` (fast group timings, JSON logs to one file per replica).

While it runs, a watcher samples every live replica with psutil (RSS of the job process
and of its API process, threads) and notices replicas that end: a replica is expected
to end only after `Replica.expect_exit()` (a kill or a stop the scenario asked for);
any other end is an unexpected exit, kept with its exit code and its last error lines,
and (as an orchestrator would) the replica is started again unless the scenario says
not to.

Every process is stopped by PID: replicas with SIGTERM then SIGKILL, the services by
the toolkit's own `stop()`. Replicas die with the thread that started them
(PR_SET_PDEATHSIG SIGKILL), so start the cluster from the test's main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from faults import ProxiedOpenBao, ProxiedTansu

from gateway.catalog import load_catalog
from gateway.dev.services import bootstrap_local
from gateway.service import ensure_topics
from gateway.settings import Settings

from .ledger import cancel_task
from conftest import ROOT, make_settings, quota_tenant, settings_env

__all__ = [
    "CHAOS_TENANTS",
    "ChaosCluster",
    "ExitRecord",
    "Replica",
    "RssSample",
    "write_tenants",
]

_PR_SET_PDEATHSIG = 1
_TYPES = ("echo", "sleep", "fail")
MIB = 1024 * 1024


# Tenants of the mixed workload: quotas generous enough that the machine, not the
# tenant, is the limit (unless a scenario writes its own).
CHAOS_TENANTS: dict[str, dict[str, float]] = {
    "alpha": {"conc": 64, "rate": 5000, "burst": 5000, "queued": 5000, "weight": 2},
    "bravo": {"conc": 64, "rate": 5000, "burst": 5000, "queued": 5000, "weight": 1},
    "charlie": {"conc": 64, "rate": 5000, "burst": 5000, "queued": 5000, "weight": 1},
}


def write_tenants(directory: Path, tenants: dict[str, dict[str, float]]) -> Path:
    """Write one catalog file per tenant into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for tenant, quota in tenants.items():
        counts = {key: int(quota[key]) for key in ("conc", "burst", "queued", "weight")}
        text = quota_tenant(tenant, rate=float(quota["rate"]), types=_TYPES, **counts)
        (directory / f"{tenant}.toml").write_text(text)
    return directory


def gateway_env_from(text: str) -> dict[str, str]:
    """`NAME=VALUE NAME=VALUE` (as in `$CHAOS_GATEWAY_ENV`) as a mapping."""
    pairs = (item.partition("=") for item in text.split())
    return {name: value for name, _, value in pairs if name}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ExitRecord:
    """A replica that ended without the scenario asking for it."""

    replica: str
    code: int | None
    at: float  # time.time()
    last_errors: list[str]


@dataclass
class RssSample:
    at: float  # time.monotonic()
    replica: str
    job_rss: int
    api_rss: int
    threads: int


class Replica:
    """One `python -m gateway run` subprocess with its own JSON log file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # time.time()
        self.expected_exit: str | None = None  # why the scenario ended it
        self.exit_seen = False  # the watcher handled its end
        self.frozen = False
        self._ops_port: int | None = None

    def __repr__(self) -> str:
        return f"Replica({self.name}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run"],
                env={**self.env, "GATEWAY_REPLICA": self.name},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                preexec_fn=_die_with_parent,  # only prctl, no locks taken
            )
        finally:
            log.close()
        self.started_at = time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def expect_exit(self, why: str) -> None:
        """The scenario ends this replica (or accepts that it ends) on purpose."""
        self.expected_exit = why

    def processes(self) -> list[psutil.Process]:
        """The job process and its children (the API process), while alive."""
        if not self.alive() or self.pid is None:
            return []
        try:
            main = psutil.Process(self.pid)
            return [main, *main.children(recursive=True)]
        except psutil.Error:
            return []

    def signal(self, sig: int, *, children: bool = False) -> None:
        """Send `sig` to the job process (and to its children when asked)."""
        targets = self.processes() if children else []
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        for child in targets[1:]:
            with contextlib.suppress(psutil.Error):
                child.send_signal(sig)

    def kill(self, why: str = "killed by the scenario") -> None:
        """SIGKILL (expected): the job process; its API process follows it (PDEATHSIG)."""
        self.expect_exit(why)
        if self.alive():
            self.signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP the job process and its API process (as a paused container)."""
        self.signal(signal.SIGSTOP, children=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            self.signal(signal.SIGCONT, children=True)
            self.frozen = False

    async def stop(
        self, timeout_s: float = 40.0, why: str = "stopped by the scenario"
    ) -> int | None:
        """SIGTERM and wait (bounded); SIGKILL past the bound. Returns the exit code."""
        self.expect_exit(why)
        if self.proc is None:
            return None
        self.thaw()
        if self.alive():
            self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110  # a child process: nothing to await
            await asyncio.sleep(0.1)
        if self.alive():
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            return None
        return self.proc.returncode

    def kill_now(self) -> None:
        """Teardown: SIGKILL whatever is left, by PID (children too), no questions."""
        for process in reversed(self.processes()):
            with contextlib.suppress(psutil.Error):
                process.resume()
                process.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    # -- its log ---------------------------------------------------------------

    def log_lines(self, *events: str, loggers: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """Parsed JSON lines of the log, only those with one of `events` (or a logger
        starting with one of `loggers`) when given; cheap filtering before parsing."""
        if not self.log_path.exists():
            return
        wanted = [f'"event": "{e}"' for e in events] + [f'"logger": "{lg}' for lg in loggers]
        with self.log_path.open(errors="replace") as handle:
            for line in handle:
                if wanted and not any(w in line for w in wanted):
                    continue
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = {"raw": line.rstrip()}
                if isinstance(parsed, dict):
                    yield parsed

    def errors(self, limit: int = 8) -> list[str]:
        """The last error (and unparsable) lines of the log, shortened."""
        if not self.log_path.exists():
            return []
        with self.log_path.open(errors="replace") as handle:
            found = [
                line.strip()[:300]
                for line in handle
                if '"level": "error"' in line or not line.startswith("{")
            ]
        return found[-limit:]

    def ops_port(self) -> int | None:
        """The operators' listener port, from the first `ops_started` line (the API
        process keeps the port the job process bound, even when it is restarted)."""
        if self._ops_port is None and self.env.get("GATEWAY_OPS__ENABLED") == "true":
            for line in self.log_lines("ops_started"):
                if line.get("port"):
                    self._ops_port = int(line["port"])
                    break
        return self._ops_port


@dataclass
class ChaosCluster:
    """Tansu (+ OpenBao) behind proxies and a set of `gateway run` replicas."""

    workdir: Path
    vault: bool = False
    tenants: dict[str, dict[str, float]] | None = None  # None: the shipped catalog
    restart_on_exit: bool = True
    ops: bool = False  # replicas serve their operators' listener (metrics, /readyz)
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    # Extra environment for every replica: `$CHAOS_GATEWAY_ENV` ("NAME=VALUE ..."), to try
    # a setting across the whole suite.
    env_overrides: dict[str, str] = field(
        default_factory=lambda: gateway_env_from(os.environ.get("CHAOS_GATEWAY_ENV", ""))
    )
    sample_interval_s: float = 1.0

    def __post_init__(self) -> None:
        self.tansu = ProxiedTansu(self.workdir / "tansu.log")
        self.bao: ProxiedOpenBao | None = None
        self.replicas: list[Replica] = []  # every replica ever started, in order
        self.exits: list[ExitRecord] = []
        self.samples: list[RssSample] = []
        self._watcher: asyncio.Task[None] | None = None
        self._count = 0
        self.settings: Settings | None = None
        self.events: list[tuple[float, str]] = []  # (time.time(), what the scenario did)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> Settings:
        """Start the services, create the topics; returns the replicas' settings."""
        self.tansu.start()
        tenants_dir = ROOT / "tenants"
        if self.tenants is not None:
            tenants_dir = write_tenants(self.workdir / "tenants", self.tenants)
        overrides = {"tenants_dir": tenants_dir, **self.settings_overrides}
        settings = make_settings(self.tansu.bootstrap, **overrides)
        if self.vault:
            self.bao = ProxiedOpenBao(self.workdir / "openbao.log")
            self.bao.start()
            catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
            vault = bootstrap_local(self.bao.addr, self.bao.root_token, catalog, settings).vault
            settings = settings.model_copy(update={"vault": vault})
        await ensure_topics(settings.kafka, settings.topics)
        self.settings = settings
        self._watcher = asyncio.create_task(self._watch(), name="chaos-watcher")
        return settings

    async def close(self) -> None:
        """Stop the watcher, every replica (SIGTERM, bounded) and the services."""
        watcher, self._watcher = self._watcher, None
        await cancel_task(watcher)
        try:
            await asyncio.gather(
                *(r.stop(timeout_s=20, why="teardown") for r in self.replicas if r.alive())
            )
        finally:
            for replica in self.replicas:
                replica.kill_now()
            if self.bao is not None:
                self.bao.stop()
            self.tansu.stop()

    def event(self, what: str) -> float:
        """Note what the scenario did, and when (time.time(), returned)."""
        now = time.time()
        self.events.append((now, what))
        return now

    # -- replicas ----------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        assert self.settings is not None, "start() the cluster first"
        return {**settings_env(self.settings), **self.env_overrides, **extra}

    def add_replica(self, *, ops: bool | None = None, **extra_env: str) -> Replica:
        """Start one more `gateway run` (with the operators' listener on a free port when
        `ops`, by default the cluster's `ops`)."""
        ops = self.ops if ops is None else ops
        self._count += 1
        name = f"gw{self._count}"
        if ops:
            extra_env = {"GATEWAY_OPS__ENABLED": "true", "GATEWAY_OPS__PORT": "0", **extra_env}
        replica = Replica(name, self.env(**extra_env), self.workdir / f"{name}.log")
        replica.start()
        self.replicas.append(replica)
        self.event(f"started {name}")
        return replica

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]

    async def wait_ready(self, replicas: list[Replica], timeout_s: float = 60.0) -> None:
        """Until each replica logged `gateway_started` (it consumes from then on)."""
        deadline = time.monotonic() + timeout_s
        for replica in replicas:
            while not any(True for _ in replica.log_lines("gateway_started")):
                if not replica.alive():
                    raise RuntimeError(f"{replica.name} exited: {replica.errors()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{replica.name} did not start within {timeout_s}s")
                await asyncio.sleep(0.2)

    # -- watching ----------------------------------------------------------------

    async def _watch(self) -> None:
        next_sample = 0.0
        while True:
            now = time.monotonic()
            for replica in list(self.replicas):
                if replica.proc is None or replica.exit_seen or replica.alive():
                    continue
                replica.exit_seen = True
                if replica.expected_exit is None:
                    self.exits.append(
                        ExitRecord(replica.name, replica.returncode, time.time(), replica.errors())
                    )
                    self.event(f"{replica.name} exited unexpectedly ({replica.returncode})")
                    if self.restart_on_exit:
                        self.add_replica(ops=replica.env.get("GATEWAY_OPS__ENABLED") == "true")
            if now >= next_sample:
                next_sample = now + self.sample_interval_s
                self._sample(now)
            await asyncio.sleep(0.25)

    def _sample(self, now: float) -> None:
        for replica in self.live():
            if replica.frozen:
                continue
            processes = replica.processes()
            if not processes:
                continue
            try:
                job_rss = processes[0].memory_info().rss
                threads = processes[0].num_threads()
                api_rss = sum(p.memory_info().rss for p in processes[1:])
            except psutil.Error:
                continue
            self.samples.append(RssSample(now, replica.name, job_rss, api_rss, threads))

    def peak_rss_mib(self) -> float:
        """The largest replica footprint seen (job process + API process), MiB."""
        return max((s.job_rss + s.api_rss for s in self.samples), default=0) / MIB

    def peak_job_rss_mib(self) -> float:
        return max((s.job_rss for s in self.samples), default=0) / MIB

    # -- the operators' listener -------------------------------------------------

    async def scrape(self, replica: Replica, path: str = "/metrics") -> tuple[int, str] | None:
        """GET a path of the replica's operators' listener; None when it does not answer."""
        port = replica.ops_port()
        if port is None:
            return None
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(f"http://127.0.0.1:{port}{path}")
        except httpx.HTTPError:
            return None
        return response.status_code, response.text


def metric_values(text: str, name: str) -> list[float]:
    """Every sample of metric `name` in a Prometheus text page."""
    values = []
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name) : len(name) + 1] in {" ", "{"}):
            with contextlib.suppress(ValueError):
                values.append(float(line.rsplit(" ", 1)[1]))
    return values
