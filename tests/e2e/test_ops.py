"""End to end: draining, graceful shutdown, keepalive, and the systemd notify protocol and socket activation.

Everything runs for real on 127.0.0.1: trio-websocket clients and backends,
and, where a test must see every frame, raw peers that speak RFC 6455 by hand
and record what they read. Draining and keepalive run an in-process ``App``
(``start_proxy``) with the admin API served beside it by ``serve_admin``;
signals and systemd run ``python -m wsproxy run`` as a subprocess and send it
real ``os.kill`` signals, a real ``AF_UNIX`` datagram socket standing in for
the manager's ``$NOTIFY_SOCKET``.

What is covered:

- draining by the admin API, by a reload that removes the backend, and by
  ``drain.on_unhealthy`` (websocket checks refused with 503 while the
  established sessions still work): new sessions leave the backend at once,
  its sessions get 1012 (client) and 1001 (backend) after ``drain.timeout``,
  spread evenly over ``drain.spread``; a client that never answers is cut
  ``drain.close_timeout`` later; ``/status`` and ``/metrics`` show the drain;
  undrain, also within the grace period; both closes wait for the end of a
  1 MB frame in flight in their direction;
- SIGTERM: accepting stops at once, 1001 spread over ``shutdown.spread``, exit
  0; ``shutdown.timeout`` cuts a client that never answers; a second SIGTERM
  exits at once;
- keepalive: a healthy idle session stays open and the proxy's pongs never
  reach the other side (not even split byte by byte or sent in one write with
  data) while both sides' own pings and pongs pass; pings wait for the end of
  a frame in flight; a silent client (the backend gets 1001) and a silent
  backend (the client gets 1014: a raw client, because wsproto, under
  trio-websocket, does not know 1014 and answers it with 1002);
- systemd: READY/STATUS, RELOADING+MONOTONIC_USEC then READY (after a good and
  a refused reload), STOPPING, in order, and WATCHDOG=1; socket activation by
  LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID on fd 3.

What is not here: the STATUS= line sent every 5 s (too slow to wait for).

Timing bounds add ``SLACK_S`` to what the settings imply; what was measured is
kept in ``TIMINGS`` and printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, connect_websocket_url, serve_websocket

from tests.kit.process import WsproxyProcess, run_wsproxy, write_config
from tests.kit.servers import closed_port, make_config, start_proxy, start_tcp_backend
from tests.kit.wait import SLACK_S, until
from tests.kit.ws import (
    Frame,
    FrameReader,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_for,
    apply_mask,
    close_payload,
    frame as encode_frame,
    frame_header,
    header,
    random_key,
    read_head_rest,
    upgrade_request,
)
from wsproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    DrainConfig,
    HealthConfig,
    KeepaliveConfig,
    PoolConfig,
    PoolName,
    RouteConfig,
)
from wsproxy.control.admin import serve_admin
from wsproxy.balance.registry import Health

HEALTH_PATH = "/healthz"
#: What the timing tests measured (seconds), printed at the end of each.
TIMINGS: dict[str, float] = {}


def report(name: str, value: float) -> None:
    TIMINGS[name] = round(value, 3)
    print(f"timing {name}={value:.3f}s")


# -- raw WebSocket peers ---------------------------------------------------------------------------


class RawPeer:
    """One end of a WebSocket connection, spoken by hand; every frame it reads is kept in ``frames``."""

    def __init__(self, stream: trio.SocketStream, *, is_client: bool, buffered: bytes = b"") -> None:
        self.stream = stream
        self.is_client = is_client
        self.reader = FrameReader(stream, buffered)
        self.frames: list[Frame] = []
        self.close_sent = False
        self.closed = trio.Event()  # a close frame was read, or EOF
        self._sending = trio.Lock()  # serve() answers pings while the test sends

    async def send(self, opcode: int, payload: bytes = b"") -> None:
        async with self._sending:
            await self.stream.send_all(encode_frame(opcode, payload, mask=self.is_client))
        if opcode == OP_CLOSE:
            self.close_sent = True

    async def send_slowly(
        self, opcode: int, payload: bytes, *, chunk: int = 32768, pause_s: float = 0.01, started: trio.Event | None = None
    ) -> float:
        """One frame written in pieces with pauses, holding the send lock: nothing of ours goes
        inside it (a pong waits for its end). Returns the time its last piece started to go out:
        the proxy may relay that piece and what follows it before this task runs again, so the
        time after the write would be too late a bound."""
        mask = os.urandom(4) if self.is_client else None
        data = apply_mask(payload, mask) if mask else payload
        last_at = trio.current_time()
        async with self._sending:
            await self.stream.send_all(frame_header(opcode, len(payload), mask=mask))
            for offset in range(0, len(data), chunk):
                if offset:
                    await trio.sleep(pause_s)
                last_at = trio.current_time()
                await self.stream.send_all(data[offset : offset + chunk])
                if started is not None:
                    started.set()
        return last_at

    @property
    def eof(self) -> bool:
        return self.reader.eof

    async def receive(self) -> Frame | None:
        """The next frame, or None at EOF (or a reset)."""
        frame = await self.reader.read()
        if frame is not None:
            self.frames.append(frame)
        return frame

    async def serve(self, *, echo: bool = True) -> None:
        """Answer pings, echo data frames, answer a close; return at the close or EOF."""
        try:
            while (frame := await self.receive()) is not None:
                if frame.opcode == OP_PING:
                    await self.send(OP_PONG, frame.payload)
                elif frame.opcode in (OP_TEXT, OP_BINARY, OP_CONT) and echo:
                    await self.send(frame.opcode, frame.payload)
                elif frame.opcode == OP_CLOSE:
                    self.closed.set()
                    if not self.close_sent:
                        await self.send(OP_CLOSE, frame.payload[:2])
                    if not self.is_client:
                        await self.stream.aclose()  # RFC 6455 §7.1.1: the server closes TCP first
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed.set()

    def of(self, opcode: int) -> list[Frame]:
        return [f for f in self.frames if f.opcode == opcode]


async def accept_upgrade(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The backend's half of the RFC 6455 §4.2 handshake: (request head, bytes after it)."""
    head, rest = await read_head_rest(stream)
    key = header(head, b"sec-websocket-key")
    assert key, head
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
    )
    return head[:-4], rest


