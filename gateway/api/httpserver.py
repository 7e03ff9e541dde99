"""uvicorn on the running event loop, with the caller owning signals and logging.

The gateway binds the listening sockets itself (`gateway.api.supervisor.bind`: a taken
port is a clear error at start, and port 0 is known at once) and hands them to the API
process, which runs one `HttpServer` per socket on its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from gateway.errors import ConfigError
from gateway.settings import HttpSettings
from gateway.tasks import Supervisor

__all__ = ["HttpServer"]

log = logging.getLogger("gateway.http")

_STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the SIGTERM/SIGINT handlers and re-raise the signal when
        # it stops; the process serving the API handles both itself and stops the
        # server in its own shutdown order.
        yield


async def _serve(server: _Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits with SystemExit on startup errors
        raise ConfigError("the HTTP server exited") from exc


class HttpServer:
    """Serves an ASGI app on a bound socket from the running loop until `stop()`."""

    def __init__(
        self, app: ASGIApp, settings: HttpSettings, supervisor: Supervisor, *, name: str = "http"
    ) -> None:
        self.app = app
        self._settings = settings
        self._supervisor = supervisor
        self._name = name
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (see `bind`); returns once the server accepts connections."""
        settings = self._settings
        config = uvicorn.Config(
            self.app,
            # httptools (C parser): h11's pure-Python parsing would be most of a
            # request's CPU.
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            # No Date or Server header: answers that must be byte-identical stay so.
            date_header=False,
            server_header=False,
            # The audit log records the peer address; a client must not be able to set it.
            proxy_headers=False,
            limit_concurrency=settings.max_connections,
            timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        )
        server = _Server(config)
        self._server = server
        # Supervised: a server that stops serving on its own ends the API process, and
        # the gateway starts a new one.
        self._task = self._supervisor.spawn(_serve(server, sock), f"gateway:{self._name}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT_S
        while not server.started:
            if self._task.done() or loop.time() > deadline:
                await self.stop()
                raise ConfigError("HTTP API did not start")
            await asyncio.sleep(0.01)
        self.port = int(sock.getsockname()[1])
        host = sock.getsockname()[0]
        log.info(f"{self._name}_started", extra={"host": host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, let requests under way finish (bounded), close; idempotent."""
        server, self._server = self._server, None
        task, self._task = self._task, None
        if server is None or task is None:
            return
        self._supervisor.release(task)
        server.should_exit = True  # read by the server's own loop every 0.1 s
        done, _ = await asyncio.wait({task}, timeout=self._settings.shutdown_timeout_s + 1.0)
        if not done:
            server.force_exit = True
            done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()
        log.info(f"{self._name}_stopped", extra={"clean": bool(done)})
