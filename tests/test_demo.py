"""`gateway demo` from the installed package: exits 0, every job ends, nothing left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _service_children() -> list[str]:
    return [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
        if any(name in " ".join(p.info["cmdline"] or []) for name in ("tansu broker", "bao server"))
    ]


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    before = set(_service_children())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--no-dashboard",
            "--duration",
            "3",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every job reached a terminal result" in done.stdout
    assert "malformed_json=1" in done.stdout
    assert "unknown_tenant=1" in done.stdout
    for tenant in ("acme", "globex", "initech"):
        assert tenant in done.stdout
    assert set(_service_children()) <= before, "demo left Tansu or OpenBao running"
