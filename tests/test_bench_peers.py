"""Smoke test of the peer benchmark harness: it runs and reports; no figure is judged here.

The benchmark itself (`make bench`) is never part of the test run. This only drives
`python -m bench.peers --smoke` (about 15 s) over two systems this venv has, the bare
flow loop and the gateway, on the noisy mix with tiny sizes, so a broken harness is
noticed before someone needs the figures. FastStream, pyrallel-consumer and
matplotlib live in the bench venvs and are not needed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peer_report import BEGIN, END, markdown_section, write_markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_peers_harness_runs_and_reports(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    argv = [sys.executable, "-m", "bench.peers", "--smoke", "--systems", "bare,gateway"]
    argv += ["--workloads", "noisy", "--results-dir", str(tmp_path), "--markdown", str(markdown)]
    argv += ["--no-plots"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "peers-smoke.json").read_text())
    runs = {(r["system"], r["workload"]): r for r in report["runs"]}
    assert set(runs) == {("bare", "noisy"), ("gateway", "noisy")}
    for run in runs.values():
        assert run["error"] is None
        solo, flood = run["phases"]
        assert solo["tenants"]["quiet"]["done"] == solo["tenants"]["quiet"]["sent"] > 0
        assert flood["tenants"]["flood"]["done"] == flood["tenants"]["flood"]["sent"] > 0
        assert flood["quiet_series"]
    text = markdown.read_text()
    assert BEGIN in text
    assert END in text
    assert "| **gateway** |" in text
    # Rewriting replaces the section instead of adding a second one.
    write_markdown(markdown, markdown_section(report))
    assert markdown.read_text().count(BEGIN) == 1
