"""What a chaos scenario found, one verdict line each and a summary table for the run.

Every scenario ends in a `ScenarioResult`; `record()` keeps it for the session, and the
chaos conftest prints the verdict lines and the table at the end of the run (and writes
them as JSON to `$CHAOS_RESULTS` when that is set, as `make chaos` does).

Checks come in two kinds, and a failure of either makes the verdict FAIL and the test
fail:

* **ledger** (`ScenarioResult.check`): the scenario's contract (nothing lost, duplicates
  within the stated bound, nothing unexpected in the DLQ, every job's expected status,
  no replica exiting when it should not);
* **operator** (`ScenarioResult.operator`): what an operator sees of the fault (one
  `broker_unreachable` / `broker_recovered` line per outage, rate-limited client logs,
  `gateway_broker_up`, `/readyz` during an outage, `vault_unreachable` /
  `vault_recovered`, a frozen replica exiting non-zero on waking), named in the
  failure as `operator: <name>: <what was seen>`; those that pass are listed in the
  JSON (`operator_passed`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "ScenarioResult", "record", "summary_lines", "write_json"]


@dataclass
class ScenarioResult:
    """The figures and checks of one scenario run."""

    scenario: str
    jobs: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicate_bound: int = 0
    recovery_first_s: float | None = None  # heal -> first result written after it
    recovery_drained_s: float | None = None  # heal -> last job's result
    peak_rss_mib: float = 0.0  # largest replica (job process + API process)
    unexpected_exits: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)  # hard checks that failed
    notes: list[str] = field(default_factory=list)  # remarks
    operator_passed: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "FAIL" if self.failures else "PASS"

    def check(self, ok: bool, what: str) -> bool:
        """A hard check: when `ok` is false, `what` is a failure of the scenario."""
        if not ok:
            self.failures.append(what)
        return ok

    def operator(self, name: str, ok: bool, seen: str) -> bool:
        """What the operator sees of the fault: when `ok` is false, a failure."""
        if ok:
            self.operator_passed.append(name)
        else:
            self.failures.append(f"operator: {name}: {seen}")
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    def recovery_text(self) -> str:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}s"

        return f"{fmt(self.recovery_first_s)} / {fmt(self.recovery_drained_s)}"

    def verdict_line(self) -> str:
        line = (
            f"CHAOS {self.scenario}: {self.verdict} jobs={self.jobs} lost={self.lost} "
            f"duplicates={self.duplicates} (bound {self.duplicate_bound}) "
            f"recovery={self.recovery_text()} peak_rss={self.peak_rss_mib:.0f}MiB "
            f"unexpected_exits={self.unexpected_exits} wall={self.wall_s:.0f}s"
        )
        if self.failures:
            line += " | FAILED: " + "; ".join(self.failures)
        return line

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict
        return data


RESULTS: list[ScenarioResult] = []


def record(result: ScenarioResult) -> ScenarioResult:
    """Keep `result` for the end-of-session summary (and print its verdict line now)."""
    RESULTS.append(result)
    print(result.verdict_line())  # shown with -s, and in the test's report
    for note in result.notes:
        print(f"  note: {note}")
    return result


def summary_lines(results: list[ScenarioResult]) -> list[str]:
    """One verdict line per scenario, then a table: scenario, verdict, jobs, lost,
    duplicates, recovery (first / drained), peak RSS MiB, notes."""
    lines = [result.verdict_line() for result in results]
    header = (
        "scenario",
        "verdict",
        "jobs",
        "lost",
        "dup (bound)",
        "recovery first / drained",
        "peak RSS MiB",
        "exits",
        "notes",
    )
    rows = [
        (
            r.scenario,
            r.verdict,
            str(r.jobs),
            str(r.lost),
            f"{r.duplicates} ({r.duplicate_bound})",
            r.recovery_text(),
            f"{r.peak_rss_mib:.0f}",
            str(r.unexpected_exits),
            "; ".join(r.failures + r.notes) or "-",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        return "| " + " | ".join([*cells, row[-1]]) + " |"

    lines += ["", fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"]
    lines += [fmt(row) for row in rows]
    return lines


def write_json(results: list[ScenarioResult], path: Path | None = None) -> Path | None:
    """Write the results to `path` (default `$CHAOS_RESULTS`); None when neither is set."""
    target = path or (
        Path(os.environ["CHAOS_RESULTS"]) if os.environ.get("CHAOS_RESULTS") else None
    )
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "scenarios": [r.as_dict() for r in results],
        "table": summary_lines(results),
    }
    target.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return target