async def raw_client(port: int, path: str = "/chat") -> RawPeer:
    """A client that has completed the upgrade and does nothing on its own."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(upgrade_request(path.encode(), key=random_key()))
    head, rest = await read_head_rest(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return RawPeer(stream, is_client=True, buffered=rest)


# -- trio-websocket backends and clients -------------------------------------------------------------


class Backend:
    """A trio-websocket backend that greets each client with its name, then echoes.

    ``closes`` gets (trio time, close code) for every session that ends with a
    close frame from the proxy. Upgrades on ``HEALTH_PATH`` are health checks:
    refused with 503 while ``fail_health`` is set, while the sessions already
    established carry on.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.sessions = 0
        self.fail_health = False
        self.closes: list[tuple[float, int | None]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> BackendConfig:
        return BackendConfig(address=Address("127.0.0.1", self.port))

    async def start(self, nursery: trio.Nursery) -> Backend:
        server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0, None)
        self.port = int(server.port)
        return self

    async def _handle(self, request: WebSocketRequest) -> None:
        if request.path == HEALTH_PATH and self.fail_health:
            await request.reject(503)
            return
        ws = await request.accept()
        health = request.path == HEALTH_PATH
        if not health:
            self.sessions += 1
        try:
            if not health:
                await ws.send_message(self.name)
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            if not health:
                self.closes.append((trio.current_time(), exc.reason.code if exc.reason else None))


@dataclass
class Client:
    """A trio-websocket client; ``backend`` is the name its backend greeted it with."""

    ws: WebSocketConnection
    backend: str
    closed_at: float | None = None
    code: int | None = None
    reason: str | None = None
    done: trio.Event = field(default_factory=trio.Event)
    watching: bool = False
    inbox: list[str | bytes] = field(default_factory=list)  # what arrived while watching

    async def watch(self) -> None:
        """Read until the close, keeping the messages; then record how it ended."""
        self.watching = True
        try:
            while True:
                self.inbox.append(await self.ws.get_message())
        except ConnectionClosed as exc:
            self.closed_at = trio.current_time()
            self.code = exc.reason.code if exc.reason else None
            self.reason = exc.reason.reason if exc.reason else None
        self.done.set()

    def closed_since(self, start: float) -> float:
        """How long after ``start`` the close arrived."""
        assert self.closed_at is not None, "still open"
        return self.closed_at - start

    async def echo(self, text: str) -> None:
        """A message there and back: the session works."""
        await self.ws.send_message(text)
        if not self.watching:
            assert await self.ws.get_message() == text
            return
        await until(lambda: text in self.inbox or self.done.is_set(), timeout_s=5)
        assert self.inbox.pop() == text


async def connect(nursery: trio.Nursery, port: int, **kw: object) -> Client:
    ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{port}/chat", **kw)  # type: ignore[arg-type]
    greeting = await ws.get_message()
    assert isinstance(greeting, str)
    return Client(ws, greeting)


# -- the admin API -------------------------------------------------------------------------------------


async def admin(address: str, method: str, target: str) -> tuple[int, bytes]:
    """One request on a new connection: (status, body)."""
    host, _, port = address.rpartition(":")
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", address), ("Connection", "close")]  # the admin refuses other names (421)
    if method == "POST":
        headers.append(("Content-Length", "0"))
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)) + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body


async def status_of(address: str) -> dict[str, object]:
    status, body = await admin(address, "GET", "/status")
    assert status == 200, body
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def backend_entry(status: dict[str, object], pool: str, address: str) -> dict[str, object]:
    pools = status["pools"]
    assert isinstance(pools, dict)
    [entry] = [b for b in pools[pool]["backends"] if b["address"] == address]
    assert isinstance(entry, dict)
    return entry


async def metric(address: str, name: str, **labels: str) -> float:
    """The sum of the ``name`` samples of ``/metrics`` that carry ``labels``."""
    status, body = await admin(address, "GET", "/metrics")
    assert status == 200, body
    wanted = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and wanted <= set(s.labels.items())
    )


def one_pool_config(*backends: Backend, **pool: object) -> Config:
    main = PoolConfig(name=PoolName("main"), backends=tuple(b.config() for b in backends), **pool)  # type: ignore[arg-type]
    return dataclasses.replace(make_config([]), pools={main.name: main})


