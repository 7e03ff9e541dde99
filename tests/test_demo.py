"""`gateway demo` from the installed package: exits 0, every job ends, nothing left running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from gateway.dev.demo import STEPS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _processes_mentioning(needles: list[str]) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if any(needle in line for needle in needles):
            found.append(line)
    return found


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--no-dashboard",
            "--duration",
            "20",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every scenario step happened; every job reached a terminal result" in done.stdout
    for step in STEPS:
        assert re.search(rf"\bok[ │|]+{re.escape(step)}[ │|]", done.stdout), step
    assert "malformed_json=1" in done.stdout
    assert "unknown_tenant=4" in done.stdout  # "nobody" once, the late tenant's 3 jobs
    for tenant in ("acme", "globex", "initech"):
        assert tenant in done.stdout
    ports = re.search(
        r"tansu on (127\.0\.0\.1:\d+), openbao on http://(127\.0\.0\.1:\d+)", done.stdout
    )
    assert ports is not None, done.stdout[:500]
    assert not _processes_mentioning([f"tcp://{ports[1]}", ports[2]]), "demo left a service running"
