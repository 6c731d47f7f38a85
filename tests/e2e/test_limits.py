"""End to end: connection, handshake-rate and message-rate limits, through a real proxy on loopback.

Configs are YAML files in ``tmp_path`` loaded with ``load_config``; the proxy
runs in-process (``App``). Clients are raw sockets that can be bound to a
chosen source address before they connect (127.0.0.2, 127.0.0.3: all of
127/8 is loopback), so per-IP limits are tested with real distinct peers; a
``proxy_protocol: v1`` listener lets one test claim thousands of client
addresses cheaply. Raw peers use the small frame codec below, not the
proxy's, so a bug in ``proto.frames`` cannot hide itself.

What is not here: Origin and credentials (``test_auth.py``), the pure token
bucket and client table (``tests/proto/test_limits.py``).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed, WebSocketRequest, open_websocket_url, serve_websocket

from tests.kit.wait import until
from tests.kit.ws import Frame, OP_CLOSE, OP_TEXT, accept_for, frame, read_frame
from wsproxy.app import App
from wsproxy.config.load import load_config
from wsproxy.config.schema import Config
from wsproxy.proto.limits import ClientTable

#: Bound on every test.
TEST_TIMEOUT_S = 10.0


def keep_proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")


# --- config and proxy -----------------------------------------------------------------------


def load(tmp_path: Path, backend_port: int, limits: dict[str, Any], *, proxy_protocol: bool = False) -> Config:
    """Listener "edge" (and "lb", PROXY protocol v1, when asked), route /chat → pool main."""
    listeners: list[dict[str, Any]] = [{"name": "edge", "bind": "127.0.0.1:0"}]
    if proxy_protocol:
        listeners.append({"name": "lb", "bind": "127.0.0.1:0", "proxy_protocol": "v1"})
    document = {
        "listeners": listeners,
        "pools": {"main": {"backends": [{"address": f"127.0.0.1:{backend_port}"}]}},
        "routes": [{"path": "/chat", "pool": "main"}],
        "limits": limits,
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(str(path))


async def run_proxy(nursery: trio.Nursery, app: App) -> dict[str, int]:
    """Serve ``app``; its listeners' ports by name."""
    addresses = await nursery.start(app.serve)
    return {name: bound[0][1] for name, bound in addresses.items()}


async def read_until_close(stream: trio.abc.ReceiveStream, buf: bytearray) -> tuple[list[Frame], Frame | None]:
    """Frames up to the first close frame, and that frame (None if EOF came first)."""
    seen: list[Frame] = []
    while (got := await read_frame(stream, buf)) is not None:
        if got.opcode == OP_CLOSE:
            return seen, got
        seen.append(got)
    return seen, None


def header_values(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.partition(b":")[2].strip()
        for line in head.split(b"\r\n")[1:]
        if line.partition(b":")[0].strip().lower() == name.lower()
    ]


async def read_head(stream: trio.abc.ReceiveStream, buf: bytearray) -> bytes | None:
    """An HTTP head off ``stream`` (what follows stays in ``buf``); None at EOF."""
    while b"\r\n\r\n" not in buf:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


# --- clients ----------------------------------------------------------------------------