@contextmanager
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[str]]]:
    """``lines("event=drain")``: the INFO+ messages of wsproxy that contain it."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    yield lambda text: [r.getMessage() for r in caplog.records if r.name.startswith("wsproxy") and text in r.getMessage()]


# -- 1. admin drain -----------------------------------------------------------------------------------

DRAIN = DrainConfig(timeout_s=0.3, spread_s=1.0, close_timeout_s=1.0)


async def test_admin_drain_moves_new_sessions_and_closes_old_ones_spread(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with captured(caplog) as lines, trio.fail_after(20):
        a, b = [await Backend(name).start(nursery) for name in "AB"]
        app, port = await start_proxy(nursery, one_pool_config(a, b, drain=DRAIN))
        address = await nursery.start(partial(serve_admin, app, AdminConfig(bind=Address("127.0.0.1", 0))))

        # 9 trio-websocket clients and 1 raw client on B (round robin also fills A)
        clients: list[Client] = []
        while sum(c.backend == "B" for c in clients) < 9:
            clients.append(await connect(nursery, port))
        raws: list[RawPeer] = []  # kept open, on A too
        while not raws or raws[-1].frames[0].payload != b"B":
            raws.append(await raw_client(port))
            greeting = await raws[-1].receive()
            assert greeting is not None and greeting.opcode == OP_TEXT
        raw = raws[-1]
        on_a = [c for c in clients if c.backend == "A"]
        on_b = [c for c in clients if c.backend == "B"]
        for c in clients:
            await c.echo("before")
            nursery.start_soon(c.watch)
        assert b.sessions == 10

        started = trio.current_time()
        code, body = await admin(address, "POST", f"/pools/main/backends/{b.address}/drain")
        assert code == 200 and json.loads(body)["changed"] is True, body
        # new sessions go to A at once, well inside the grace period
        fresh = [await connect(nursery, port) for _ in range(4)]
        assert [c.backend for c in fresh] == ["A"] * 4
        assert trio.current_time() - started < DRAIN.timeout_s, "too slow to tell 'at once'"
        assert b.sessions == 10

        # the raw client gets its 1012 and does not answer yet: its session is draining
        with trio.fail_after(DRAIN.timeout_s + DRAIN.spread_s + SLACK_S + 1):
            frame = await raw.receive()
        assert frame is not None and frame.opcode == OP_CLOSE, frame
        assert frame.close_code == 1012 and "drain" in frame.close_reason, frame
        status = await status_of(address)
        assert backend_entry(status, "main", b.address)["draining"] is True
        assert backend_entry(status, "main", a.address)["draining"] is False
        assert isinstance(status["draining_sessions"], int) and status["draining_sessions"] > 0, status
        assert await metric(address, "wsproxy_backend_draining", pool="main", backend=b.address) == 1
        assert await metric(address, "wsproxy_backend_draining", pool="main", backend=a.address) == 0
        assert await metric(address, "wsproxy_draining_sessions") > 0
        # it never answers: TCP is closed drain.close_timeout after the close frame
        with trio.fail_after(DRAIN.close_timeout_s + SLACK_S + 1):
            assert await raw.receive() is None
        report("admin_drain_unanswered_close_cut_after", trio.current_time() - frame.at)
        assert DRAIN.close_timeout_s - 0.05 <= trio.current_time() - frame.at <= DRAIN.close_timeout_s + SLACK_S

        with trio.fail_after(DRAIN.timeout_s + DRAIN.spread_s + SLACK_S + 1):
            for c in on_b:
                await c.done.wait()
        assert [(c.code, c.reason) for c in on_b] == [(1012, "backend draining (admin)")] * 9
        await until(lambda: len(b.closes) == 10)
        assert [code for _, code in b.closes] == [1001] * 10  # every backend session got 1001

        times = sorted([c.closed_since(started) for c in on_b] + [frame.at - started])
        report("admin_drain_first_close", times[0])
        report("admin_drain_last_close", times[-1])
        report("admin_drain_span", times[-1] - times[0])
        assert times[0] >= DRAIN.timeout_s - 0.01, times
        assert times[-1] <= DRAIN.timeout_s + DRAIN.spread_s + SLACK_S, times
        assert times[-1] - times[0] >= 0.4, times
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        report("admin_drain_max_gap", max(gaps))
        assert max(gaps) <= 2 * DRAIN.spread_s / 10 + 0.1, gaps  # even: no hole of more than two slots

        # A's sessions never noticed
        for c in on_a + fresh:
            assert not c.done.is_set()
            await c.echo("after")

        code, body = await admin(address, "POST", f"/pools/main/backends/{b.address}/undrain")
        assert code == 200 and json.loads(body)["changed"] is True, body
        back = [await connect(nursery, port) for _ in range(4)]
        assert "B" in [c.backend for c in back]
        assert backend_entry(await status_of(address), "main", b.address)["draining"] is False
        assert await metric(address, "wsproxy_backend_draining", pool="main", backend=b.address) == 0

        # undrained within the grace period: nothing is closed
        for c in back:
            nursery.start_soon(c.watch)
        for action in ("drain", "undrain"):
            code, _ = await admin(address, "POST", f"/pools/main/backends/{b.address}/{action}")
            assert code == 200
        await trio.sleep(DRAIN.timeout_s + 0.2)
        assert not any(c.done.is_set() for c in back)
        for c in back:
            await c.echo("kept")

    first, second = lines("event=drain ")
    assert f"backend={b.address} reason=admin sessions=10" in first, first
    assert f"backend={b.address} reason=admin sessions={sum(c.backend == 'B' for c in back)}" in second, second
    assert len(lines("event=undrain")) == 2
    [closing] = lines("event=drain_closing")  # none for the drain undone in its grace period
    assert closing.endswith(f"backend={b.address} sessions=10"), closing


async def test_drain_closes_wait_for_the_end_of_frames_in_flight(nursery: trio.Nursery) -> None:
    """Both sides are in the middle of a 1 MB frame, written slowly, when the drain closes the session."""
    size = 1_000_000
    down, up = os.urandom(size), os.urandom(size)
    backends: list[RawPeer] = []
    streaming = [trio.Event(), trio.Event()]  # backend, client: the first piece is out
    ended: dict[str, float] = {}

    async def slow_backend(stream: trio.SocketStream) -> None:
        _, rest = await accept_upgrade(stream)
        peer = RawPeer(stream, is_client=False, buffered=rest)
        backends.append(peer)
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(peer.serve, echo=False))  # its close reply waits for the frame
            ended["down"] = await peer.send_slowly(OP_BINARY, down, started=streaming[0])

    with trio.fail_after(15):
        port_b = await start_tcp_backend(nursery, slow_backend)
        drain = DrainConfig(timeout_s=0.0, spread_s=0.0, close_timeout_s=3.0)
        main = PoolConfig(name=PoolName("main"), backends=(BackendConfig(address=Address("127.0.0.1", port_b)),), drain=drain)
        app, port = await start_proxy(nursery, dataclasses.replace(make_config([]), pools={main.name: main}))
        address = await nursery.start(partial(serve_admin, app, AdminConfig(bind=Address("127.0.0.1", 0))))

        client = await raw_client(port)
        nursery.start_soon(partial(client.serve, echo=False))

        async def client_streams() -> None:
            ended["up"] = await client.send_slowly(OP_BINARY, up, started=streaming[1])

        nursery.start_soon(client_streams)
        for event in streaming:
            await event.wait()
        code, _ = await admin(address, "POST", f"/pools/main/backends/127.0.0.1:{port_b}/drain")
        assert code == 200
        drained_at = trio.current_time()
        assert not ended, "a frame ended before the drain: make it slower"

        await client.closed.wait()
        await backends[0].closed.wait()
        await until(lambda: not app.sessions)
        report("frame_boundary_down_frame_end_after_drain", ended["down"] - drained_at)
        report("frame_boundary_up_frame_end_after_drain", ended["up"] - drained_at)
        report("frame_boundary_1012_after_drain", client.of(OP_CLOSE)[0].at - drained_at)
        # each side got the whole frame, then the close, and nothing else
        assert [(f.opcode, f.payload == down, f.masked) for f in client.frames[:1]] == [(OP_BINARY, True, False)]
        assert [(f.opcode, f.close_code) for f in client.frames[1:]] == [(OP_CLOSE, 1012)], client.frames[1:]
        backend = backends[0]
        assert [(f.opcode, f.payload == up, f.masked) for f in backend.frames[:1]] == [(OP_BINARY, True, True)]
        assert [(f.opcode, f.close_code) for f in backend.frames[1:]] == [(OP_CLOSE, 1001)], backend.frames[1:]
        assert client.of(OP_CLOSE)[0].at >= ended["down"]


async def test_a_backend_removed_by_a_reload_drains(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    drain = DrainConfig(timeout_s=0.1, spread_s=0.3, close_timeout_s=1.0)
    with captured(caplog) as lines, trio.fail_after(15):
        a, b = [await Backend(name).start(nursery) for name in "AB"]
        config = one_pool_config(a, b, drain=drain)
        app, port = await start_proxy(nursery, config)
        clients = [await connect(nursery, port) for _ in range(6)]
        on_b = [c for c in clients if c.backend == "B"]
        assert len(on_b) == 3
        for c in clients:
            nursery.start_soon(c.watch)

        main = config.pools[PoolName("main")]
        app.reload(dataclasses.replace(config, pools={main.name: dataclasses.replace(main, backends=(a.config(),))}))
        reloaded = trio.current_time()
        assert [(await connect(nursery, port)).backend for _ in range(3)] == ["A"] * 3
        with trio.fail_after(drain.timeout_s + drain.spread_s + SLACK_S + 1):
            for c in on_b:
                await c.done.wait()
        assert [(c.code, c.reason) for c in on_b] == [(1012, "backend draining (removed by reload)")] * 3
        times = [c.closed_since(reloaded) for c in on_b]
        report("reload_drain_first_close", min(times))
        report("reload_drain_last_close", max(times))
        assert drain.timeout_s - 0.01 <= min(times) and max(times) <= drain.timeout_s + drain.spread_s + SLACK_S
        await until(lambda: len(b.closes) == 3)
        assert [code for _, code in b.closes] == [1001] * 3
        for c in clients:
            if c.backend == "A":
                await c.echo("after")
    assert "reason=\"removed by reload\" sessions=3" in lines("event=drain ")[0]


# -- 2. drain.on_unhealthy -------------------------------------------------------------------------------


@pytest.mark.parametrize("on_unhealthy", [True, False], ids=["on_unhealthy", "default"])
async def test_a_backend_that_turns_unhealthy_drains_its_sessions(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, on_unhealthy: bool
) -> None:
    """With on_unhealthy its sessions get 1012; without (the default) they stay and only new ones avoid it."""
    health = HealthConfig(type="websocket", path=HEALTH_PATH, interval_s=0.1, timeout_s=0.5, fall=2, rise=1)
    drain = DrainConfig(on_unhealthy=on_unhealthy, timeout_s=0.1, spread_s=0.2, close_timeout_s=1.0)
    with captured(caplog) as lines, trio.fail_after(15):
        a, b = [await Backend(name).start(nursery) for name in "AB"]
        app, port = await start_proxy(nursery, one_pool_config(a, b, health=health, drain=drain))
        state = app.registry.state(b.config().address)
        b_health = app.registry.health("main", b.config().address)
        await until(lambda: all(app.registry.health("main", x.config().address).health is Health.UP for x in (a, b)))
        clients = [await connect(nursery, port) for _ in range(6)]
        on_b = [c for c in clients if c.backend == "B"]
        assert len(on_b) == 3
        for c in clients:
            await c.echo("before")
            nursery.start_soon(c.watch)

        b.fail_health = True  # new upgrades on /healthz get 503; established sessions carry on
        failing = trio.current_time()
        bound = health.fall * health.interval_s * 1.1 + health.interval_s + drain.timeout_s + drain.spread_s + SLACK_S
        if not on_unhealthy:
            await until(lambda: b_health.health is Health.DOWN)
            await trio.sleep(bound - (trio.current_time() - failing))
            assert not any(c.done.is_set() for c in clients) and not state.draining
            assert [(await connect(nursery, port)).backend for _ in range(2)] == ["A", "A"]
            for c in on_b:
                await c.echo("still here")
            assert lines("event=drain ") == []
            return

        with trio.fail_after(bound + 1):
            for c in on_b:
                await c.done.wait()
        assert [(c.code, c.reason) for c in on_b] == [(1012, "backend draining (unhealthy)")] * 3
        times = [c.closed_since(failing) for c in on_b]
        report("unhealthy_drain_first_close", min(times))
        report("unhealthy_drain_last_close", max(times))
        assert max(times) <= bound, times
        await until(lambda: len(b.closes) == 3)
        assert [code for _, code in b.closes] == [1001] * 3
        for c in clients:
            if c.backend == "A":
                await c.echo("after")
        assert state.draining

        b.fail_health = False  # healthy again: undrained, and it takes new sessions
        await until(lambda: b_health.health is Health.UP)
        assert not state.draining
        assert "B" in [(await connect(nursery, port)).backend for _ in range(2)]
    assert lines("event=drain ") and "reason=unhealthy" in lines("event=drain ")[0]


# -- subprocesses ----------------------------------------------------------------------------------------


@asynccontextmanager
async def wsproxy_run(tmp_path: Path, config: str, argv: list[str] | None = None, **popen: Any) -> AsyncIterator[WsproxyProcess]:
    """``wsproxy run`` on the config text ``config`` (or ``argv``), by the kit's harness."""
    async with run_wsproxy(write_config(tmp_path, config), argv=argv, **popen) as proxy:
        yield proxy


