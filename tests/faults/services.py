"""Real Tansu (Kafka) and OpenBao (Vault) processes reachable only through a `FaultProxy`.

`ProxiedTansu` listens on one loopback port and advertises the proxy's port in its
metadata, so every Kafka client (whatever address it bootstraps from) ends up talking
to the broker through the proxy. `ProxiedOpenBao` is a dev-mode OpenBao whose `addr`
is the proxy's; `direct_addr` bypasses the proxy (for set-up and checks while a fault
is on), and `freeze()` / `thaw()` stop and continue the process (SIGSTOP / SIGCONT).

Both are started from the binaries of the dev extra (found through
`gateway.dev.services`), log to a file, are stopped by PID (SIGTERM, then SIGKILL after a
bound) and die with the thread that started them (PR_SET_PDEATHSIG), so a crashed
test leaves nothing behind. Start them from a thread that lives as long as they should
(the test's main thread): the kernel sends the signal when the *thread* that forked
them ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import hvac
import hvac.exceptions
import psutil

from gateway.dev.services import OpenBao, Tansu, free_port

from .proxy import FaultProxy

__all__ = [
    "FaultServiceError",
    "ProxiedOpenBao",
    "ProxiedTansu",
    "kafka_brokers",
    "revoke_tenant_tokens",
]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


class FaultServiceError(RuntimeError):
    """A proxied service did not start (the message carries its log's tail)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tcp_ready(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("connection closed mid-response")
        data += more
    return bytes(data)


def kafka_brokers(address: str, timeout_s: float = 2.0) -> list[tuple[int, str, int]]:
    """The brokers (node id, host, port) a Kafka broker at `HOST:PORT` advertises.

    One raw Metadata v1 request for no topics over a plain socket: no client library,
    no event loop, so it works from any thread. Raises OSError (or ConnectionError,
    TimeoutError) when the broker does not answer.
    """
    host, _, port = address.rpartition(":")
    client_id = b"fault-toolkit"
    correlation_id = 1
    request = (
        struct.pack(">hhih", 3, 1, correlation_id, len(client_id))  # Metadata v1 header
        + client_id
        + struct.pack(">i", 0)  # topics: an empty array (none), not null (all)
    )
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        payload = _recv_exact(sock, size)
    got_id, count = struct.unpack_from(">ii", payload, 0)
    if got_id != correlation_id:
        raise ConnectionError(f"kafka metadata: correlation id {got_id} != {correlation_id}")
    offset = 8
    brokers = []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", payload, offset)
        offset += 6
        broker_host = payload[offset : offset + host_len].decode()
        offset += host_len
        broker_port, rack_len = struct.unpack_from(">ih", payload, offset)
        offset += 6 + max(rack_len, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


class _ProxiedProcess:
    """A service process (stopped by PID) behind a `FaultProxy` on its port."""

    name = "service"

    def __init__(self, log_path: Path, *, service_port: int | None, listen_port: int) -> None:
        self.log_path = log_path
        self.service_port = service_port or free_port()
        self.proxy = FaultProxy("127.0.0.1", self.service_port, listen_port=listen_port)
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None  # the process's exit status once stopped

    @property
    def pid(self) -> int | None:
        """PID of the running service process."""
        return self._proc.pid if self._proc is not None else None

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(  # argv: our own binary, fixed flags
                list(argv),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent,  # only prctl, no locks taken
            )
        finally:
            log_file.close()

    def _failed(self, why: str) -> FaultServiceError:
        """Stop everything and describe the failure with the log's tail."""
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        return FaultServiceError(f"{self.name}: {why}; log tail:\n{tail}")

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise self._failed(f"exited with {self._proc.returncode}")

    def _before_stop(self, pid: int) -> None:
        """Hook: runs before the process is signalled."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the proxy and the process by PID (SIGTERM, then SIGKILL after
        `timeout_s`); idempotent. `returncode` tells how it ended (-9: killed)."""
        self.proxy.stop()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._before_stop(proc.pid)
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self.returncode = proc.returncode

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:  # pragma: no cover - overridden
        """Start the process and the proxy, and wait until it answers through the proxy."""
        raise NotImplementedError


class ProxiedTansu(_ProxiedProcess):
    """A Tansu broker (memory storage) that clients reach only through `proxy`.

    The broker listens on `service_port` but advertises `proxy.port`, so a client
    that bootstraps from `bootstrap` (or even from the broker's own port) is sent to
    the proxy for every later request.
    """

    name = "tansu"

    def __init__(
        self, log_path: Path, *, broker_port: int | None = None, listen_port: int = 0
    ) -> None:
        super().__init__(log_path, service_port=broker_port, listen_port=listen_port)

    @property
    def bootstrap(self) -> str:
        """Bootstrap address for clients: the proxy's `127.0.0.1:PORT`."""
        return self.proxy.address

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the proxy and the broker; returns once the broker answers a metadata
        request through the proxy and advertises the proxy's port."""
        if self._proc is not None:
            return
        self.proxy.start()
        self._spawn(
            [
                str(Tansu.binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.service_port}",
                "--advertised-listener-url",
                f"tcp://{self.proxy.address}",
                "--storage-engine",
                "memory://tansu/",
            ]
        )
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            if _tcp_ready(self.service_port):
                try:
                    brokers = kafka_brokers(self.bootstrap, timeout_s=1.0)
                except OSError:
                    pass
                else:
                    if [(h, p) for _, h, p in brokers] != [("127.0.0.1", self.proxy.port)]:
                        raise self._failed(f"advertises {brokers}, not the proxy")
                    return
            if time.monotonic() > deadline:
                raise self._failed(f"no metadata through the proxy within {timeout_s}s")
            time.sleep(_POLL_S)


class ProxiedOpenBao(_ProxiedProcess):
    """A dev-mode OpenBao (in memory, unsealed, known root token) behind `proxy`."""

    name = "openbao"

    def __init__(
        self,
        log_path: Path,
        *,
        root_token: str | None = None,
        bao_port: int | None = None,
        listen_port: int = 0,
    ) -> None:
        super().__init__(log_path, service_port=bao_port, listen_port=listen_port)
        self.root_token = root_token or f"root-{secrets.token_hex(16)}"
        self._frozen = False

    @property
    def addr(self) -> str:
        """Vault address for clients: `http://` and the proxy's address."""
        return f"http://{self.proxy.address}"

    @property
    def direct_addr(self) -> str:
        """OpenBao's own address, bypassing the proxy."""
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def frozen(self) -> bool:
        """True between `freeze()` and `thaw()`."""
        return self._frozen

    def client(self, *, direct: bool = False, timeout: int = 5) -> hvac.Client:
        """An hvac client with the root token, through the proxy unless `direct`."""
        url = self.direct_addr if direct else self.addr
        return hvac.Client(url=url, token=self.root_token, timeout=timeout)

    def healthy(self, *, direct: bool = False, timeout_s: float = 0.5) -> bool:
        """True when `/v1/sys/health` answers initialised and unsealed."""
        url = f"{self.direct_addr if direct else self.addr}/v1/sys/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310  # fixed http://127.0.0.1 URL
                body: dict[str, Any] = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(body.get("initialized")) and not body.get("sealed", True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the proxy and OpenBao; returns once it is healthy through the proxy."""
        if self._proc is not None:
            return
        self.proxy.start()
        self._spawn(
            [
                str(OpenBao.binary()),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.service_port}",
                f"-dev-root-token-id={self.root_token}",
                "-dev-no-store-token",
            ],
            env={"BAO_ADDR": self.direct_addr, "HOME": str(self.log_path.parent)},
        )
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._failed(f"not healthy through the proxy within {timeout_s}s")
            time.sleep(_POLL_S)

    def freeze(self, timeout_s: float = 5.0) -> None:
        """SIGSTOP the process; returns once it is stopped. Connections stay open and
        requests hang (the kernel still accepts connections into the listen backlog)."""
        pid = self._running_pid()
        os.kill(pid, signal.SIGSTOP)
        self._frozen = True
        self._wait_status(pid, stopped=True, timeout_s=timeout_s)

    def thaw(self, timeout_s: float = 5.0) -> None:
        """SIGCONT the process; returns once it runs again; idempotent."""
        if self._frozen and self._proc is not None:
            self._continue(self._proc.pid, timeout_s)
        self._frozen = False

    def _continue(self, pid: int, timeout_s: float) -> None:
        os.kill(pid, signal.SIGCONT)
        self._frozen = False
        self._wait_status(pid, stopped=False, timeout_s=timeout_s)

    def _before_stop(self, pid: int) -> None:
        if self._frozen:  # a stopped process would not act on SIGTERM
            self._continue(pid, timeout_s=5.0)

    def _running_pid(self) -> int:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("openbao is not running")
        return self._proc.pid

    @staticmethod
    def _wait_status(pid: int, *, stopped: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        process = psutil.Process(pid)
        while (process.status() == psutil.STATUS_STOPPED) != stopped:
            if time.monotonic() > deadline:
                state = "stop" if stopped else "continue"
                raise RuntimeError(f"openbao (pid {pid}) did not {state} within {timeout_s}s")
            time.sleep(0.01)


def _data(response: dict[str, Any] | Any) -> dict[str, Any]:
    """The `data` of an hvac JSON response ({} when there is none)."""
    if isinstance(response, dict):
        data = response.get("data")
        if isinstance(data, dict):
            return data
    return {}


def _belongs_to(token: dict[str, Any], tenant: str) -> bool:
    """True when a token's metadata or display name says it is `tenant`'s. Vault
    prefixes the display name given at creation with `token-`; both forms match."""
    meta = token.get("meta") or {}
    if isinstance(meta, dict) and meta.get("tenant") == tenant:
        return True
    return token.get("display_name") in {f"tenant-{tenant}", f"token-tenant-{tenant}"}


def revoke_tenant_tokens(admin: hvac.Client, tenant: str) -> int:
    """Revoke every token that is `tenant`'s (metadata `tenant`, or display name
    `tenant-{tenant}` as the gateway mints them); how many were revoked.

    Lists accessors (`LIST auth/token/accessors`, needs sudo, e.g. the root token),
    looks each one up, and revokes matches by accessor (children go with them). The
    admin's own token is never revoked; tokens that expire meanwhile are skipped.
    """
    own = _data(admin.read("auth/token/lookup-self")).get("accessor")
    accessors = _data(admin.list("auth/token/accessors")).get("keys") or []
    revoked = 0
    for accessor in accessors:
        if accessor == own:
            continue
        try:
            token = _data(
                admin.write_data("auth/token/lookup-accessor", data={"accessor": accessor})
            )
            if not _belongs_to(token, tenant):
                continue
            admin.write_data("auth/token/revoke-accessor", data={"accessor": accessor})
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            continue  # expired or revoked since it was listed
        revoked += 1
    return revoked
