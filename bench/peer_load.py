"""Workloads of the peer benchmark and the figures computed from what they observed.

A workload drives a `Target` (a system behind a Kafka topic, or the bare flow loop's
in-memory queue) and records, per job, its tenant, when it was sent and when its
result was published. Figures (throughput, latency percentiles, CPU per 1,000 jobs)
are computed from those records the same way for every system.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "Figures",
    "Phase",
    "Sizes",
    "Target",
    "figures",
    "percentile",
    "run_workload",
]

WORKLOADS = ("echo", "sleep", "noisy")
SLEEP_S = 0.02  # the `sleep` workload and both tenants of the noisy mix
FLOOD, QUIET, BENCH = "flood", "quiet", "bench"


@dataclass(frozen=True)
class Sizes:
    """How many jobs each workload sends (full run or --quick)."""

    echo_jobs: int = 10_000
    sleep_jobs: int = 6_000
    # Backlog workloads run this many rounds over all systems; tables show the median
    # run and the range, so a load spike from elsewhere on the machine cannot decide.
    repeats: int = 3
    # The guide's 8-worker loop is 10-100x slower: a smaller backlog keeps its run short.
    guide_divisor: int = 5
    flood_jobs: int = 20_000
    quiet_rate: float = 10.0
    quiet_s: float = 30.0
    solo_s: float = 15.0
    # How long after the quiet tenant's last send the flood phase may still run.
    drain_cap_s: float = 30.0
    backlog_timeout_s: float = 240.0


FULL = Sizes()
QUICK = Sizes(
    repeats=1,
    echo_jobs=1_000,
    sleep_jobs=1_000,
    flood_jobs=1_500,
    quiet_s=3.0,
    solo_s=1.5,
    drain_cap_s=6.0,
    backlog_timeout_s=60.0,
)
SMOKE = Sizes(
    repeats=1,
    echo_jobs=200,
    sleep_jobs=200,
    guide_divisor=2,
    flood_jobs=200,
    quiet_s=1.0,
    solo_s=0.5,
    drain_cap_s=10.0,
    backlog_timeout_s=30.0,
)


class Target(Protocol):
    """Where a workload sends jobs and learns when their results were published."""

    async def send(self, body: dict[str, Any], *, paced: bool) -> None:
        """Send one job (`paced`: a steady sender's single job, flush at once)."""
        ...

    async def flush(self) -> None:
        """Wait until every job sent so far is handed over."""
        ...

    def done_at(self, job_id: str) -> float | None:
        """Epoch seconds at which the job's first result was published, if seen."""
        ...

    async def wait_done(self, ids: set[str], deadline: float) -> None:
        """Return once every id has a result or at `deadline` (epoch seconds)."""
        ...

    def cpu_s(self) -> float:
        """CPU seconds the system has used so far (user + system)."""
        ...

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS window."""
        ...

    def peak_rss_mb(self) -> float:
        """Peak resident set size since the last reset, in MiB."""
        ...


@dataclass
class Phase:
    """What one measured phase of a workload observed."""

    name: str  # backlog, solo (quiet tenant alone) or flood
    started: float  # epoch s, just before the first send
    ended: float  # epoch s, when the wait for results returned
    cpu_s: float  # system CPU over [started, ended]
    peak_rss_mb: float
    sent: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (tenant, at)
    done: dict[str, float] = field(default_factory=dict)  # id -> result published at
    duplicates: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Phase:
        raw = dict(raw)
        raw["sent"] = {k: (v[0], v[1]) for k, v in raw["sent"].items()}
        return cls(**raw)


def _job(tenant: str, job_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    job_id = f"{tenant}-{uuid.uuid4().hex[:12]}"
    return {"id": job_id, "tenant": tenant, "type": job_type, "payload": payload}


async def burst(
    target: Target, tenant: str, count: int, job_type: str, payload: dict[str, Any]
) -> dict[str, tuple[str, float]]:
    """Send `count` jobs as fast as the target takes them."""
    sent: dict[str, tuple[str, float]] = {}
    for n in range(count):
        body = _job(tenant, job_type, payload)
        sent[body["id"]] = (tenant, time.time())
        await target.send(body, paced=False)
        if n % 500 == 499:
            await asyncio.sleep(0)  # let a concurrent steady sender keep its schedule
    await target.flush()
    return sent


async def steady(
    target: Target,
    tenant: str,
    rate: float,
    seconds: float,
    job_type: str,
    payload: dict[str, Any],
) -> dict[str, tuple[str, float]]:
    """Send jobs at `rate` per second for `seconds`, on an absolute schedule."""
    sent: dict[str, tuple[str, float]] = {}
    begin = time.time()
    for n in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, begin + n / rate - time.time()))
        body = _job(tenant, job_type, payload)
        sent[body["id"]] = (tenant, time.time())
        await target.send(body, paced=True)
    return sent


async def warm_up(target: Target, tenants: list[str], timeout_s: float = 90.0) -> None:
    """One job per tenant through the system: the group is joined and the code is warm."""
    ids = set()
    for tenant in tenants:
        body = _job(tenant, "echo", {"warm": True})
        ids.add(body["id"])
        await target.send(body, paced=True)
    await target.flush()
    await target.wait_done(ids, time.time() + timeout_s)
    missing = [i for i in ids if target.done_at(i) is None]
    if missing:
        raise RuntimeError(f"warm-up jobs got no result within {timeout_s:.0f} s")


def _collect(
    target: Target, name: str, started: float, cpu0: float, sent: dict[str, tuple[str, float]]
) -> Phase:
    ended = time.time()
    done = {i: at for i in sent if (at := target.done_at(i)) is not None}
    return Phase(
        name=name,
        started=started,
        ended=ended,
        cpu_s=target.cpu_s() - cpu0,
        peak_rss_mb=target.peak_rss_mb(),
        sent=sent,
        done=done,
    )


async def backlog(target: Target, workload: str, count: int, timeout_s: float) -> Phase:
    """`count` jobs of one tenant sent at once; wait for all their results."""
    payload: dict[str, Any] = {"seconds": SLEEP_S} if workload == "sleep" else {"n": 1}
    job_type = "sleep" if workload == "sleep" else "echo"
    target.reset_peak_rss()
    cpu0, started = target.cpu_s(), time.time()
    sent = await burst(target, BENCH, count, job_type, payload)
    await target.wait_done(set(sent), started + timeout_s)
    return _collect(target, "backlog", started, cpu0, sent)


async def noisy(target: Target, sizes: Sizes) -> list[Phase]:
    """The quiet tenant alone, then the same while the flood tenant bursts."""
    payload = {"seconds": SLEEP_S}
    target.reset_peak_rss()
    cpu0, started = target.cpu_s(), time.time()
    sent = await steady(target, QUIET, sizes.quiet_rate, sizes.solo_s, "sleep", payload)
    await target.wait_done(set(sent), time.time() + 10.0)
    solo = _collect(target, "solo", started, cpu0, sent)

    target.reset_peak_rss()
    cpu0, started = target.cpu_s(), time.time()
    flood_sent, quiet_sent = await asyncio.gather(
        burst(target, FLOOD, sizes.flood_jobs, "sleep", payload),
        steady(target, QUIET, sizes.quiet_rate, sizes.quiet_s, "sleep", payload),
    )
    sent = {**flood_sent, **quiet_sent}
    await target.wait_done(set(sent), time.time() + sizes.drain_cap_s)
    return [solo, _collect(target, "flood", started, cpu0, sent)]


async def run_workload(target: Target, workload: str, sizes: Sizes, *, slow: bool) -> list[Phase]:
    """Warm the system up, then run one workload; `slow` shrinks backlogs (guide loop)."""
    await warm_up(target, [FLOOD, QUIET] if workload == "noisy" else [BENCH])
    if workload == "noisy":
        return await noisy(target, sizes)
    count = sizes.echo_jobs if workload == "echo" else sizes.sleep_jobs
    if slow:
        count = max(100, count // sizes.guide_divisor)
    return [await backlog(target, workload, count, sizes.backlog_timeout_s)]


# -- figures -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; inf stands for a job without a result (censored)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Figures:
    """What a phase measured, for one tenant or all of them."""

    sent: int
    done: int
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_s_per_1000: float
    peak_rss_mb: float


def figures(phase: Phase, tenant: str | None = None) -> Figures:
    """Throughput from the first send to the last result; latency from send to result.

    Jobs without a result count as infinitely late, so a percentile they reach is
    reported as not reached (inf) rather than flattered.
    """
    ids = [i for i, (t, _) in phase.sent.items() if tenant is None or t == tenant]
    latencies = [
        (phase.done[i] - phase.sent[i][1]) * 1000 if i in phase.done else math.inf for i in ids
    ]
    finished = [phase.done[i] for i in ids if i in phase.done]
    done = len(finished)
    first = min((phase.sent[i][1] for i in ids), default=phase.started)
    span = (max(finished) - first) if finished else 0.0
    all_done = len(phase.done)
    return Figures(
        sent=len(ids),
        done=done,
        jobs_per_s=done / span if span > 0 else math.nan,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=math.nan),
        cpu_s_per_1000=phase.cpu_s / all_done * 1000 if all_done else math.nan,
        peak_rss_mb=phase.peak_rss_mb,
    )