def run_config(port: int, backend_port: int, *, spread: str = "0s", timeout: str = "6s") -> str:
    return f"""\
        listeners:
          - name: public
            bind: 127.0.0.1:{port}
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - address: 127.0.0.1:{backend_port}
        shutdown:
          timeout: {timeout}
          spread: {spread}
        """


async def refused(port: int) -> bool:
    try:
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
    except OSError:
        return True
    return False


# -- 3. graceful shutdown -------------------------------------------------------------------------------


async def test_sigterm_stops_accepting_and_spreads_1001_closes(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        backend = await Backend("echo").start(nursery)
        port = closed_port()
        async with wsproxy_run(tmp_path, run_config(port, backend.port, spread="1s", timeout="5s")) as proxy:
            await proxy.wait_listening(port)
            clients = [await connect(nursery, port) for _ in range(10)]
            for c in clients:
                await c.echo("hello")
                nursery.start_soon(c.watch)

            proxy.signal(signal.SIGTERM)
            started = trio.current_time()
            with trio.fail_after(0.5):
                while not await refused(port):
                    await trio.sleep(0.005)
            report("shutdown_refusing_after", trio.current_time() - started)
            for _ in range(3):
                assert await refused(port)

            with trio.fail_after(1.0 + SLACK_S + 2):
                for c in clients:
                    await c.done.wait()
            assert [c.code for c in clients] == [1001] * 10, [(c.code, c.reason) for c in clients]
            times = sorted(c.closed_since(started) for c in clients)
            status = await proxy.wait_exit(3)
            exited = trio.current_time() - started
            log = proxy.log()
            report("shutdown_first_close", times[0])
            report("shutdown_last_close", times[-1])
            report("shutdown_span", times[-1] - times[0])
            report("shutdown_exit_after_last_close", exited - times[-1])
            assert status == 0, log
            assert times[-1] - times[0] >= 0.4, times
            assert times[-1] <= 1.0 + SLACK_S, times
            gaps = [later - earlier for earlier, later in zip(times, times[1:])]
            report("shutdown_max_gap", max(gaps))
            assert max(gaps) <= 2 * 1.0 / 10 + 0.1, gaps
            assert exited - times[-1] < 1.0, log
            assert "event=shutdown sessions=10 spread_s=1.0 timeout_s=5.0" in log, log
            assert "Traceback" not in log, log
        await until(lambda: len(backend.closes) == 10)
        assert {code for _, code in backend.closes} == {1001}


async def test_shutdown_timeout_cuts_a_session_whose_client_never_answers(nursery: trio.Nursery, tmp_path: Path) -> None:
    """shutdown.timeout (1 s) is shorter than the pool's drain.close_timeout (5 s by default): it wins."""
    with trio.fail_after(30):
        backend = await Backend("echo").start(nursery)
        port = closed_port()
        async with wsproxy_run(tmp_path, run_config(port, backend.port, spread="0s", timeout="1s")) as proxy:
            await proxy.wait_listening(port)
            client = await raw_client(port)
            greeting = await client.receive()
            assert greeting is not None and greeting.payload == b"echo"
            proxy.signal(signal.SIGTERM)
            started = trio.current_time()
            with trio.fail_after(2):
                close = await client.receive()
            assert close is not None and close.close_code == 1001, close
            status = await proxy.wait_exit(4)  # and never answers it
            exited = trio.current_time() - started
            report("shutdown_timeout_exit", exited)
            with trio.fail_after(1):
                assert await client.receive() is None
            assert status == 0, proxy.log()
            assert 0.9 <= exited <= 1.0 + SLACK_S + 0.2, proxy.log()


async def test_a_second_sigterm_during_a_long_spread_exits_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        backend = await Backend("echo").start(nursery)
        port = closed_port()
        async with wsproxy_run(tmp_path, run_config(port, backend.port, spread="10s", timeout="20s")) as proxy:
            await proxy.wait_listening(port)
            clients = [await connect(nursery, port) for _ in range(10)]
            for c in clients:
                nursery.start_soon(c.watch)
            proxy.signal(signal.SIGTERM)
            await trio.sleep(0.5)
            assert proxy.proc.poll() is None
            assert sum(c.done.is_set() for c in clients) < 10  # the spread is far from over

            proxy.signal(signal.SIGTERM)
            second = trio.current_time()
            status = await proxy.wait_exit(2)
            report("second_sigterm_exit", trio.current_time() - second)
            with trio.fail_after(2):
                for c in clients:
                    await c.done.wait()  # the rest see the connection go
            log = proxy.log()
            assert trio.current_time() - second < 1.5, log
            assert status == 0, log
            assert "event=signal signal=SIGTERM action=exit_now" in log, log


# -- 4. keepalive ---------------------------------------------------------------------------------------

KEEPALIVE = KeepaliveConfig(interval_s=0.2, timeout_s=0.3)
#: The sweeper looks at sessions every min(interval, timeout) / 4.
SWEEP_S = min(KEEPALIVE.interval_s, KEEPALIVE.timeout_s) / 4


def keepalive_config(backend_port: int) -> Config:
    return make_config([backend_port], routes=(RouteConfig(pool=PoolName("main"), keepalive=KEEPALIVE),))


async def test_keepalive_keeps_a_healthy_session_and_its_pongs_stay_inside(nursery: trio.Nursery) -> None:
    backends: list[RawPeer] = []

    async def answering_backend(stream: trio.SocketStream) -> None:
        _, rest = await accept_upgrade(stream)
        peer = RawPeer(stream, is_client=False, buffered=rest)
        backends.append(peer)
        await peer.serve()

    with trio.fail_after(15):
        app, port = await start_proxy(nursery, keepalive_config(await start_tcp_backend(nursery, answering_backend)))
        client = await raw_client(port)
        nursery.start_soon(client.serve)
        await until(lambda: bool(backends))
        backend = backends[0]

        await trio.sleep(1.5)  # idle
        assert len(app.sessions) == 1 and not client.closed.is_set() and not backend.closed.is_set()
        report("keepalive_pings_to_client_in_1.5s", len(client.of(OP_PING)))
        report("keepalive_pings_to_backend_in_1.5s", len(backend.of(OP_PING)))
        assert len(client.of(OP_PING)) >= 4, client.frames
        assert len(backend.of(OP_PING)) >= 4, backend.frames
        assert all(f.masked for f in backend.of(OP_PING)) and not any(f.masked for f in client.of(OP_PING))
        assert client.of(OP_PONG) == [] and backend.of(OP_PONG) == []  # each answered the proxy; nobody saw the other's

        # a side's own ping crosses, and so does its pong
        await client.send(OP_PING, b"client's own")
        await until(lambda: any(f.payload == b"client's own" for f in client.of(OP_PONG)))
        assert [f.payload for f in backend.of(OP_PING) if f.payload == b"client's own"] == [b"client's own"]
        await backend.send(OP_PING, b"backend's own")
        await until(lambda: any(f.payload == b"backend's own" for f in backend.of(OP_PONG)))
        assert [f.payload for f in client.of(OP_PONG)] == [b"client's own"]
        assert [f.payload for f in backend.of(OP_PONG)] == [b"backend's own"]
        await client.send(OP_TEXT, b"still here")
        await until(lambda: any(f.payload == b"still here" for f in client.of(OP_TEXT)))
        assert len(app.sessions) == 1

        await client.send(OP_CLOSE, close_payload(1000))
        await until(lambda: not app.sessions)
        assert [f.close_code for f in backend.of(OP_CLOSE)] == [1000]


async def test_keepalive_takes_out_pongs_split_or_coalesced_with_data(nursery: trio.Nursery) -> None:
    """The client answers the proxy's pings one byte per write, or in one write between two text frames."""
    backends: list[RawPeer] = []
    answered: list[int] = []

    async def answering_backend(stream: trio.SocketStream) -> None:
        _, rest = await accept_upgrade(stream)
        peer = RawPeer(stream, is_client=False, buffered=rest)
        backends.append(peer)
        await peer.serve(echo=False)

    with trio.fail_after(15):
        app, port = await start_proxy(nursery, keepalive_config(await start_tcp_backend(nursery, answering_backend)))
        client = await raw_client(port)

        async def answer_oddly() -> None:
            while (frame := await client.receive()) is not None:
                if frame.opcode != OP_PING:
                    continue
                n = len(answered)
                pong = encode_frame(OP_PONG, frame.payload, mask=True)
                if n % 2 == 0:
                    for i in range(len(pong)):
                        await client.stream.send_all(pong[i : i + 1])
                        await trio.sleep(0.002)
                else:
                    text = partial(encode_frame, OP_TEXT, mask=True)
                    await client.stream.send_all(text(b"before %d" % n) + pong + text(b"after %d" % n))
                answered.append(n)

        nursery.start_soon(answer_oddly)
        await until(lambda: len(answered) >= 6, timeout_s=5)
        count = len(answered)
        await trio.sleep(0.05)
        backend = backends[0]
        assert len(app.sessions) == 1 and not backend.closed.is_set()
        assert backend.of(OP_PONG) == []
        texts = [f.payload for f in backend.of(OP_TEXT)]
        expected = [b"%s %d" % (word, n) for n in range(1, count, 2) for word in (b"before", b"after")]
        assert texts[: len(expected)] == expected


async def test_keepalive_pings_wait_for_the_end_of_frames_in_flight(nursery: trio.Nursery) -> None:
    """Both sides write a 1 MB frame over ~0.6 s while pings fall due every 0.1 s: every
    ping goes between frames, and nobody is declared dead for answering after its frame."""
    size = 1_000_000
    down, up = os.urandom(size), os.urandom(size)
    keepalive = KeepaliveConfig(interval_s=0.1, timeout_s=1.0)
    backends: list[RawPeer] = []
    ended: dict[str, float] = {}

    async def streaming_backend(stream: trio.SocketStream) -> None:
        _, rest = await accept_upgrade(stream)
        peer = RawPeer(stream, is_client=False, buffered=rest)
        backends.append(peer)
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(peer.serve, echo=False))
            ended["down"] = await peer.send_slowly(OP_BINARY, down, pause_s=0.02)

    with trio.fail_after(15):
        port_b = await start_tcp_backend(nursery, streaming_backend)
        config = make_config([port_b], routes=(RouteConfig(pool=PoolName("main"), keepalive=keepalive),))
        app, port = await start_proxy(nursery, config)
        client = await raw_client(port)
        nursery.start_soon(partial(client.serve, echo=False))
        ended["up"] = await client.send_slowly(OP_BINARY, up, pause_s=0.02)
        await until(lambda: len(ended) == 2 and len(client.frames) > 1 and len(backends[0].frames) > 1)
        await trio.sleep(0.3)  # a few more rounds after the frames
        backend = backends[0]
        report("keepalive_first_ping_to_client_after_its_frame", client.of(OP_PING)[0].at - ended["down"])
        report("keepalive_first_ping_to_backend_after_its_frame", backend.of(OP_PING)[0].at - ended["up"])

        assert len(app.sessions) == 1 and not client.closed.is_set() and not backend.closed.is_set()
        [received_down] = client.of(OP_BINARY)
        [received_up] = backend.of(OP_BINARY)
        assert received_down.payload == down and received_up.payload == up  # intact: no ping inside
        assert client.of(OP_PING) and backend.of(OP_PING)
        assert client.of(OP_PING)[0].at >= ended["down"] and backend.of(OP_PING)[0].at >= ended["up"]
        assert {f.opcode for f in client.frames} == {OP_BINARY, OP_PING}
        assert {f.opcode for f in backend.frames} == {OP_BINARY, OP_PING}