async def connect_from(port: int, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the proxy, from ``source`` (bound before connect) when given."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def upgrade_request(target: str = "/chat") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def proxy_line(client_ip: str) -> bytes:
    return f"PROXY TCP4 {client_ip} 127.0.0.1 1234 80\r\n".encode()


@dataclass
class Client:
    """A raw WebSocket client after its handshake (or the refusal it got)."""

    stream: trio.SocketStream
    status: int
    head: bytes
    body: bytes = b""
    buf: bytearray = field(default_factory=bytearray)

    def header(self, name: str) -> list[bytes]:
        return header_values(self.head, name.encode())

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(frame(OP_TEXT, text.encode(), mask=True))

    async def echo(self, text: str) -> None:
        await self.send_text(text)
        got = await read_frame(self.stream, self.buf)
        assert got is not None and (got.opcode, got.payload) == (OP_TEXT, text.encode()), got

    async def aclose(self) -> None:
        await self.stream.aclose()


async def handshake(port: int, *, source: str | None = None, target: str = "/chat", prefix: bytes = b"") -> Client:
    """Connect (from ``source``), send ``prefix`` + an upgrade; a 101 keeps the stream open,
    anything else is read to its end and the stream closed."""
    stream = await connect_from(port, source)
    await stream.send_all(prefix + upgrade_request(target))
    buf = bytearray()
    head = await read_head(stream, buf)
    assert head is not None, "the proxy closed without answering"
    client = Client(stream, int(head.split(b" ", 2)[1]), head, buf=buf)
    if client.status != 101:
        (length,) = client.header("Content-Length")
        while len(client.buf) < int(length):
            data = await stream.receive_some(65536)
            assert data, "the proxy closed inside the body"
            client.buf += data
        client.body = bytes(client.buf)
        await stream.aclose()
    return client


async def admitted(port: int, **kw: Any) -> Client:
    client = await handshake(port, **kw)
    assert client.status == 101, (client.head, client.body)
    return client


def refused(caplog: pytest.LogCaptureFixture, status: int) -> list[str]:
    return [m for m in (r.getMessage() for r in caplog.records) if "event=refused" in m and f"status={status} " in m]


# --- backends -----------------------------------------------------------------------------


async def echo_handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


async def start_ws_backend(nursery: trio.Nursery, handler: Callable[[WebSocketRequest], Awaitable[None]] = echo_handler) -> int:
    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return int(server.port)


# --- 1. connection limits -----------------------------------------------------------------


async def test_max_connections_refuses_the_third_with_503_and_keeps_the_first_two(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep_proxy_log(caplog)
    with trio.fail_after(TEST_TIMEOUT_S):
        backend = await start_ws_backend(nursery)
        app = App(load(tmp_path, backend, {"max_connections": 2}))
        port = (await run_proxy(nursery, app))["edge"]
        first, second = await admitted(port), await admitted(port)
        third = await handshake(port, source="127.0.0.2")  # the limit is the process's, not per address
        assert third.status == 503
        assert third.header("Retry-After") == [b"1"]
        assert third.body == b"Service Unavailable\n"
        assert any("connection limit reached" in line for line in refused(caplog, 503))
        for i in range(3):
            await first.echo(f"first {i}")
            await second.echo(f"second {i}")
        await first.aclose()
        await until(lambda: app.connection_count == 1, what="the first session to end")
        again = await admitted(port)
        await again.echo("room again")
        await second.echo("second still")
        await again.aclose()
        await second.aclose()


async def test_max_connections_per_ip_is_per_source_address(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep_proxy_log(caplog)
    with trio.fail_after(TEST_TIMEOUT_S):
        backend = await start_ws_backend(nursery)
        app = App(load(tmp_path, backend, {"max_connections_per_ip": 1}))
        port = (await run_proxy(nursery, app))["edge"]
        held = await admitted(port, source="127.0.0.1")
        second = await handshake(port, source="127.0.0.1")
        assert second.status == 429
        assert second.body == b"Too Many Requests\n"
        assert any("too many connections from 127.0.0.1" in line for line in refused(caplog, 429))
        other = await admitted(port, source="127.0.0.2")
        await other.echo("from 127.0.0.2")
        await held.echo("from 127.0.0.1")
        await held.aclose()
        await until(lambda: app.clients.connections("127.0.0.1") == 0, what="127.0.0.1's session to end")
        back = await admitted(port, source="127.0.0.1")
        await back.echo("127.0.0.1 again")
        await back.aclose()
        await other.aclose()


async def test_handshake_rate_per_ip(nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keep_proxy_log(caplog)
    with trio.fail_after(TEST_TIMEOUT_S):
        backend = await start_ws_backend(nursery)
        app = App(load(tmp_path, backend, {"handshake_rate_per_ip": {"rate": "2/s", "burst": 2}}))
        port = (await run_proxy(nursery, app))["edge"]
        for _ in range(2):
            await (await admitted(port, source="127.0.0.1")).aclose()
        third = await handshake(port, source="127.0.0.1")
        assert third.status == 429
        assert third.header("Retry-After") == [b"1"]  # 0.5 s to the next token, rounded up
        assert any("handshake rate from 127.0.0.1" in line for line in refused(caplog, 429))
        # Another address has a bucket of its own.
        await (await admitted(port, source="127.0.0.3")).aclose()
        await trio.sleep(0.55)  # one token back at 2/s
        await (await admitted(port, source="127.0.0.1")).aclose()
        assert (await handshake(port, source="127.0.0.1")).status == 429  # and only one


# --- 2. message rate ------------------------------------------------------------------------

MESSAGE_RATE = {"max_message_rate": {"rate": "10/s", "burst": 5}}


@dataclass
class Sessions:
    """What a recording trio-websocket backend saw on each connection."""

    received: dict[str, list[str]] = field(default_factory=dict)  # by request path
    closes: dict[str, int] = field(default_factory=dict)


async def start_recording_ws_backend(nursery: trio.Nursery) -> tuple[int, Sessions]:
    """Records messages and the close code by path; echoes only messages starting with "echo"."""
    sessions = Sessions()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        got = sessions.received.setdefault(request.path, [])
        try:
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                got.append(message)
                if message.startswith("echo"):
                    await ws.send_message(message)
        except ConnectionClosed as exc:
            assert exc.reason is not None
            sessions.closes[request.path] = exc.reason.code

    return await start_ws_backend(nursery, handler), sessions


async def slow_session(port: int, path: str, count: int = 8, interval_s: float = 0.15) -> None:
    """A trio-websocket client at ~6.7 messages/s, well under 10/s: every echo comes back."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}{path}") as ws:
        for i in range(count):
            await ws.send_message(f"echo {i}")
            assert await ws.get_message() == f"echo {i}"
            await trio.sleep(interval_s)


async def test_client_over_the_message_rate_gets_1008_and_the_backend_1001(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep_proxy_log(caplog)
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, sessions = await start_recording_ws_backend(nursery)
        port = (await run_proxy(nursery, App(load(tmp_path, backend, MESSAGE_RATE))))["edge"]
        async with trio.open_nursery() as clients:
            clients.start_soon(slow_session, port, "/chat/slow")
            await trio.sleep(0.2)
            burst = await admitted(port, target="/chat/burst")
            await burst.stream.send_all(b"".join(frame(OP_TEXT, b"burst %d" % i, mask=True) for i in range(50)))
            before, close = await read_until_close(burst.stream, burst.buf)
            assert before == []  # nothing is echoed to "burst" messages
            assert close is not None and close.code == 1008, close
            assert not close.masked
            await burst.stream.send_all(frame(OP_CLOSE, close.payload[:2], mask=True))
            await burst.aclose()
        await until(lambda: "/chat/burst" in sessions.closes, what="the backend to see the burst session close")
    assert sessions.closes["/chat/burst"] == 1001
    assert 5 <= len(sessions.received["/chat/burst"]) <= 50
    assert sessions.received["/chat/slow"] == [f"echo {i}" for i in range(8)]
    assert "/chat/slow" not in sessions.closes or sessions.closes["/chat/slow"] == 1000
    closes = [m for m in (r.getMessage() for r in caplog.records) if "event=close " in m and "message rate" in m]
    assert len(closes) == 1, closes


async def start_flooding_backend(nursery: trio.Nursery) -> tuple[int, list[Frame]]:
    """A raw backend: on /chat/flood its 101 comes with 50 text frames, then it records the
    frames it gets up to a close; on any other path it echoes. Closes are answered."""
    from_proxy: list[Frame] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            head = await read_head(stream, buf)
            if head is None:
                return
            flood = head.startswith(b"GET /chat/flood ")
            (key,) = header_values(head, b"sec-websocket-key")
            answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            answer += b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
            if flood:
                answer += b"".join(frame(OP_TEXT, b"flood %d" % i, mask=False) for i in range(50))
            await stream.send_all(answer)
            while (got := await read_frame(stream, buf)) is not None:
                if flood:
                    from_proxy.append(got)
                if got.opcode == OP_CLOSE:
                    await stream.send_all(frame(OP_CLOSE, got.payload[:2], mask=False))
                    return
                if got.opcode == OP_TEXT:
                    await stream.send_all(frame(OP_TEXT, got.payload, mask=False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1]), from_proxy


async def test_backend_over_the_message_rate_gets_1008_and_the_client_1014(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep_proxy_log(caplog)
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, from_proxy = await start_flooding_backend(nursery)
        port = (await run_proxy(nursery, App(load(tmp_path, backend, MESSAGE_RATE))))["edge"]
        async with trio.open_nursery() as clients:
            clients.start_soon(slow_session, port, "/chat/calm")
            await trio.sleep(0.2)
            flooded = await admitted(port, target="/chat/flood")
            before, close = await read_until_close(flooded.stream, flooded.buf)
            assert close is not None and close.code == 1014, close  # a backend fault: the failure code
            assert not close.masked
            assert 5 <= len(before) <= 50
            assert [f.payload for f in before] == [b"flood %d" % i for i in range(len(before))]
            await flooded.stream.send_all(frame(OP_CLOSE, close.payload[:2], mask=True))
            await flooded.aclose()
        await until(lambda: any(f.opcode == OP_CLOSE for f in from_proxy), what="the backend to get a close")
    backend_close = next(f for f in from_proxy if f.opcode == OP_CLOSE)
    assert backend_close.code == 1008
    assert backend_close.masked  # RFC 6455 §5.1: towards a server the proxy is a client
    assert [m for m in (r.getMessage() for r in caplog.records) if "event=close " in m and "message rate" in m]


# --- 3. the per-IP table under a flood of addresses ----------------------------------------------


def flood_address(i: int) -> str:
    return f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"


async def test_per_ip_table_stays_bounded_under_a_flood_of_addresses(nursery: trio.Nursery, tmp_path: Path) -> None:
    """2,000 distinct client addresses (claimed through PROXY v1) with the handshake rate
    limit on: the table never holds more than its ``max_entries``, and limits still work."""
    max_entries, flood = 100, 2000
    with trio.fail_after(30):
        backend = await start_ws_backend(nursery)
        limits = {"max_connections_per_ip": 1, "handshake_rate_per_ip": {"rate": "1/m", "burst": 2}}
        app = App(load(tmp_path, backend, limits, proxy_protocol=True))
        app.clients = ClientTable(max_entries=max_entries)
        ports = await run_proxy(nursery, app)
        lb = ports["lb"]

        largest = 0
        statuses: dict[int, int] = {}

        async def watch() -> None:
            nonlocal largest
            while True:
                largest = max(largest, len(app.clients))
                await trio.sleep(0.001)

        addresses = iter(range(1, flood + 1))

        async def worker() -> None:
            for i in addresses:  # one shared iterator: each address is used once
                # Refused at routing (404): admission, and so the table entry, comes first.
                client = await handshake(lb, target="/elsewhere", prefix=proxy_line(flood_address(i)))
                statuses[client.status] = statuses.get(client.status, 0) + 1

        async with trio.open_nursery() as inner:
            inner.start_soon(watch)
            async with trio.open_nursery() as workers:
                for _ in range(32):
                    workers.start_soon(worker)
            inner.cancel_scope.cancel()

        assert statuses == {404: flood}
        assert largest <= max_entries, largest
        assert largest >= max_entries * 9 // 10, f"the flood never filled the table ({largest})"
        assert len(app.clients) <= max_entries
        assert flood_address(1) not in app.clients  # the oldest was evicted

        # The handshake rate limit still works for a new address...
        lone = "10.255.0.1"
        for _ in range(2):
            await (await admitted(lb, prefix=proxy_line(lone))).aclose()
            # max_connections_per_ip is 1: let the proxy see the session end first.
            await until(lambda: app.clients.connections(lone) == 0, what="the session to end")
        limited = await handshake(lb, prefix=proxy_line(lone))
        assert limited.status == 429
        assert int(limited.header("Retry-After")[0]) >= 1
        # ...and so does the per-IP connection limit.
        busy = "10.255.0.2"
        held = await admitted(lb, prefix=proxy_line(busy))
        assert (await handshake(lb, prefix=proxy_line(busy))).status == 429
        other = await admitted(lb, prefix=proxy_line("10.255.0.3"))
        await held.echo("held")
        await other.echo("other")
        # The plain listener's peer (127.0.0.1) is just another address.
        await (await admitted(ports["edge"])).aclose()
        assert len(app.clients) <= max_entries
        await held.aclose()
        await other.aclose()
