"""The full chaos suite (`make chaos`; deselected from the default run by the `chaos`
marker): each scenario runs a cluster of real `gateway run` replicas through a fault and
ends in the ledger check. Verdict lines and the summary table are printed at the end of
the session (tests/chaos/conftest.py) and written to `$CHAOS_RESULTS` when set.

`CHAOS_SOAK_S` sets the soak's duration (default 1800 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .report import ScenarioResult, record
from .scenarios import (
    broker_cut,
    frozen_replica,
    kill_loop,
    latency,
    rebalance_quota,
    soak,
    vault_fault,
)

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.slow,
    # aiokafka leaves a socket of a connect attempt unclosed when the proxy refuses it
    # (the harness's own clients ride out the faults too): not the gateway's, and not a
    # leak that outlives the scenario.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

SOAK_S = float(os.environ.get("CHAOS_SOAK_S", "1800"))


def passed(result: ScenarioResult) -> None:
    record(result)
    assert result.verdict == "PASS", result.failures


@pytest.mark.timeout(600)
async def test_broker_reset_and_refused_20s(tmp_path: Path) -> None:
    passed(await broker_cut(tmp_path, name="broker_reset_refuse_20s", mode="refuse", seconds=20))


@pytest.mark.timeout(600)
async def test_broker_blackholed_20s(tmp_path: Path) -> None:
    passed(await broker_cut(tmp_path, name="broker_blackhole_20s", mode="blackhole", seconds=20))


@pytest.mark.timeout(600)
async def test_broker_latency_200ms_30s(tmp_path: Path) -> None:
    passed(await latency(tmp_path, name="broker_latency_200ms_30s", delay_s=0.2, seconds=30))


@pytest.mark.timeout(900)
async def test_vault_frozen_60s(tmp_path: Path) -> None:
    passed(await vault_fault(tmp_path, name="vault_frozen_60s", fault="frozen", seconds=60))


@pytest.mark.timeout(600)
async def test_vault_503_30s(tmp_path: Path) -> None:
    passed(await vault_fault(tmp_path, name="vault_503_30s", fault="503", seconds=30))


@pytest.mark.timeout(600)
async def test_vault_tenant_tokens_revoked(tmp_path: Path) -> None:
    passed(await vault_fault(tmp_path, name="vault_tokens_revoked", fault="revoked", seconds=15))


@pytest.mark.timeout(1200)
async def test_kill_loop_one_replica(tmp_path: Path) -> None:
    passed(await kill_loop(tmp_path, name="kill_loop_1_replica", replicas=1, kills=10, jobs=30000))


@pytest.mark.timeout(1200)
async def test_kill_loop_three_replicas(tmp_path: Path) -> None:
    passed(await kill_loop(tmp_path, name="kill_loop_3_replicas", replicas=3, kills=10, jobs=30000))


@pytest.mark.timeout(600)
async def test_frozen_replica(tmp_path: Path) -> None:
    passed(await frozen_replica(tmp_path, name="frozen_replica_12s"))


@pytest.mark.timeout(1500)
async def test_rebalances_keep_quotas(tmp_path: Path) -> None:
    passed(await rebalance_quota(tmp_path, name="rebalance_quota_40ps"))


@pytest.mark.timeout(int(SOAK_S) + 1200)
async def test_soak(tmp_path: Path) -> None:
    passed(await soak(tmp_path, name=f"soak_{SOAK_S:.0f}s", seconds=SOAK_S))