async def test_keepalive_a_silent_client_is_dead_and_the_backend_gets_1001(nursery: trio.Nursery) -> None:
    backends: list[RawPeer] = []

    async def answering_backend(stream: trio.SocketStream) -> None:
        _, rest = await accept_upgrade(stream)
        peer = RawPeer(stream, is_client=False, buffered=rest)
        backends.append(peer)
        await peer.serve()

    with trio.fail_after(15):
        app, port = await start_proxy(nursery, keepalive_config(await start_tcp_backend(nursery, answering_backend)))
        client = await raw_client(port)  # completes the upgrade, then never reads or answers
        opened = trio.current_time()
        await until(lambda: bool(backends))
        backend = backends[0]
        bound = KEEPALIVE.interval_s + KEEPALIVE.timeout_s + 2 * SWEEP_S + SLACK_S
        with trio.fail_after(bound + 1):
            await backend.closed.wait()
        elapsed = backend.of(OP_CLOSE)[0].at - opened
        report("keepalive_dead_client_detected", elapsed)
        [close] = backend.of(OP_CLOSE)
        assert (close.close_code, close.close_reason) == (1001, "client not responding")
        assert KEEPALIVE.interval_s + KEEPALIVE.timeout_s - SWEEP_S <= elapsed <= bound
        await until(lambda: not app.sessions, timeout_s=2)
        with trio.fail_after(2):  # the silent client's connection is closed: its pings, then EOF
            while await client.receive() is not None:
                pass
        assert {f.opcode for f in client.frames} <= {OP_PING}


