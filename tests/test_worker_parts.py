"""The parts of `gateway run --workers N` that need no broker: the count and where it comes
from, the settings each worker gets, one machine's figures from its workers' answers,
the worker's channel, and a worker that is undumpable before it holds a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from gateway import cli
from gateway.channel import ChannelError
from gateway.metrics import Metrics
from gateway.settings import MAX_WORKERS, Settings, VaultSettings, parse_workers, usable_cores
from gateway.worker.channel import Leave, WorkerInit, codec
from gateway.worker.combine import label_workers, render, sum_tenant_figures, worker_families
from gateway.worker.pool import worker_settings

from conftest import ROOT


def test_auto_is_one_worker_per_core_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 2, 5}, raising=False)
    assert usable_cores() == 3
    assert parse_workers("auto") == 3
    assert parse_workers(" AUTO ") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(1000)), raising=False)
    assert parse_workers("auto") == MAX_WORKERS


@pytest.mark.parametrize(("value", "count"), [("1", 1), ("4", 4), (3, 3), ("256", 256)])
def test_worker_counts(value: object, count: int) -> None:
    assert parse_workers(value) == count


@pytest.mark.parametrize("value", ["0", "-1", "257", "1.5", "two", "", True, 2.0, None])
def test_bad_worker_counts_name_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueError, match="from 1 to 256, or 'auto'"):
        parse_workers(value)


def test_the_setting_takes_auto_and_defaults_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).workers == 1  # type: ignore[call-arg]
    monkeypatch.setenv("GATEWAY_WORKERS", "auto")
    assert Settings(_env_file=None).workers == usable_cores()  # type: ignore[call-arg]
    monkeypatch.setenv("GATEWAY_WORKERS", "0")
    with pytest.raises(ValueError, match="workers"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """`gateway run` records the settings it would run with instead of running."""
    seen: list[Settings] = []

    async def run_gateway(settings: Settings) -> tuple[int, str | None]:
        seen.append(settings)
        return 0, None

    monkeypatch.setattr("gateway.service.run_gateway", run_gateway)
    monkeypatch.setattr(cli, "configure_logging", lambda *_, **__: None)
    return seen


def test_the_flag_overrides_the_setting(
    monkeypatch: pytest.MonkeyPatch, ran: list[Settings]
) -> None:
    monkeypatch.setenv("GATEWAY_WORKERS", "3")
    runner = CliRunner()
    assert runner.invoke(cli.main, ["run"]).exit_code == 0
    assert runner.invoke(cli.main, ["run", "--workers", "2"]).exit_code == 0
    assert runner.invoke(cli.main, ["run", "--workers", "auto"]).exit_code == 0
    assert [settings.workers for settings in ran] == [3, 2, usable_cores()]


@pytest.mark.parametrize("value", ["0", "x", "1000"])
def test_a_bad_flag_is_a_clear_usage_error(value: str, ran: list[Settings]) -> None:
    result = CliRunner().invoke(cli.main, ["run", "--workers", value])
    assert result.exit_code == 2
    assert "Invalid value for '--workers'" in result.output
    assert "from 1 to 256, or 'auto'" in result.output
    assert not ran


def test_a_worker_is_a_replica_of_its_own_without_listeners() -> None:
    token = SecretStr("s.for-the-workers")
    parent = Settings(replica="box", workers=4, vault=VaultSettings(token=token))
    child = worker_settings(parent, 3)
    assert child.replica == "box-w3"
    assert child.workers == 1
    assert not child.http.enabled
    assert not child.ops.enabled
    assert child.vault == parent.vault  # it runs jobs: it needs the credentials
    assert child.kafka == parent.kafka  # the same group
    assert "s.for-the-workers" not in repr(WorkerInit(child, 3))


def _metrics(tenant: str, succeeded: int, seconds: float) -> Metrics:
    metrics = Metrics()
    metrics.jobs.labels(tenant=tenant, type="echo", outcome="succeeded").inc(succeeded)
    metrics.job_duration.labels(tenant=tenant, type="echo").observe(seconds)
    metrics.api_process_restarts.inc()
    return metrics


def test_each_family_once_with_every_workers_series_under_its_label() -> None:
    zero, one = _metrics("acme", 3, 0.02), _metrics("acme", 5, 2.0)
    families = label_workers({0: zero.families(), 1: one.families()})
    text = render(families + worker_families({0: True, 1: False}, {1: 2})).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    jobs = (("outcome", "succeeded"), ("tenant", "acme"), ("type", "echo"))
    assert samples[("gateway_jobs_total", (*jobs, ("worker", "0")))] == 3
    assert samples[("gateway_jobs_total", (*jobs, ("worker", "1")))] == 5
    bucket = (("le", "0.05"), ("tenant", "acme"), ("type", "echo"))
    assert samples[("gateway_job_duration_seconds_bucket", (*bucket, ("worker", "0")))] == 1
    assert samples[("gateway_job_duration_seconds_bucket", (*bucket, ("worker", "1")))] == 0
    assert samples[("gateway_api_process_restarts_total", (("worker", "1"),))] == 1
    assert samples[("gateway_worker_up", (("worker", "0"),))] == 1
    assert samples[("gateway_worker_up", (("worker", "1"),))] == 0
    assert samples[("gateway_worker_restarts_total", (("worker", "1"),))] == 2


def test_a_worker_that_did_not_answer_leaves_only_its_own_series_out() -> None:
    families = label_workers({0: _metrics("acme", 1, 0.1).families()})
    text = render(families).decode()
    assert 'worker="0"' in text
    assert 'worker="1"' not in text


def _row(tenant: str, state: str = "active", **figures: int) -> dict[str, Any]:
    row: dict[str, Any] = {"tenant": tenant, "state": state, "quota": {"rate_per_s": 10.0}}
    for column in ("running", "queued", "deferred", "parked", "throttled", "backlog"):
        row[column] = figures.get(column, 0)
    return row


def test_tenant_figures_add_up_over_the_workers() -> None:
    zero = [_row("acme", running=2, queued=5, backlog=5), _row("globex")]
    one = [
        _row("globex", running=1, throttled=7),
        _row("acme", running=3, deferred=4, parked=6, backlog=10),
    ]
    two = [_row("acme", "paused"), _row("gone", running=9)]
    rows = sum_tenant_figures([zero, one, two])
    assert [row["tenant"] for row in rows] == ["acme", "globex"]  # worker 0's catalog
    acme, globex = rows
    assert (acme["running"], acme["queued"], acme["deferred"]) == (5, 5, 4)
    assert (acme["parked"], acme["backlog"]) == (6, 15)
    assert acme["state"] == "paused"  # one worker has applied the pause already
    assert acme["quota"] == {"rate_per_s": 10.0}
    assert (globex["running"], globex["throttled"], globex["state"]) == (1, 7, "active")
    assert zero[0]["running"] == 2  # the answers themselves are left alone
    assert sum_tenant_figures([]) == []


def test_the_worker_channel_refuses_what_is_not_a_message() -> None:
    worker_codec = codec()
    assert worker_codec.decode(worker_codec.encode(Leave())) == Leave()
    with pytest.raises(ChannelError):
        worker_codec.decode(b"not a pickle")


def test_a_worker_is_undumpable_before_its_settings_arrive() -> None:
    # The Vault credentials come over the channel, after main() has made the process
    # undumpable: nothing of the same user can read them from its memory.
    code = (
        "import sys\n"
        "from gateway.process import is_dumpable\n"
        "import gateway.worker.main as worker\n"
        "async def run(channel_fd):\n"
        "    print('dumpable' if is_dumpable() else 'undumpable', channel_fd)\n"
        "    return 0\n"
        "worker._run = run\n"
        "sys.argv = ['worker', '7']\n"
        "worker.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["undumpable", "7"]
