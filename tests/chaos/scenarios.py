"""The chaos scenarios, each a coroutine that runs a cluster through a fault and returns
its `ScenarioResult` (figures, ledger checks, what the operator sees).

Every scenario follows the same shape: start the cluster and its replicas, start the
result tail (and the committed-offset watch), produce load before and between faults,
inject the fault, heal, produce more, wait for every job's result, stop every replica
with SIGTERM, then read `jobs.results` and `jobs.dlq` from the start and check the
ledger (`finish`).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults import revoke_tenant_tokens

from gateway.settings import VaultSettings

from .harness import CHAOS_TENANTS, MIB, ChaosCluster, Replica, metric_values
from .ledger import Background, Ledger, OffsetWatch, ResultTail, build_ledger, read_all
from .load import LoadGenerator, Mix
from .report import ScenarioResult

__all__ = [
    "broker_cut",
    "frozen_replica",
    "kill_loop",
    "latency",
    "rebalance_quota",
    "soak",
    "vault_fault",
]

# Replicas run at most this many jobs at once (each); the in-flight bound on duplicates
# after a crash is stated in multiples of it.
MAX_INFLIGHT = 128
DEFAULT_MIX = Mix(tenants={"alpha": 2.0, "bravo": 1.0, "charlie": 1.0})
CHAOS_SETTINGS: dict[str, Any] = {"max_inflight": MAX_INFLIGHT}


# -- the common shape --------------------------------------------------------------


class OpsProbe(Background):
    """Polls every live replica's `/readyz` and `gateway_broker_up` / `gateway_vault_up`
    (when the replica serves its operators' listener) about once a second."""

    def __init__(self, cluster: ChaosCluster, interval_s: float = 1.0) -> None:
        super().__init__()
        self.cluster = cluster
        self.interval_s = interval_s
        # (time.time(), replica, readyz status or None, broker_up, vault_up, lag sum)
        self.samples: list[
            tuple[float, str, int | None, float | None, float | None, float | None]
        ] = []

    def start(self) -> None:
        self._launch(self._run(), "chaos-ops-probe")

    async def _run(self) -> None:
        while True:
            for replica in self.cluster.live():
                if replica.frozen or replica.ops_port() is None:
                    continue
                ready = await self.cluster.scrape(replica, "/readyz")
                metrics = await self.cluster.scrape(replica, "/metrics")
                broker_up = vault_up = lag = None
                if metrics is not None:
                    text = metrics[1]
                    broker = metric_values(text, "gateway_broker_up")
                    vault = metric_values(text, "gateway_vault_up")
                    lags = metric_values(text, "gateway_consumer_lag")
                    broker_up = broker[0] if broker else None
                    vault_up = vault[0] if vault else None
                    lag = sum(lags) if lags else 0.0
                status = ready[0] if ready is not None else None
                self.samples.append((time.time(), replica.name, status, broker_up, vault_up, lag))
            await asyncio.sleep(self.interval_s)

    def between(
        self, start: float, end: float
    ) -> list[tuple[float, str, int | None, float | None, float | None, float | None]]:
        return [s for s in self.samples if start <= s[0] <= end]


@dataclass
class Run:
    """One scenario's running parts."""

    name: str
    cluster: ChaosCluster
    load: LoadGenerator
    tail: ResultTail
    result: ScenarioResult
    watch: OffsetWatch | None = None
    probe: OpsProbe | None = None
    began: float = field(default_factory=time.monotonic)
    heal_at: float | None = None  # time.time() of the (last) heal

    async def stop_helpers(self) -> None:
        """Stop the probe, the offset watch, the tail and the load generator, each
        bounded (a client stuck in a broker fault must not hold the scenario)."""
        helpers = [
            self.probe.stop() if self.probe else None,
            self.watch.stop() if self.watch else None,
        ]
        for stop in [*helpers, self.tail.stop(), self.load.stop()]:
            if stop is None:
                continue
            try:
                await asyncio.wait_for(stop, 20)
            except TimeoutError:
                self.result.note("a harness client did not stop within 20 s")

    async def close(self) -> None:
        """Stop the helpers and the cluster, whatever happened (idempotent)."""
        await self.stop_helpers()
        await self.cluster.close()


async def begin(
    name: str,
    workdir: Path,
    *,
    replicas: int,
    mix: Mix = DEFAULT_MIX,
    ops: bool = True,
    vault: bool = False,
    tenants: dict[str, dict[str, float]] | None = None,
    settings: dict[str, Any] | None = None,
    watch_offsets: bool = True,
    restart_on_exit: bool = True,
    seed: int | None = None,
) -> Run:
    """Start the cluster (`replicas` replicas, ready), the tail, the watchers and the
    load generator."""
    cluster = ChaosCluster(
        workdir,
        vault=vault,
        tenants=tenants if tenants is not None or vault else CHAOS_TENANTS,
        restart_on_exit=restart_on_exit,
        ops=ops,
        settings_overrides={**CHAOS_SETTINGS, **(settings or {})},
    )
    result = ScenarioResult(name)
    settings_ = await cluster.start()
    load = LoadGenerator(
        settings_, mix, seed=seed if seed is not None else random.randrange(1 << 30)
    )
    tail = ResultTail(settings_)
    run = Run(name, cluster, load, tail, result)
    try:
        started = [cluster.add_replica() for _ in range(replicas)]
        await cluster.wait_ready(started)
        await load.start()
        await tail.start()
        if watch_offsets:
            run.watch = OffsetWatch(settings_)
            await run.watch.start()
        if ops:
            run.probe = OpsProbe(cluster)
            run.probe.start()
    except BaseException:
        await run.close()
        raise
    return run


async def finish(
    run: Run,
    *,
    drain_timeout_s: float,
    duplicate_bound: int,
    stall_s: float = 60.0,
    expect_status: dict[str, set[str]] | None = None,
    allowed_dlq: set[str] | None = None,
    allowed_exit_codes: dict[str, set[int | None]] | None = None,
) -> Ledger:
    """Wait for every job's result, stop the replicas, read the ledger and check it.

    `expect_status`: per job type, the terminal statuses allowed (default: succeeded).
    `allowed_exit_codes`: per replica name, exit codes on the final SIGTERM other than 0
    that the scenario accepts.
    """
    result, cluster = run.result, run.cluster
    produced = run.load.produced
    drained = await run.tail.wait_all(produced, drain_timeout_s, stall_s=stall_s)
    if not drained:
        result.note(
            f"not drained: {run.tail.missing(produced)} jobs without a result after "
            f"{drain_timeout_s:.0f}s, or {stall_s:.0f}s without any new result"
        )
        await stall_diagnostics(run)
    cluster.event("finish: drained" if drained else "finish: not drained")
    await run.stop_helpers()
    # Stop every live replica; a clean stop is exit code 0.
    live = cluster.live()
    codes = await asyncio.gather(*(r.stop(timeout_s=60, why="end of scenario") for r in live))
    for replica, code in zip(live, codes, strict=True):
        allowed = {0} | (allowed_exit_codes or {}).get(replica.name, set())
        result.check(code in allowed, f"{replica.name} exit code {code} on SIGTERM at the end")
    cluster.event("finish: replicas stopped")
    assert cluster.settings is not None
    topics = cluster.settings.topics
    records = await read_all(cluster.settings, topics.results)
    dlq = await read_all(cluster.settings, topics.dlq)
    ledger = build_ledger(produced, records, dlq)

    result.jobs = ledger.produced
    result.lost = len(ledger.lost)
    result.duplicates = ledger.duplicates
    result.duplicate_bound = duplicate_bound
    result.peak_rss_mib = round(cluster.peak_rss_mib(), 1)
    result.unexpected_exits = len(cluster.exits)
    result.wall_s = round(time.monotonic() - run.began, 1)
    if run.heal_at is not None:
        first = ledger.first_after(run.heal_at)
        result.recovery_first_s = round(first, 2) if first is not None else None
        last = ledger.last_after(run.heal_at)
        result.recovery_drained_s = round(last, 2) if last is not None else None
    result.details["ledger"] = ledger.summary()
    result.details["duplicates_detail"] = {
        job_id: [(info.ts_ms, info.status, info.attempts) for info in ledger.results[job_id]]
        for job_id in ledger.duplicate_ids[:10]
    }
    if cluster.env_overrides:
        result.note(f"replicas ran with {cluster.env_overrides}")
    result.details["failed_sends"] = run.load.failed_sends
    result.details["peak_job_rss_mib"] = round(cluster.peak_job_rss_mib(), 1)
    result.details["events"] = [(round(t, 3), what) for t, what in cluster.events]
    result.details["exits"] = [vars(e) for e in cluster.exits]
    if run.watch is not None:
        result.details["offset_samples"] = run.watch.samples
        result.details["offset_regressions"] = run.watch.regressions[:20]

    result.check(ledger.produced > 0, "no job was produced")
    result.check(not ledger.lost, f"{len(ledger.lost)} jobs lost, e.g. {ledger.lost[:5]}")
    result.check(
        ledger.duplicates <= duplicate_bound,
        f"{ledger.duplicates} duplicate results > bound {duplicate_bound} (e.g. {ledger.duplicate_ids[:5]})",
    )
    result.check(ledger.nonterminal == 0, f"{ledger.nonterminal} results without a terminal status")
    expect = {"echo": {"succeeded"}, "sleep": {"succeeded"}, "secret_digest": {"succeeded"}}
    expect.update(expect_status or {})
    wrong = {
        f"{kind}:{status}": count
        for (kind, status), count in ledger.statuses.items()
        if status not in expect.get(kind, {"succeeded"})
    }
    result.check(not wrong, f"unexpected statuses {wrong} (errors {dict(ledger.errors)})")
    unexpected_dlq = {r: n for r, n in ledger.dlq.items() if r not in (allowed_dlq or set())}
    result.check(not unexpected_dlq, f"unexpected DLQ records {unexpected_dlq}")
    result.check(
        not cluster.exits,
        "replicas exited unexpectedly: "
        + "; ".join(f"{e.replica} code {e.code}: {e.last_errors[-2:]}" for e in cluster.exits),
    )
    if ledger.unknown:
        result.note(f"{ledger.unknown} results for ids the generator saw fail to send")
    return ledger


async def stall_diagnostics(run: Run) -> None:
    """What each live replica holds when jobs are missing: its tenants' queued and
    running gauges and its consumer lag (from its operators' listener), as notes."""
    for replica in run.cluster.live():
        page = await run.cluster.scrape(replica, "/metrics")
        if page is None:
            run.result.note(f"{replica.name}: no /metrics to diagnose the stall")
            continue
        held = [
            line.replace("gateway_tenant_", "")
            for gauge in ("gateway_tenant_queued", "gateway_tenant_running")
            for line in page[1].splitlines()
            if line.startswith(gauge + "{") and not line.endswith(" 0.0")
        ]
        lag = sum(metric_values(page[1], "gateway_consumer_lag"))
        run.result.note(
            f"{replica.name} at the stall: {', '.join(held) or 'nothing held'}; lag {lag:.0f}"
        )


def count_events(replica: Replica, event: str, start: float, end: float) -> int:
    return sum(1 for line in replica.log_lines(event) if start <= float(line.get("ts", 0)) <= end)


def client_log_rate(replica: Replica, start: float, end: float) -> tuple[int, int]:
    """Client library log lines in [start, end] (aiokafka's own, and the API process's
    forwarded as `api_log`): the total, and the most in any one second."""
    per_second: Counter[int] = Counter()
    for line in replica.log_lines("api_log", loggers=("aiokafka", "kafka")):
        ts = float(line.get("ts", 0))
        if start <= ts <= end:
            per_second[int(ts)] += 1
    return sum(per_second.values()), max(per_second.values(), default=0)


def outage_operator_checks(
    run: Run,
    replicas: list[Replica],
    start: float,
    end: float,
    *,
    down: str,
    up: str,
    gauge: str | None,
    readyz: bool,
) -> None:
    """The product-side view of one outage from `start` to `end` (heal): exactly one
    `down` and one `up` line per replica that lived through it, the client library's
    log rate, the gauge at 0 during it and back to 1 after, `/readyz` 503 during it."""
    result = run.result
    for replica in replicas:
        downs = count_events(replica, down, start - 1, end + 30)
        ups = count_events(replica, up, start - 1, end + 60)
        result.operator(f"{down}_once", downs == 1, f"{replica.name} logged {down} {downs}x")
        result.operator(f"{up}_once", ups == 1, f"{replica.name} logged {up} {ups}x")
        total, peak = client_log_rate(replica, start, end)
        result.details.setdefault("client_log_lines", {})[replica.name] = {
            "total": total,
            "peak_per_s": peak,
        }
        result.operator(
            "client_logs_rate_limited",
            peak <= 5,
            f"{replica.name}: {total} aiokafka lines during the outage, up to {peak}/s",
        )
    probe = run.probe
    if probe is None:
        return
    during = probe.between(start + 2, end)
    after = probe.between(end + 20, end + 3600)
    if gauge is not None:
        index = 3 if gauge == "gateway_broker_up" else 4
        zero = [s for s in during if s[index] == 0]
        values = sorted({s[index] for s in during}, key=str)
        result.operator(f"{gauge}_0_during", bool(zero), f"values seen during the outage {values}")
        back = [s for s in after if s[index] == 1]
        result.operator(
            f"{gauge}_1_after",
            bool(back) or not after,
            f"not 1 after the heal: {sorted({s[index] for s in after}, key=str)}",
        )
    if readyz:
        statuses = Counter(s[2] for s in during)
        result.operator(
            "readyz_503_during",
            statuses.get(503, 0) > 0,
            f"/readyz answers during the outage {dict(statuses)}",
        )


# -- broker faults -------------------------------------------------------------------


async def broker_cut(
    workdir: Path,
    *,
    name: str,
    mode: str = "refuse",
    seconds: float = 20.0,
    replicas: int = 2,
    backlog: int = 12000,
    after: int = 3000,
    operator_checks: bool = True,
) -> ScenarioResult:
    """A backlog is being worked off when the broker's connections are cut for
    `seconds`: `refuse` resets every connection and refuses new ones, `blackhole`
    accepts and delivers nothing. Heal, produce `after` more, check the ledger."""
    run = await begin(name, workdir, replicas=replicas, ops=operator_checks)
    try:
        proxy = run.cluster.tansu.proxy
        await run.load.produce(backlog)
        await run.tail.wait_count(max(1, backlog // 10), 120)
        survivors = run.cluster.live()
        start = run.cluster.event(f"broker {mode} on")
        if mode == "blackhole":
            proxy.blackhole()
        else:
            proxy.reset()
            proxy.refuse()
        await asyncio.sleep(seconds)
        proxy.heal()
        run.heal_at = run.cluster.event("broker healed")
        await run.load.produce(after, rate=300)
        await finish(run, drain_timeout_s=180, duplicate_bound=replicas * MAX_INFLIGHT)
        survivors = [
            r
            for r in survivors
            if r.returncode in (0, None) and r.expected_exit == "end of scenario"
        ]
        if operator_checks:
            outage_operator_checks(
                run,
                survivors,
                start,
                run.heal_at,
                down="broker_unreachable",
                up="broker_recovered",
                gauge="gateway_broker_up",
                readyz=True,
            )
        return run.result
    finally:
        await run.close()


async def latency(
    workdir: Path, *, name: str, delay_s: float = 0.2, seconds: float = 30.0, rate: float = 300
) -> ScenarioResult:
    """`delay_s` added to every chunk both ways for `seconds` while jobs are produced at
    `rate`/s (5 s before, during, 5 s after)."""
    run = await begin(name, workdir, replicas=2)
    try:
        proxy = run.cluster.tansu.proxy
        producing = asyncio.create_task(run.load.produce(int(rate * (seconds + 10)), rate=rate))
        await asyncio.sleep(5)
        run.cluster.event(f"latency {delay_s}s on")
        proxy.latency(delay_s)
        await asyncio.sleep(seconds)
        proxy.heal()
        run.heal_at = run.cluster.event("latency off")
        await producing
        await finish(run, drain_timeout_s=180, duplicate_bound=0)
        return run.result
    finally:
        await run.close()


# -- Vault faults --------------------------------------------------------------------

VAULT_MIX = Mix(
    tenants={"acme": 2.0, "initech": 3.0},
    echo=0.25,
    sleep=0.25,
    secret=0.5,
    secret_tenants={"acme": 4.0, "initech": 5.0, "globex": 1.0},
)
# Short cache and no stale serving: every fault reaches the jobs (the defaults, 300 s
# and 600 s, would hide a minute's outage behind the cache).
VAULT_SETTINGS: dict[str, Any] = {"vault": VaultSettings(cache_ttl_s=1.0, max_stale_s=0.0)}


async def vault_fault(
    workdir: Path,
    *,
    name: str,
    fault: str,
    seconds: float,
    rate: float = 40,
) -> ScenarioResult:
    """Jobs needing secrets flow at `rate`/s (a quarter each echo and sleep) while Vault is
    `frozen` (SIGSTOP), answers `503`, or has a tenant's tokens `revoked` (twice, `seconds`
    apart). Every secret_digest job must succeed on its first attempt (an outage retries
    on the same attempt); a revoked token is minted again."""
    run = await begin(
        name,
        workdir,
        replicas=2,
        vault=True,
        mix=VAULT_MIX,
        ops=True,
        settings=VAULT_SETTINGS,
    )
    try:
        bao = run.cluster.bao
        assert bao is not None
        warm, cool = 10.0, 15.0
        producing = asyncio.create_task(
            run.load.produce(int(rate * (warm + seconds + cool)), rate=rate)
        )
        await asyncio.sleep(warm)
        survivors = run.cluster.live()
        start = run.cluster.event(f"vault {fault} on")
        revoked = 0
        if fault == "frozen":
            bao.freeze()
            await asyncio.sleep(seconds)
            bao.thaw()
        elif fault == "503":
            bao.proxy.http_error(503)
            await asyncio.sleep(seconds)
            bao.proxy.heal()
        elif fault == "revoked":
            admin = bao.client(direct=True)
            revoked += await asyncio.to_thread(revoke_tenant_tokens, admin, "acme")
            await asyncio.sleep(seconds)
            revoked += await asyncio.to_thread(revoke_tenant_tokens, admin, "acme")
            run.result.details["tokens_revoked"] = revoked
        else:
            raise ValueError(fault)
        run.heal_at = run.cluster.event(f"vault {fault} off")
        await producing
        ledger = await finish(run, drain_timeout_s=180, duplicate_bound=0)
        result = run.result
        secret_results = [
            info
            for job_id, found in ledger.results.items()
            if run.load.produced.get(job_id) is not None
            and run.load.produced[job_id].type == "secret_digest"
            for info in found
        ]
        attempts = Counter(info.attempts for info in secret_results)
        result.details["secret_digest_attempts"] = dict(attempts)
        result.check(
            set(attempts) <= {1},
            f"secret_digest jobs used up attempts during the outage: {dict(attempts)}",
        )
        retried = sum(
            1
            for replica in run.cluster.replicas
            for line in replica.log_lines("job_finished")
            if line.get("error") == "secrets_unavailable"
        )
        result.details["secrets_unavailable_retries"] = retried
        if fault == "revoked":
            result.check(revoked > 0, "no acme token was found to revoke")
            forbidden = sum(
                1
                for replica in run.cluster.replicas
                for line in replica.log_lines("vault_token_mint_refused")
            )
            result.details["mint_refused"] = forbidden
        else:
            result.check(
                retried > 0, "no job was retried with secrets_unavailable: the fault never bit"
            )
            outage_operator_checks(
                run,
                [r for r in survivors if r.expected_exit == "end of scenario"],
                start,
                run.heal_at,
                down="vault_unreachable",
                up="vault_recovered",
                gauge="gateway_vault_up",
                readyz=False,
            )
        return result
    finally:
        await run.close()


# -- crashes ---------------------------------------------------------------------------


async def kill_loop(
    workdir: Path,
    *,
    name: str,
    replicas: int,
    kills: int = 10,
    jobs: int = 30000,
    rate: float = 400,
    ops: bool = True,
) -> ScenarioResult:
    """`jobs` mixed jobs produced at `rate`/s; `kills` SIGKILLs at random moments over
    the run, each time on a random replica which is replaced at once."""
    run = await begin(name, workdir, replicas=replicas, restart_on_exit=False, ops=ops)
    try:
        duration = jobs / rate
        rng = random.Random()
        # Random moments within the production window, at least 2 s apart (so each
        # replacement has started before the next kill).
        moments: list[float] = []
        while len(moments) < kills:
            moments = sorted(rng.uniform(2.0, max(3.0, duration - 1.0)) for _ in range(kills))
            if all(b - a >= 2.0 for a, b in itertools.pairwise(moments)) or duration < 2.5 * kills:
                break
        producing = asyncio.create_task(run.load.produce(jobs, rate=rate))
        began = time.monotonic()
        kill_times: list[float] = []
        for moment in moments:
            await asyncio.sleep(max(0.0, began + moment - time.monotonic()))
            victim = rng.choice(run.cluster.live())
            victim.kill(why="SIGKILL by the kill loop")
            kill_times.append(run.cluster.event(f"SIGKILL {victim.name}"))
            run.cluster.add_replica()
        run.heal_at = kill_times[-1] if kill_times else None
        await producing
        ledger = await finish(run, drain_timeout_s=300, duplicate_bound=kills * MAX_INFLIGHT)
        # Per kill: how long until the first result written after it.
        gaps = [gap for at in kill_times if (gap := ledger.first_after(at)) is not None]
        result = run.result
        result.details["kill_to_first_result_s"] = [round(g, 2) for g in gaps]
        result.details["longest_stall_s"] = round(
            ledger.longest_gap(kill_times[0]) if kill_times else 0.0, 2
        )
        if gaps:
            # From the last kill (a kill soon after another one also waits for the
            # previous replacement: the whole list is in the details).
            result.recovery_first_s = round(gaps[-1], 2)
        result.note(
            f"kill->next result {min(gaps, default=0):.1f}-{max(gaps, default=0):.1f}s (recovery first: from the last kill); longest stall without results {result.details['longest_stall_s']}s"
        )
        return result
    finally:
        await run.close()


async def frozen_replica(
    workdir: Path, *, name: str, jobs: int = 4000, rate: float = 250, freeze_s: float = 12.0
) -> ScenarioResult:
    """Two replicas; ~`jobs` mixed jobs flow; one replica is SIGSTOPped (job and API
    process) for `freeze_s` (> the 6 s session timeout), then SIGCONT. It may exit
    non-zero on waking; it must not publish a second result for a job the new owner
    finished, nor commit behind the new owner (committed offsets never go back)."""
    run = await begin(name, workdir, replicas=2)
    try:
        frozen, _other = run.cluster.live()
        producing = asyncio.create_task(run.load.produce(jobs, rate=rate))
        await run.tail.wait_count(200, 60)
        run.cluster.event(f"SIGSTOP {frozen.name}")
        frozen.freeze()
        await asyncio.sleep(freeze_s)
        # From here on it may exit (non-zero) instead of publishing: accepted.
        frozen.expect_exit("frozen past the session timeout: may exit on waking")
        frozen.thaw()
        run.heal_at = run.cluster.event(f"SIGCONT {frozen.name}")
        await producing
        # On waking it may stop (fenced): give it the failed-stop grace and then some.
        woke = time.monotonic()
        while frozen.alive() and time.monotonic() - woke < 30:  # noqa: ASYNC110  # a child process: nothing to await
            await asyncio.sleep(0.2)
        woke_code = frozen.returncode
        ledger = await finish(
            run,
            drain_timeout_s=180,
            duplicate_bound=0,
            allowed_exit_codes={frozen.name: {None, 1}},
        )
        result = run.result
        result.details["frozen_exit_code"] = (
            woke_code if woke_code is not None else "still running 3 s after the production ended"
        )
        regressions = run.watch.regressions if run.watch is not None else []
        result.check(
            not regressions, f"committed offsets went back {len(regressions)}x: {regressions[:3]}"
        )
        if ledger.duplicate_ids:
            result.details["duplicate_sample"] = ledger.duplicate_ids[:10]
        result.operator(
            "frozen_replica_exits_nonzero_on_waking",
            woke_code not in (None, 0),
            f"{frozen.name} exit code after SIGCONT: {woke_code}",
        )
        return result
    finally:
        await run.close()


# -- rebalances and quotas ------------------------------------------------------------


# Every membership change rebalances the group, and Tansu's rebalance stops every
# member for about 1.5 session timeouts (9 s here; eager: all partitions revoked);
# a killed member first waits out its session. The rate is judged once it is over.
SETTLE_S = 15.0


def check_rate_across_rebalances(
    result: ScenarioResult,
    starts: list[float],
    events: list[tuple[float, str]],
    quota: float,
    window_s: float = 10.0,
) -> None:
    """A tenant's starts (`started_at`, sorted) against its rate quota, in whole windows:
    never above it in any window (one burst of `quota` tokens allowed), and within 15%
    in every window that begins `SETTLE_S` after the last membership change (replicas
    started, stopped or killed). While the group rebalances nothing starts, so the
    windows around the changes are reported, not held to the quota. A change is a replica
    started, stopped or killed, or a replica assigned partitions (`events` "assigned ...":
    the rebalance itself, which can come long after the process started)."""
    first = starts[0]
    span = starts[-1] - first
    overall = (len(starts) - 1) / span if span > 0 else float("inf")
    counts = Counter(int((s - first) // window_s) for s in starts)
    # Whole windows only, and not the one before the last either: as the backlog runs
    # out it is spread unevenly over the replicas (one empties first), so its last
    # seconds are reported, not held to the quota.
    windows = sorted(counts)[:-2]
    changes = [  # the first replica starts, and is assigned its partitions, before any job
        at
        for at, what in events
        if what.startswith(("started gw", "SIGTERM", "SIGKILL", "assigned"))
        and first < at <= starts[-1]  # not the teardown's rebalances, after the backlog
    ]
    settled_from = max(changes, default=first) + SETTLE_S
    settled: list[float] = []
    for window in windows:
        rate = counts[window] / window_s
        begin = first + window * window_s
        result.check(
            rate <= quota * 1.05 + quota / window_s,
            f"{rate:.1f}/s in the 10 s window at +{window * window_s:.0f} s, quota {quota:g}/s",
        )
        if begin >= settled_from:
            settled.append(rate)
            result.check(
                abs(rate - quota) <= 0.15 * quota,
                f"{rate:.1f}/s in the 10 s window at +{window * window_s:.0f} s, after the "
                f"last rebalance, quota {quota:g}/s",
            )
    result.check(bool(settled), "no whole 10 s window after the last rebalance")
    rates = [round(counts[w] / window_s, 1) for w in windows]
    result.details["metered_rate_per_s"] = round(overall, 2)
    result.details["metered_10s_rates"] = rates
    result.details["metered_settled_rates"] = settled
    result.note(
        f"metered start rate {overall:.1f}/s over the run, rebalances included (quota "
        f"{quota:g}); 10 s windows after the last rebalance {min(settled, default=0):.0f}-"
        f"{max(settled, default=0):.0f}/s, all windows {min(rates, default=0):.0f}-"
        f"{max(rates, default=0):.0f}/s"
    )


async def _assigned(replica: Replica, timeout_s: float) -> bool:
    """Whether `replica` logged a partition assignment (it joined the group) in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if next(replica.log_lines("partitions_assigned"), None) is not None:
            return True
        await asyncio.sleep(1.0)
    return False


async def rebalance_quota(
    workdir: Path,
    *,
    name: str,
    metered_rate: float = 40.0,
    others_rate: float = 200,
    join_timeout_s: float = 180.0,
    judged_s: float = 60.0,
) -> ScenarioResult:
    """A tenant with rate_per_s 40 keeps a backlog of echo jobs (fed at 1.25 times its
    quota) while the other tenants' mixed jobs flow at `others_rate`/s; replicas are
    added (1 -> 2 -> 3) and removed (SIGTERM, 3 -> 2, then SIGKILL one, replaced) under
    that load, each change once the one before it has settled (a new replica assigned
    its partitions). The metered tenant's start rate (from `started_at`) must stay under
    its quota in every 10 s window, and be back within 15% of it for `judged_s` after
    the last rebalance (`check_rate_across_rebalances`)."""
    tenants = {
        **CHAOS_TENANTS,
        "metered": {
            "conc": 64,
            "rate": metered_rate,
            "burst": metered_rate,
            "queued": 5000,
            "weight": 1,
        },
    }
    run = await begin(name, workdir, replicas=1, tenants=tenants, restart_on_exit=False)
    try:
        cluster, result = run.cluster, run.result
        metered = Mix(tenants={"metered": 1.0}, echo=1.0, sleep=0.0)
        await run.load.produce(int(metered_rate * 30), mix=metered)  # 30 s of backlog
        feeding = asyncio.Event()
        feeding.set()

        async def feed(rate: float, mix: Mix | None) -> None:
            while feeding.is_set():
                await run.load.produce(max(1, int(rate)), rate=rate, mix=mix)

        feeds = [
            asyncio.create_task(feed(metered_rate * 1.25, metered)),
            asyncio.create_task(feed(others_rate, None)),
        ]
        try:

            async def join(replica: Replica) -> None:
                joined = await _assigned(replica, join_timeout_s)
                result.check(joined, f"{replica.name} not assigned within {join_timeout_s:g} s")
                await asyncio.sleep(10)

            await asyncio.sleep(10)
            await join(cluster.add_replica())  # 1 -> 2
            await join(cluster.add_replica())  # 2 -> 3
            victim = cluster.live()[0]
            cluster.event(f"SIGTERM {victim.name}")
            code = await victim.stop(timeout_s=60, why="removed under load")
            result.check(code == 0, f"{victim.name} removed with SIGTERM exited {code}")
            await asyncio.sleep(15)
            victim = cluster.live()[-1]
            victim.kill(why="removed under load (SIGKILL)")
            cluster.event(f"SIGKILL {victim.name}")
            await join(cluster.add_replica())  # replaced
            last = cluster.add_replica()
            run.heal_at = cluster.event("last rebalance")
            await join(last)
            await asyncio.sleep(SETTLE_S + judged_s)
        finally:
            feeding.clear()
            await asyncio.gather(*feeds)
        ledger = await finish(run, drain_timeout_s=300, duplicate_bound=MAX_INFLIGHT)
        starts = sorted(
            info.started_at
            for job_id, found in ledger.results.items()
            if (spec := run.load.produced.get(job_id)) is not None and spec.tenant == "metered"
            for info in found
            if info.started_at is not None
        )
        assigned = [
            (line["ts"], f"assigned {replica.name}")
            for replica in cluster.replicas
            for line in replica.log_lines("partitions_assigned")
            if "ts" in line
        ]
        if len(starts) > 2:
            events = sorted([*cluster.events, *assigned])
            check_rate_across_rebalances(result, starts, events, metered_rate)
        else:
            result.check(False, "the metered tenant's jobs have no start times")
        return result
    finally:
        await run.close()


# -- soak ------------------------------------------------------------------------------


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


async def measure_capacity(run: Run, jobs: int = 6000) -> float:
    """Jobs per second the running replicas finish from a mixed backlog of `jobs`."""
    before = set(run.load.produced)
    await run.load.produce(jobs)
    ids = {job_id for job_id in run.load.produced if job_id not in before}
    began = time.time()
    await run.tail.wait_all(ids, 300)
    return len(ids) / max(0.001, time.time() - began)


async def soak(
    workdir: Path, *, name: str, seconds: float, fault_every_s: float | None = None
) -> ScenarioResult:
    """Two replicas at half the measured capacity with a mixed workload for `seconds`,
    with a fault every `fault_every_s` (a connection reset, 100 ms latency for 10 s, a
    5 s refusal with production paused, a SIGKILL of the second replica and its
    replacement, in turn). Reports the slopes of RSS and thread count of the replica
    that lives through it all, and the consumer lag (`gateway_consumer_lag`)."""
    run = await begin(name, workdir, replicas=2, ops=True, restart_on_exit=True)
    try:
        cluster, result = run.cluster, run.result
        anchor = cluster.live()[0]
        capacity = await measure_capacity(run)
        rate = max(20.0, capacity / 2)
        result.details["capacity_jobs_per_s"] = round(capacity, 1)
        result.details["soak_rate_jobs_per_s"] = round(rate, 1)
        result.details["soak_s"] = seconds
        every = fault_every_s or max(30.0, seconds / 6)
        soak_began = time.time()
        stop_at = time.monotonic() + seconds
        allowed = asyncio.Event()  # set: producing allowed
        allowed.set()
        idle = asyncio.Event()  # set: no chunk of jobs on its way
        idle.set()

        async def produce() -> None:
            while time.monotonic() < stop_at:
                await allowed.wait()
                idle.clear()
                try:
                    await run.load.produce(max(1, int(rate / 2)), rate=rate)
                finally:
                    idle.set()

        producer = asyncio.create_task(produce())
        proxy = cluster.tansu.proxy
        faults = ["reset", "latency", "refuse", "kill"]
        n = 0
        heal_at = None
        while time.monotonic() + every < stop_at:
            await asyncio.sleep(every)
            fault = faults[n % len(faults)]
            n += 1
            cluster.event(f"soak fault {fault}")
            if fault == "reset":
                proxy.reset()
            elif fault == "latency":
                proxy.latency(0.1)
                await asyncio.sleep(10)
                proxy.heal()
            elif fault == "refuse":
                allowed.clear()
                await idle.wait()  # every job produced so far is acknowledged
                proxy.refuse()
                await asyncio.sleep(5)
                proxy.heal()
                allowed.set()
            else:
                victims = [r for r in cluster.live() if r is not anchor]
                if victims:
                    victims[0].kill(why="soak: SIGKILL")
                    cluster.add_replica()
            heal_at = cluster.event(f"soak fault {fault} healed")
        await producer
        run.heal_at = heal_at
        soak_end = time.time()
        result.details["faults"] = n
        # Slopes of the anchor replica, skipping the first fifth (warm-up).
        samples = [s for s in cluster.samples if s.replica == anchor.name]
        if samples:
            t0 = samples[0].at
            warm = t0 + (samples[-1].at - t0) / 5
            rss = [(s.at - t0, s.job_rss / MIB) for s in samples if s.at >= warm]
            total = [(s.at - t0, (s.job_rss + s.api_rss) / MIB) for s in samples if s.at >= warm]
            threads = [(s.at - t0, float(s.threads)) for s in samples if s.at >= warm]
            slope_rss = _slope_per_min(rss)
            slope_total = _slope_per_min(total)
            slope_threads = _slope_per_min(threads)
            result.details["anchor_rss_mib_first_last"] = (
                [round(rss[0][1], 1), round(rss[-1][1], 1)] if rss else None
            )
            result.details["rss_slope_mib_per_min"] = (
                round(slope_rss, 3) if slope_rss is not None else None
            )
            result.details["replica_rss_slope_mib_per_min"] = (
                round(slope_total, 3) if slope_total is not None else None
            )
            result.details["thread_slope_per_min"] = (
                round(slope_threads, 3) if slope_threads is not None else None
            )
            last = t0 + 2 * (samples[-1].at - t0) / 3
            tail_slope = _slope_per_min(
                [(s.at - t0, s.job_rss / MIB) for s in samples if s.at >= last]
            )
            result.details["rss_slope_last_third_mib_per_min"] = (
                round(tail_slope, 3) if tail_slope is not None else None
            )
            result.note(
                f"capacity {capacity:.0f}/s, soak {rate:.0f}/s for {seconds:.0f}s, {n} faults; "
                f"anchor job-process RSS slope {slope_rss if slope_rss is None else round(slope_rss, 2)} MiB/min "
                f"(last third {tail_slope if tail_slope is None else round(tail_slope, 2)}), "
                f"threads slope {slope_threads if slope_threads is None else round(slope_threads, 2)}/min"
            )
        lags = (
            [s[5] for s in run.probe.samples if s[5] is not None and soak_began <= s[0] <= soak_end]
            if run.probe
            else []
        )
        result.details["lag_max"] = max(lags, default=None)
        result.details["lag_p50"] = statistics.median(lags) if lags else None
        lag_points = [
            (s[0] - soak_began, s[5])
            for s in (run.probe.samples if run.probe else [])
            if s[5] is not None and s[1] == anchor.name and soak_began <= s[0] <= soak_end
        ]
        lag_slope = _slope_per_min([(t, float(v)) for t, v in lag_points])
        result.details["lag_slope_per_min"] = round(lag_slope, 2) if lag_slope is not None else None
        # Lag bounded: under the README's alert threshold, at any time.
        result.check(bool(lags), "no gateway_consumer_lag sample was read")
        result.check(
            max(lags, default=0) < 10000, f"consumer lag reached {max(lags, default=0):.0f}"
        )
        await finish(run, drain_timeout_s=300, duplicate_bound=(n // 4 + 1) * MAX_INFLIGHT)
        return result
    finally:
        await run.close()