async def test_keepalive_a_silent_backend_is_dead_and_the_client_gets_1014(nursery: trio.Nursery) -> None:
    """The client is raw: wsproto (trio-websocket) does not know 1014 and would answer 1002."""

    async def silent_backend(stream: trio.SocketStream) -> None:
        await accept_upgrade(stream)
        await trio.sleep_forever()  # never reads, never answers

    with trio.fail_after(15):
        app, port = await start_proxy(nursery, keepalive_config(await start_tcp_backend(nursery, silent_backend)))
        client = await raw_client(port)
        opened = trio.current_time()
        nursery.start_soon(client.serve)  # answers the proxy's pings, and the close
        bound = KEEPALIVE.interval_s + KEEPALIVE.timeout_s + 2 * SWEEP_S + SLACK_S
        with trio.fail_after(bound + 1):
            await client.closed.wait()
        [close] = client.of(OP_CLOSE)
        elapsed = close.at - opened
        report("keepalive_dead_backend_detected", elapsed)
        assert (close.close_code, close.close_reason) == (1014, "backend not responding")
        assert KEEPALIVE.interval_s + KEEPALIVE.timeout_s - SWEEP_S <= elapsed <= bound
        assert client.of(OP_PONG) == []
        await until(lambda: not app.sessions, timeout_s=2)
        with trio.fail_after(2):
            assert await client.receive() is None  # and then the connection goes


