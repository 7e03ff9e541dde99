"""The runtime set in requirements/runtime.txt is complete and lean (installed with --no-deps)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("mlflow", "pandas", "pyarrow", "scipy", "mcp", "databricks_mcp", "fastapi")


def _pinned(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            dist, version = line.split("==")
            pins[dist.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("module", HEAVY)
def test_penguiflow_extras_are_not_installed(module: str) -> None:
    assert importlib.util.find_spec(module) is None


def test_installed_versions_match_the_lock() -> None:
    for dist, version in _pinned("runtime.txt").items():
        assert metadata.version(dist) == version, dist


def test_gateway_imports_and_runs_a_flow_in_a_fresh_interpreter() -> None:
    code = (
        "import asyncio, time\n"
        "from gateway.flows import JobContext, builtin_job_types\n"
        "from gateway.runner import run_job\n"
        "import gateway.service, gateway.cli\n"
        "ctx = JobContext('acme', 'j', 'echo', 1, {'ok': True}, time.time() + 5)\n"
        "out = asyncio.run(run_job(ctx, builtin_job_types().get('echo'), cancel=asyncio.Event()))\n"
        "assert out.result == {'ok': True}, out\n"
        "print('flow-ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "flow-ok" in done.stdout
