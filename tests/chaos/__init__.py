"""Chaos harness: a fault-injection suite that makes failure behaviour a tested part of
the product.

* `harness`: `ChaosCluster` (Tansu and OpenBao behind fault proxies, `gateway run`
  replicas as subprocesses, RSS sampling, unexpected exits) and `Replica`.
* `load`: `LoadGenerator` and `Mix` (echo and sleep jobs of 1-200 ms for several
  tenants, `secret_digest` jobs of the shipped tenants).
* `ledger`: `ResultTail`, `read_all`, `build_ledger` / `Ledger` (lost, duplicates,
  statuses, DLQ, timings) and `OffsetWatch` (committed offsets going back).
* `scenarios`: the scenarios, each returning a `ScenarioResult`.
* `report`: `ScenarioResult`, the verdict lines and the summary table.

The full suite is `make chaos` (`pytest -m chaos tests/chaos`); two short scenarios run
in `make test`. Import it from tests as `chaos` (the tests directory is on `sys.path`),
like `faults`.
"""

from .harness import CHAOS_TENANTS, ChaosCluster, Replica
from .ledger import Ledger, OffsetWatch, ResultTail, build_ledger, read_all
from .load import JobSpec, LoadGenerator, Mix
from .report import ScenarioResult, record

__all__ = [
    "CHAOS_TENANTS",
    "ChaosCluster",
    "JobSpec",
    "Ledger",
    "LoadGenerator",
    "Mix",
    "OffsetWatch",
    "Replica",
    "ResultTail",
    "ScenarioResult",
    "build_ledger",
    "read_all",
    "record",
]