# -- 5. systemd notify ----------------------------------------------------------------------------------


@dataclass
class Message:
    at: float
    fields: dict[str, str]


class NotifySocket:
    """The manager's end of $NOTIFY_SOCKET; ``messages`` collects every datagram, in order."""

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path
        self.messages: list[Message] = []

    async def collect(self) -> None:
        while True:
            try:
                data = await self.sock.recv(4096)
            except trio.ClosedResourceError:
                return  # the test is over
            self.messages.append(Message(trio.current_time(), dict(line.split("=", 1) for line in data.decode().split("\n"))))

    def having(self, key: str) -> list[Message]:
        return [m for m in self.messages if key in m.fields]

    async def wait(self, key: str, count: int = 1, timeout_s: float = 15.0) -> Message:
        """The ``count``-th message that sets ``key``."""
        await until(lambda: len(self.having(key)) >= count, timeout_s=timeout_s)
        return self.having(key)[count - 1]


@asynccontextmanager
async def notify_socket(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[NotifySocket]:
    path = str(tmp_path / "notify")
    if len(path) > 100:  # sun_path is 108 bytes
        path = f"/tmp/wsproxy-ops-notify-{os.getpid()}"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    try:
        await sock.bind(path)
        manager = NotifySocket(sock, path)
        nursery.start_soon(manager.collect)
        yield manager
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)


