"""In-process proxies and real backends on loopback, for tests that run the proxy for real.

Everything here starts real servers on 127.0.0.1 with port 0 inside a nursery
the test owns, so each test cleans up after itself when its nursery ends.
What is not here: the proxy as a process (``tests.kit.process``) and raw
WebSocket peers (``tests.kit.ws``).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import websockets.sync.server
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from wsproxy.app import App
from wsproxy.edge.contexts import load_checked
from wsproxy.config.schema import (
    Address,
    BackendConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    PoolConfig,
    PoolName,
    ListenerName,
    RouteConfig,
    TimeoutsConfig,
)


def make_config(
    backend_ports: list[int],
    *,
    routes: tuple[RouteConfig, ...] | None = None,
    timeouts: TimeoutsConfig | None = None,
    limits: LimitsConfig | None = None,
    extra_pools: dict[str, list[int]] | None = None,
) -> Config:
    """A one-listener config (port 0) with pool "main" over ``backend_ports``."""
    pools = {PoolName("main"): PoolConfig(
        name=PoolName("main"),
        backends=tuple(BackendConfig(address=Address("127.0.0.1", p)) for p in backend_ports),
    )}
    for name, ports in (extra_pools or {}).items():
        pools[PoolName(name)] = PoolConfig(
            name=PoolName(name), backends=tuple(BackendConfig(address=Address("127.0.0.1", p)) for p in ports)
        )
    return Config(
        source="<test>",
        listeners=(ListenerConfig(name=ListenerName("test"), bind=Address("127.0.0.1", 0)),),
        routes=routes or (RouteConfig(pool=PoolName("main")),),
        pools=pools,
        timeouts=timeouts or TimeoutsConfig(),
        limits=limits or LimitsConfig(),
    )


def with_timeouts(config: Config, **changes: float) -> Config:
    return dataclasses.replace(config, timeouts=dataclasses.replace(config.timeouts, **changes))


async def start_proxy(nursery: trio.Nursery, config: Config) -> tuple[App, int]:
    """Run an App in ``nursery``; return it and its listening port."""
    app = App(config)
    addresses = await nursery.start(app.serve)
    return app, addresses["test"][0][1]


async def echo_handler(request: WebSocketRequest) -> None:
    """A trio-websocket echo backend: every message back as it came."""
    ws = await request.accept(subprotocol=request.proposed_subprotocols[0] if request.proposed_subprotocols else None)
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


async def start_ws_backend(
    nursery: trio.Nursery, handler: Callable[[WebSocketRequest], Awaitable[None]] = echo_handler
) -> int:
    """A trio-websocket server on 127.0.0.1; returns its port."""
    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return int(server.port)


async def start_tcp_backend(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """A raw TCP server on 127.0.0.1 running ``handler`` per connection (misbehaving backends)."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_request(port: int, data: bytes, *, read_timeout_s: float = 5.0) -> bytes:
    """Send raw bytes to ``port`` and read until the server closes (or the timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.move_on_after(read_timeout_s):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(response.split(b" ", 2)[1])


@contextmanager
def websockets_backend(handler: Callable[[Any], None], **kw: Any) -> Iterator[int]:
    """A ``websockets`` sync server on 127.0.0.1 port 0, served from a thread."""
    server = websockets.sync.server.serve(handler, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.socket.getsockname()[1])
    finally:
        server.shutdown()
        thread.join(5)


def simple_config(
    backend_ports: Sequence[int],
    *,
    listener: str = "",
    pool: str = "",
    top: str = "",
    handshake: str = "5s",
) -> str:
    """One listener "public" on 127.0.0.1:0 (``listener`` adds keys to it), one route to pool "main"."""
    backends = "\n".join(f"      - address: 127.0.0.1:{p}" for p in backend_ports)
    return (
        "listeners:\n"
        "  - name: public\n"
        "    bind: 127.0.0.1:0\n"
        f"{listener}\n"
        "routes:\n"
        "  - pool: main\n"
        "pools:\n"
        "  main:\n"
        f"{pool}\n"
        "    backends:\n"
        f"{backends}\n"
        "timeouts:\n"
        f"  handshake: {handshake}\n"
        "  connect: 2s\n"
        "  upstream_handshake: 2s\n"
        f"{top}\n"
    )


async def start_proxy_from(nursery: trio.Nursery, path: Path) -> dict[str, int]:
    """Load the YAML config at ``path``, run an ``App`` in ``nursery``; ports by listener name."""
    app = App(load_checked(str(path)))
    addresses = await nursery.start(app.serve)
    return {name: bound[0][1] for name, bound in addresses.items()}


class Recorder:
    """A trio-websocket echo backend that records what each connection received and how it ended."""

    def __init__(self, *, subprotocol: str | None = None) -> None:
        self.subprotocol = subprotocol
        self.offered: list[list[str]] = []
        self.received: list[list[str | bytes]] = []
        self.closes: list[tuple[int, str]] = []
        self.errors: list[BaseException] = []

    async def handler(self, request: WebSocketRequest) -> None:
        self.offered.append(list(request.proposed_subprotocols))
        ws = await request.accept(subprotocol=self.subprotocol)
        got: list[str | bytes] = []
        self.received.append(got)
        try:
            while True:
                msg = await ws.get_message()
                got.append(msg)
                if msg == "close me":
                    await ws.aclose(4001, "later")
                elif msg == "ping me":
                    await ws.ping(b"from-backend")
                    await ws.send_message("pong ok")
                elif msg == "big please":
                    await ws.send_message(b"B" * 1001)
                else:
                    await ws.send_message(msg)
        except ConnectionClosed as exc:
            assert exc.reason is not None
            self.closes.append((exc.reason.code, exc.reason.reason or ""))
        except BaseException as exc:  # pragma: no cover - shows up in the assertions
            self.errors.append(exc)
            raise


@dataclass
class NamedBackend:
    """A trio-websocket echo server that answers ``NAME:message`` and records how sessions end.

    Requests for ``/healthz`` (the proxy's health checks) are served but not recorded.
    """

    name: str
    port: int = 0
    sessions: int = 0
    closes: list[int | None] = field(default_factory=list)  # the close code each session ended with
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        health = request.path == "/healthz"
        if not health:
            self.sessions += 1
        try:
            while True:
                message = await ws.get_message()
                text = message if isinstance(message, str) else message.decode()
                await ws.send_message(f"{self.name}:{text}")
        except ConnectionClosed as exc:
            if not health:
                self.closes.append(exc.reason.code if exc.reason else None)

    async def run(self, *, task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await serve_websocket(self.handler, "127.0.0.1", 0, None, task_status=task_status)

    def stop(self) -> None:
        """Kill it: the port is closed and its sessions are cut."""
        self.scope.cancel()


async def start_backend(nursery: trio.Nursery, name: str) -> NamedBackend:
    backend = NamedBackend(name)
    server = await nursery.start(backend.run)
    backend.port = int(server.port)
    return backend
