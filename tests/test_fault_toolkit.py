"""The fault-injection toolkit (`tests/faults`): the proxy's faults against small local
targets, and the real Tansu and OpenBao behind it."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import signal
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from faults import (
    FaultProxy,
    ProxiedOpenBao,
    ProxiedTansu,
    kafka_brokers,
    revoke_tenant_tokens,
)

TIMEOUT_S = 5.0


# -- small local targets --------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        server = self.server
        with server.lock:
            server.connections += 1
        try:
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += len(data)
                self.request.sendall(data)
        except ConnectionResetError:
            with server.lock:
                server.resets += 1
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back; counts connections, bytes received and resets seen."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.lock = threading.Lock()
        self.connections = 0
        self.received = 0
        self.resets = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: HttpServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        with self.server.lock:
            self.server.requests += 1
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpServer(http.server.ThreadingHTTPServer):
    """Answers every GET and POST with 200 and a JSON body; counts requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HttpHandler)
        self.lock = threading.Lock()
        self.requests = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextlib.contextmanager
def serving(server: socketserver.TCPServer) -> Iterator[None]:
    """Serve on a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT_S)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    with serving(server):
        yield server


@pytest.fixture
def http_target() -> Iterator[HttpServer]:
    server = HttpServer()
    with serving(server):
        yield server


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as started:
        yield started


# -- client helpers -------------------------------------------------------------------


@contextlib.contextmanager
def connected(proxy: FaultProxy, timeout_s: float = TIMEOUT_S) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout_s)
    try:
        yield sock
    finally:
        sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        more = sock.recv(min(65536, size - len(data)))
        if not more:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += more
    return bytes(data)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def urlopen(request: str | urllib.request.Request, timeout_s: float = TIMEOUT_S) -> Any:
    """urllib's urlopen, for the tests' own http://127.0.0.1 URLs only."""
    return urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310  # loopback URLs


