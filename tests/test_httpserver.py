"""The embedded HTTP server: a taken port is a clear error, signals stay the gateway's."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.api.httpserver import HttpServer
from gateway.api.supervisor import bind
from gateway.errors import ConfigError
from gateway.settings import HttpSettings
from gateway.tasks import Supervisor


async def hello(_: Request) -> PlainTextResponse:
    return PlainTextResponse("hi")


APP = Starlette(routes=[Route("/", hello)])


async def test_taken_port_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            bind("127.0.0.1", port)


async def test_free_port_serves_and_signal_handlers_stay() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = HttpServer(APP, HttpSettings(port=0), Supervisor())
    await server.start(bind("127.0.0.1", 0))
    try:
        assert server.port
        assert {sig: signal.getsignal(sig) for sig in before} == before
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/")
        assert response.text == "hi"
        assert "date" not in response.headers
        assert "server" not in response.headers
    finally:
        await server.stop()
        await server.stop()  # idempotent
    assert {sig: signal.getsignal(sig) for sig in before} == before