STATUS_LINE = re.compile(r"^(\d+) sessions?, config generation (\d+)$")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_notify_ready_reloading_stopping_and_watchdog(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        backend = await Backend("echo").start(nursery)
        port = closed_port()
        async with notify_socket(tmp_path, nursery) as manager:
            env = {**os.environ, "NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "200000"}
            async with wsproxy_run(tmp_path, run_config(port, backend.port), env=env) as proxy:
                ready = await manager.wait("READY")
                assert ready.fields["READY"] == "1"
                started = STATUS_LINE.match(ready.fields.get("STATUS", ""))
                assert started and started[2] == "1", ready
                assert not await refused(port), "READY=1 came before the listener accepts"
                client = await connect(nursery, port)
                await client.echo("ready")

                watched = len(manager.having("WATCHDOG"))
                await trio.sleep(0.6)
                pings = [m for m in manager.having("WATCHDOG") if m.fields["WATCHDOG"] == "1"][watched:]
                report("watchdog_pings_in_0.6s", len(pings))
                assert len(pings) >= 4, manager.messages  # every 0.1 s (half of WATCHDOG_USEC)

                before = monotonic_usec()
                proxy.signal(signal.SIGHUP)
                reloaded = await manager.wait("READY", 2)
                after = monotonic_usec()
                [reloading] = manager.having("RELOADING")[:1]
                assert reloading.fields["RELOADING"] == "1"
                assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after, (before, reloading, after)
                generation = STATUS_LINE.match(reloaded.fields.get("STATUS", ""))
                assert generation and generation[1] == "1" and generation[2] == "2", reloaded
                await client.echo("after the reload")

                config = tmp_path / "wsproxy.yaml"
                config.write_text(config.read_text().replace("pool: echo", "pool: ehco"))
                proxy.signal(signal.SIGHUP)  # a broken config: RELOADING, then READY on the old one
                kept = await manager.wait("READY", 3)
                assert len(manager.having("RELOADING")) == 2
                generation = STATUS_LINE.match(kept.fields.get("STATUS", ""))
                assert generation and generation[2] == "2", kept
                assert "event=reload_failed" in proxy.log()
                await client.echo("after the failed reload")

                proxy.signal(signal.SIGTERM)
                stopping = await manager.wait("STOPPING")
                assert stopping.fields["STOPPING"] == "1"
                assert await proxy.wait_exit(10) == 0, proxy.log()

        order = [key for m in manager.messages for key in ("READY", "RELOADING", "STOPPING") if key in m.fields]
        assert order == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], manager.messages


# -- 6. socket activation ---------------------------------------------------------------------------------


async def test_socket_activation_serves_on_the_passed_socket(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The config binds another (free) port: only the inherited socket may answer."""
    with trio.fail_after(30):
        backend = await Backend("echo").start(nursery)
        configured = closed_port()
        passed = socket.socket()
        passed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        passed.bind(("127.0.0.1", 0))
        passed.listen(64)
        port = passed.getsockname()[1]
        fd = passed.fileno()

        def to_fd_3() -> None:  # in the child, before close_fds keeps only pass_fds
            os.dup2(fd, 3)

        env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "public"}
        env.pop("LISTEN_PID", None)
        config = tmp_path / "wsproxy.yaml"
        argv = ["sh", "-c", 'LISTEN_PID=$$ exec "$0" -m wsproxy run -c "$1"', sys.executable, str(config)]
        try:
            async with wsproxy_run(
                tmp_path, run_config(configured, backend.port), argv, env=env, pass_fds=(3,), preexec_fn=to_fd_3
            ) as proxy:
                passed.close()  # the child has its own copy now
                await until(lambda: "event=listening" in proxy.log() or proxy.proc.poll() is not None, timeout_s=15)
                client = await connect(nursery, port)
                await client.echo("through the inherited socket")
                assert await refused(configured), "it bound the configured port too"
                log = proxy.log()
                assert re.search(r"event=listener_inherited listener=public sockets=1", log), log
                assert re.search(rf"event=listen_fd fd=3 name=public address=127\.0\.0\.1:{port}", log), log
                proxy.signal(signal.SIGTERM)
                assert await proxy.wait_exit(10) == 0, proxy.log()
        finally:
            passed.close()