def poll(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(0.01)


def assert_reset(sock: socket.socket) -> None:
    """The peer reset the connection: recv raises ConnectionResetError."""
    with pytest.raises(ConnectionResetError):
        sock.recv(1)


def assert_gone(pid: int) -> None:
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# -- the proxy ------------------------------------------------------------------------


def test_forwards_both_ways_and_counts(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    results: list[bool] = []

    def client() -> None:
        with connected(proxy) as sock:
            results.append(roundtrip(sock, payload) == payload)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [True] * 4
    assert proxy.connections_total == 4
    assert proxy.bytes_up == proxy.bytes_down == 4 * len(payload)
    assert echo.received == 4 * len(payload)
    poll(lambda: proxy.connections_open == 0)


def test_forwards_a_half_close(proxy: FaultProxy) -> None:
    with connected(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server sees EOF, echoes, and closes
        assert recv_exactly(sock, 10) == b"last words"
        assert sock.recv(1) == b""


async def test_forwards_while_the_callers_loop_is_blocked(proxy: FaultProxy) -> None:
    # Blocking calls on the test's own event loop thread: the proxy has its own loop.
    with connected(proxy) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
    await asyncio.sleep(0)


def test_reset(proxy: FaultProxy, echo: EchoServer) -> None:
    with connected(proxy) as first, connected(proxy) as second:
        assert roundtrip(first, b"a") == b"a"
        assert roundtrip(second, b"b") == b"b"
        proxy.reset()
        assert proxy.connections_open == 0
        assert_reset(first)
        assert_reset(second)
        poll(lambda: echo.resets == 2)  # the target saw RST too
    with connected(proxy) as third:
        assert roundtrip(third, b"c") == b"c"
    assert proxy.connections_total == 3


def test_refuse_then_listen_again_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    with connected(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.refuse()
        assert_reset(sock)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
    proxy.refuse()  # idempotent
    proxy.refuse(False)
    assert proxy.port == port
    with connected(proxy) as sock:
        assert roundtrip(sock, b"y") == b"y"


def test_blackhole(proxy: FaultProxy, echo: EchoServer) -> None:
    with connected(proxy, timeout_s=0.5) as before:
        assert roundtrip(before, b"hello") == b"hello"
        received, connections, up = echo.received, echo.connections, proxy.bytes_up
        proxy.blackhole()
        before.sendall(b"x" * 10_000)
        with pytest.raises(TimeoutError):
            before.recv(1)
        with connected(proxy, timeout_s=0.5) as during:  # accepted...
            during.sendall(b"y" * 10_000)
            with pytest.raises(TimeoutError):  # ...and never answered
                during.recv(1)
            time.sleep(0.2)
            assert (echo.received, echo.connections, proxy.bytes_up) == (received, connections, up)
            assert proxy.connections_open == 2
            proxy.blackhole(False)  # their byte streams are broken: reset
            before.settimeout(TIMEOUT_S)
            during.settimeout(TIMEOUT_S)
            assert_reset(before)
            assert_reset(during)
    with connected(proxy) as after:
        assert roundtrip(after, b"back") == b"back"


def test_latency_delays_each_direction_in_order(proxy: FaultProxy) -> None:
    latency = 0.25
    with connected(proxy) as sock:
        assert roundtrip(sock, b"warm") == b"warm"
        proxy.latency(latency)
        started = time.monotonic()
        assert roundtrip(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 2 * latency  # up and down
        messages = [f"{i:04d}".encode() for i in range(200)]
        for message in messages:
            sock.sendall(message)
        assert recv_exactly(sock, 800) == b"".join(messages)
        proxy.latency(0)
        assert roundtrip(sock, b"fast") == b"fast"


def test_throttle_limits_bytes_per_second(proxy: FaultProxy, echo: EchoServer) -> None:
    rate, size = 40_000, 60_000
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    proxy.throttle(rate)
    with connected(proxy) as sock:
        started = time.monotonic()
        assert roundtrip(sock, payload) == payload
        assert time.monotonic() - started >= size / rate
        proxy.throttle(None)
        assert roundtrip(sock, payload) == payload
    assert echo.received == 2 * size


def test_http_error_answers_every_request(http_target: HttpServer) -> None:
    with FaultProxy("127.0.0.1", http_target.port) as proxy:
        url = f"http://{proxy.address}/v1/sys/health"
        kept = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT_S)
        try:
            kept.request("GET", "/first")
            assert kept.getresponse().read() == b'{"ok": true}'
            with urlopen(url, TIMEOUT_S) as response:
                assert response.status == 200
            served = http_target.requests

            proxy.http_error(503)
            with pytest.raises(urllib.error.HTTPError) as caught:
                urlopen(url, TIMEOUT_S)
            with caught.value:
                assert caught.value.code == 503
                assert caught.value.headers["Content-Type"] == "application/json"
                assert json.loads(caught.value.read()) == {"errors": ["injected fault"]}
            kept.request("GET", "/second")  # a kept-alive connection gets it too
            response = kept.getresponse()
            assert response.status == 503
            assert response.getheader("Connection") == "close"
            assert json.loads(response.read()) == {"errors": ["injected fault"]}
            post = urllib.request.Request(url, data=b"x" * 200_000, method="POST")
            with pytest.raises(urllib.error.HTTPError) as caught:
                urlopen(post, TIMEOUT_S)
            with caught.value:
                assert caught.value.code == 503
            assert http_target.requests == served  # nothing reached the target

            proxy.http_error(None)
            with urlopen(url, TIMEOUT_S) as response:
                assert response.status == 200
            assert http_target.requests == served + 1
        finally:
            kept.close()


def test_heal_clears_every_fault(proxy: FaultProxy) -> None:
    with connected(proxy) as sock:
        proxy.latency(5.0)
        proxy.throttle(1)
        proxy.http_error(500)
        proxy.blackhole()
        proxy.refuse()
        assert_reset(sock)
    proxy.heal()
    proxy.heal()  # idempotent
    with connected(proxy) as sock:
        assert roundtrip(sock, b"x" * 10_000) == b"x" * 10_000  # no delay of 5 s per chunk


def test_a_refusing_target_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = unused.getsockname()[1]
        with FaultProxy("127.0.0.1", port) as proxy, connected(proxy) as sock:
            assert_reset(sock)


def test_stop_resets_joins_and_is_idempotent(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    proxy.stop()  # not started: nothing to do
    proxy.start()
    proxy.start()  # idempotent
    port = proxy.port
    with connected(proxy) as sock:
        assert roundtrip(sock, b"x") == b"x"
        proxy.stop()
        assert_reset(sock)
    proxy.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("fault-proxy-")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
    with pytest.raises(RuntimeError, match="not running"):
        proxy.reset()
    with proxy, connected(proxy) as sock:  # started again, on the same port
        assert proxy.port == port
        assert roundtrip(sock, b"y") == b"y"
    assert not proxy.running


def test_rejects_bad_arguments(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="latency"):
        proxy.latency(-1)
    with pytest.raises(ValueError, match="throttle"):
        proxy.throttle(0)
    with pytest.raises(ValueError, match="status"):
        proxy.http_error(42)


# -- the real services ------------------------------------------------------------------


@pytest.mark.integration
async def test_tansu_through_the_proxy(tmp_path: Path) -> None:
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    with ProxiedTansu(tmp_path / "tansu.log") as tansu:
        pid = tansu.pid
        assert pid is not None
        # Even the broker's own port advertises the proxy: every client ends up there.
        assert kafka_brokers(f"127.0.0.1:{tansu.service_port}")[0][1:] == (
            "127.0.0.1",
            tansu.proxy.port,
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=tansu.bootstrap, request_timeout_ms=2000, retry_backoff_ms=100
        )
        await producer.start()
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"one"), 10)

            tansu.proxy.refuse()
            with pytest.raises((KafkaError, TimeoutError)):
                await asyncio.wait_for(producer.send_and_wait(topic, b"lost"), 8)

            tansu.proxy.heal()
            await asyncio.wait_for(producer.send_and_wait(topic, b"two"), 10)
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            bootstrap_servers=tansu.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            values: list[bytes] = []
            deadline = time.monotonic() + 10
            while b"two" not in values and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200)
                values += [r.value for rs in batches.values() for r in rs]
        finally:
            await consumer.stop()
        assert values[0] == b"one"
        assert b"two" in values
        assert tansu.proxy.connections_total > 0
    assert_gone(pid)


@pytest.mark.integration
def test_openbao_through_the_proxy(tmp_path: Path) -> None:
    with ProxiedOpenBao(tmp_path / "openbao.log") as bao:
        pid = bao.pid
        assert pid is not None
        health = f"{bao.addr}/v1/sys/health"
        with urlopen(health, TIMEOUT_S) as response:
            assert response.status == 200
        assert bao.client().is_authenticated()

        bao.proxy.http_error(503)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urlopen(health, TIMEOUT_S)
        with caught.value:
            assert caught.value.code == 503
            assert json.loads(caught.value.read()) == {"errors": ["injected fault"]}
        with pytest.raises(hvac.exceptions.VaultDown):
            bao.client().secrets.kv.v2.read_secret_version(
                path="anything", raise_on_deleted_version=True
            )
        assert bao.healthy(direct=True)
        bao.proxy.heal()
        assert bao.healthy()

        bao.freeze()
        assert bao.frozen
        started = time.monotonic()
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            urlopen(health, 1.0)
        assert time.monotonic() - started >= 0.9
        bao.thaw()
        assert bao.healthy(timeout_s=TIMEOUT_S)

        bao.freeze()  # stop() thaws before SIGTERM
    assert bao.returncode is not None
    assert bao.returncode != -signal.SIGKILL  # it ended on SIGTERM, not after the bound
    assert_gone(pid)


@pytest.mark.integration
def test_revoke_tenant_tokens(tmp_path: Path) -> None:
    with ProxiedOpenBao(tmp_path / "openbao.log") as bao:
        pid = bao.pid
        assert pid is not None
        admin = bao.client(direct=True)

        def mint(tenant: str, **extra: Any) -> str:
            """A tenant token minted as the gateway mints it (gateway/vault.py _mint)."""
            role = f"gateway-tenant-{tenant}"
            admin.auth.token.create_or_update_role(role, allowed_policies=[f"tenant-{tenant}"])
            response = admin.auth.token.create(
                role_name=role,
                policies=[f"tenant-{tenant}"],
                ttl="60s",
                renewable=True,
                display_name=f"tenant-{tenant}",
                meta={"tenant": tenant},
                **extra,
            )
            return str(response["auth"]["client_token"])

        acme = [mint("acme"), mint("acme")]
        by_name = admin.auth.token.create(display_name="tenant-acme", ttl="60s")
        by_meta = admin.auth.token.create(meta={"tenant": "acme"}, ttl="60s")
        acme += [by_name["auth"]["client_token"], by_meta["auth"]["client_token"]]
        others = [mint("acme-2"), mint("acm")]

        assert revoke_tenant_tokens(admin, "acme") == 4
        for token in acme:
            assert not hvac.Client(url=bao.addr, token=token, timeout=5).is_authenticated()
        for token in others:
            assert hvac.Client(url=bao.addr, token=token, timeout=5).is_authenticated()
        assert admin.is_authenticated()
        assert revoke_tenant_tokens(bao.client(), "acme") == 0  # through the proxy too
    assert_gone(pid)
