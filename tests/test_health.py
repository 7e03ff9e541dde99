"""Outage visibility and fencing (pure), and what `gateway run` says when it cannot start."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.dev.services import Tansu
from gateway.health import BrokerHealth, LoopWatch
from gateway.observability import ClientLogLimit, configure_logging

from conftest import VaultServer

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_when_the_broker_goes_and_one_when_it_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    health = BrokerHealth("127.0.0.1:9", unreachable_after_s=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="gateway.health"):
        for _ in range(40):  # 20 s without an acknowledgement, checked twice a second
            health.failed("KafkaConnectionError")
            clock.now += 0.5
            health.check()
        assert not health.up
        assert health.down_for() == pytest.approx(20.0)
        health.ok()
        health.ok()
    events = [(r.getMessage(), getattr(r, "down_s", None)) for r in caplog.records]
    assert events == [("broker_unreachable", None), ("broker_recovered", 20.0)]
    assert caplog.records[0].error == "KafkaConnectionError"  # type: ignore[attr-defined]
    assert health.up


def test_a_stalled_loop_is_fenced_even_before_its_next_tick() -> None:
    clock = Clock()
    watch = LoopWatch(5.5, clock=clock)
    for _ in range(10):
        clock.now += 0.25
        watch.tick()
    assert not watch.fenced()
    clock.now += 25.0  # SIGSTOP for 25 s
    assert watch.fenced()  # a writer asks first, before the watch task runs again
    assert watch.fenced_after == pytest.approx(25.0)


def test_client_library_lines_are_rate_limited() -> None:
    limit = ClientLogLimit(per_s=1.0, burst=3, total_burst=10)
    records = [
        logging.makeLogRecord({"name": "aiokafka.conn", "msg": "Unable connect to %s"})
        for _ in range(500)
    ]
    passed = [r for r in records if limit.filter(r)]
    assert len(passed) == 3  # a burst in no time, then one a second
    ours = logging.makeLogRecord({"name": "gateway.intake", "msg": "x"})
    assert all(limit.filter(ours) for _ in range(100))


def test_client_library_lines_are_limited_in_total_whatever_their_text() -> None:
    # During an outage many lines carry the address or the error in their text: each
    # is a message of its own, so only the total bound holds them.
    clock = Clock()
    limit = ClientLogLimit(per_s=1.0, burst=5, total_per_s=3.0, total_burst=10, clock=clock)
    passed: list[logging.LogRecord] = []
    for second in range(20):
        for n in range(150):  # 150 distinct lines a second, as measured in an outage
            record = logging.makeLogRecord(
                {"name": "aiokafka.conn", "msg": f"Unable connect to node {second}-{n}"}
            )
            if limit.filter(record):
                passed.append(record)
            clock.now += 1.0 / 150
    assert len(passed) <= 10 + 3 * 20
    # Every line after the first burst says how many were dropped before it, and the
    # counts add up to everything that was dropped.
    dropped = sum(getattr(r, "suppressed", 0) for r in passed)
    assert 20 * 150 - len(passed) - dropped < 150  # only the last stretch is unreported
    assert all(getattr(r, "suppressed", 0) > 0 for r in passed[10:])


def test_a_forwarding_handler_gets_the_client_limit_too() -> None:
    # The API process forwards its records to the gateway, which writes them under its
    # own names: the limit applies before they leave, while the logger is known.
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    keep = Keep()
    try:
        configure_logging(handler=keep)
        client = logging.getLogger("aiokafka.conn")
        for n in range(200):
            client.error("Unable connect to node %s", n)
        logging.getLogger("gateway.test").warning("ours")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert len([r for r in keep.records if r.name == "aiokafka.conn"]) <= 3
    assert any(r.name == "gateway.test" for r in keep.records)


def _gateway(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base.update(
        {
            "GATEWAY_TENANTS_DIR": str(ROOT / "tenants"),
            "GATEWAY_POLICIES_DIR": str(ROOT / "policies"),
            "GATEWAY_HTTP__ENABLED": "false",
            "GATEWAY_OPS__ENABLED": "false",
            "GATEWAY_LOG_FORMAT": "json",
            **env,
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run"],
        env=base,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(process: subprocess.Popen[str], text: str, timeout_s: float) -> str:
    """The process's stderr up to the first line containing `text` (bounded)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            line = process.stderr.readline()
            lines.append(line)
            if text in line or not line:
                break
    assert any(text in line for line in lines), "".join(lines)
    return "".join(lines)


def test_without_a_broker_it_retries_then_says_what_to_change(tmp_path: Path) -> None:
    process = _gateway(
        {
            "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "GATEWAY_KAFKA__STARTUP_TIMEOUT_S": "2",
        },
        tmp_path,
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the broker at 127.0.0.1:1 is unreachable")
    assert "GATEWAY_KAFKA__BOOTSTRAP_SERVERS" in last
    assert "gateway dev up" in last
    assert "Traceback" not in err
    assert "Unclosed" not in err


@pytest.mark.integration
def test_without_vault_it_retries_then_says_what_to_change(tmp_path: Path, tansu: Tansu) -> None:
    process = _gateway(
        {
            "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": tansu.bootstrap,
            "GATEWAY_VAULT__ADDR": "http://127.0.0.1:1",
            "GATEWAY_VAULT__TOKEN": "s.nothing",
            "GATEWAY_VAULT__STARTUP_TIMEOUT_S": "2",
        },
        tmp_path,
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "Vault at http://127.0.0.1:1 is unreachable" in last
    assert "GATEWAY_VAULT__ADDR" in last
    assert "s.nothing" not in err
    assert "Traceback" not in err


@pytest.mark.integration
@pytest.mark.parametrize("login", ["token", "approle"])
def test_refused_vault_credentials_end_the_start_at_once_naming_the_setting(
    tmp_path: Path, tansu: Tansu, openbao: VaultServer, login: str
) -> None:
    """A Vault that answers but refuses the gateway's credentials: no waiting out the
    start-up timeout (retrying cannot help), one line naming what to fix, no secret."""
    wrong = "s.wrong-" + "7" * 20
    credentials = (
        {"GATEWAY_VAULT__TOKEN": wrong}
        if login == "token"
        else {
            "GATEWAY_VAULT__ROLE_ID": openbao.gateway_vault.role_id,
            "GATEWAY_VAULT__SECRET_ID": wrong,
        }
    )
    began = time.monotonic()
    process = _gateway(
        {
            "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": tansu.bootstrap,
            "GATEWAY_VAULT__ADDR": openbao.bao.addr,
            "GATEWAY_VAULT__STARTUP_TIMEOUT_S": "60",
            **credentials,
        },
        tmp_path,
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert time.monotonic() - began < 30  # not the 60 s of start-up retries
    last = err.strip().splitlines()[-1]
    assert f"Vault at {openbao.bao.addr} refused the gateway's" in last
    assert ("GATEWAY_VAULT__TOKEN" if login == "token" else "GATEWAY_VAULT__SECRET_ID") in last
    assert wrong not in out + err
    assert "Traceback" not in err
    assert '"gateway_started"' not in err


def test_sigterm_while_waiting_for_the_broker_ends_at_once(tmp_path: Path) -> None:
    process = _gateway(
        {
            "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "GATEWAY_KAFKA__STARTUP_TIMEOUT_S": "60",
        },
        tmp_path,
    )
    seen = _read_until(process, '"broker_waiting"', 60)  # start-up is under way
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    err = seen + rest
    assert time.monotonic() - began < 10
    assert process.returncode == 0
    assert '"start_interrupted"' in err
    assert '"gateway_started"' not in err
