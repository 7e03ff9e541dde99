"""The channel to the API process: the gateway accepts only checked JSON, bounded frames,
and replaces an API process that sends anything else; nothing it sends can flood the
gateway's memory or log."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.api.channel import (
    MAX_FRAME_FROM_API,
    Call,
    ChannelError,
    Denied,
    LogLine,
    ResultReady,
    Started,
    codec,
    decode_from_api,
    encode_from_api,
    open_channel,
)
from gateway.api.supervisor import ApiProcess
from gateway.catalog import load_catalog
from gateway.child import Child
from gateway.metrics import Metrics
from gateway.records import JobStatus, Status
from gateway.settings import Settings
from gateway.tasks import Supervisor

ROOT = Path(__file__).resolve().parent.parent


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deep: a RecursionError, not a dead reader
        b"not json",
        b"\xff\xfe",
        pickle.dumps(("log", {"msg": "x"})),
        b'{"tag": "log"}',
        b'["call", 1, "shutdown"]',
        b'["call", true, "ready"]',
        b'["denied", "acme", "j1", "delete", "h:1"]',
        b'["log", "gateway.api", "30", "e", {}]',
        b'["log", "gateway.api", 30, "e", []]',
        b'["nope"]',
        b"[]",
    ],
)
def test_bad_frames_are_channel_errors(data: bytes) -> None:
    with pytest.raises(ChannelError):
        decode_from_api(data)


def test_log_lines_are_reduced_to_fixed_names_and_plain_bounded_fields() -> None:
    wire = [
        "log",
        "gateway.audit",
        99,
        "cross_tenant_denied %s",
        {
            "audit": True,
            "msg": "forged",
            "args": ["x"],
            "levelname": "CRITICAL",
            "tenant": "acme",
            "long": "x" * 10_000,
            "nested": {"a": 1},
            "BadName": 1,
            **{f"f{i}": i for i in range(50)},
        },
    ]
    line = decode_from_api(json.dumps(wire).encode())
    assert isinstance(line, LogLine)
    assert line.logger == "gateway.api"  # never gateway.audit
    assert line.event == "api_log"  # not a plain event name: replaced
    assert line.level == logging.CRITICAL
    for forged in ("audit", "msg", "args", "levelname", "nested", "BadName"):
        assert forged not in line.fields
    assert line.fields["tenant"] == "acme"
    assert len(str(line.fields["long"])) == 1024
    assert len(line.fields) <= 24


def test_every_message_round_trips() -> None:
    for message in (
        Started(),
        LogLine("gateway.http", 20, "http_started", {"port": 1}),
        Denied("acme", "j1", "cancel", "127.0.0.1:5"),
        Call(7, "metrics"),
    ):
        assert decode_from_api(encode_from_api(message)) == message


async def test_oversized_frame_closes_the_channel() -> None:
    ours, theirs = socket.socketpair()
    gateway_end = await open_channel(ours, "gateway")
    try:
        theirs.sendall(struct.pack(">I", MAX_FRAME_FROM_API + 1))
        with pytest.raises(ChannelError):
            await gateway_end.receive()
        assert gateway_end.closed
    finally:
        theirs.close()
        await gateway_end.close()


async def test_results_to_a_reader_that_stalls_are_dropped_not_buffered() -> None:
    ours, theirs = socket.socketpair()
    gateway_end = await open_channel(ours, "gateway")
    try:
        status = JobStatus("acme", "j", Status.SUCCEEDED, 1, "t")
        for _ in range(200):  # 200 MiB offered to a process that reads nothing
            gateway_end.send(ResultReady(b"r" * 1024 * 1024, status), droppable=True)
        buffered = gateway_end._writer.transport.get_write_buffer_size()
        assert buffered < 16 * 1024 * 1024
        assert gateway_end.dropped > 150
    finally:
        theirs.close()
        await gateway_end.close()


async def test_a_bad_frame_gets_the_api_process_replaced(tmp_path: Path) -> None:
    # The channel reader survives a hostile frame and kills the process that sent it;
    # the supervisor then starts a new one (seen in test_api's restart test).
    api = Child(
        "HTTP API process",
        "api_process",
        "gateway.api",
        codec=codec("gateway"),
        channel_name="api",
        greeting=lambda: None,
        on_message=lambda _: None,
        tasks=Supervisor(),
        logger=logging.getLogger("test"),
        start_timeout_s=1.0,
        stop_timeout_s=1.0,
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    ours, theirs = socket.socketpair()
    channel = await open_channel(ours, "gateway")
    started = asyncio.Event()
    try:
        reader = asyncio.create_task(api._read(channel, proc, started))
        theirs.sendall(frame(b"[" * 50_000 + b"]" * 50_000))
        await asyncio.wait_for(reader, 10)  # the reader ends, it does not crash
        assert reader.exception() is None
        assert await asyncio.wait_for(proc.wait(), 10) != 0  # killed
    finally:
        theirs.close()
        await channel.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_denials_from_the_api_process_are_checked_against_the_catalog(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(tenants_dir=ROOT / "tenants", policies_dir=ROOT / "policies")
    catalog = load_catalog(settings.tenants_dir, settings.policies_dir)
    metrics = Metrics()
    api = ApiProcess(
        settings, lambda: catalog, ["echo"], answers={}, metrics=metrics, supervisor=Supervisor()
    )
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        api._denied(Denied("acme", "j1", "get", "127.0.0.1:9"))
        api._denied(Denied("nobody", "j1", "get", "127.0.0.1:9"))  # not a tenant: ignored
        api._denied(Denied("acme", "bad\nid", "get", "127.0.0.1:9"))  # not an id: ignored
    audits: list[Any] = [r for r in caplog.records if r.name == "gateway.audit"]
    assert len(audits) == 1
    assert audits[0].tenant == "acme"
    value = metrics.registry.get_sample_value(
        "gateway_cross_tenant_denials_total", {"tenant": "acme", "action": "get"}
    )
    assert value == 1
