"""A real relay between two socket pairs, for trio-layer tests on the virtual clock.

``relayed(driver)`` starts one established session's relay, the epoll
engine's (``edge.engine.EngineRelay``) or the trio pumps' (``edge.relay.Relay``),
between two ``socket.socketpair()``: the relay holds one end of each (its
client and backend sockets), the test holds the far ends raw and plays both
peers with the kit's own frame codec (``tests.kit.ws``). When the relay's
``run`` returns, the helper closes the relay's sockets as ``edge.session``
does, so the far ends see what TCP does at the end of a real session.

Run it under trio's ``autojump_clock`` fixture: the peers' sockets are local,
so every byte sent is readable at once and the clock only jumps when the
session truly waits (a close timeout, a keepalive interval). Bound each test
with ``trio.fail_after`` anyway.

``build_relay`` is the one place that constructs a relay from sockets (both
drivers), and ``session_for`` the one place that wraps a relay in an
``edge.session.Session`` for the control path (sweeper, drains): when
``edge.session``'s wiring changes, these two are what adapt.

What is not here: handshakes, listeners, a proxy (``tests.kit.servers`` has those).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from tests.kit.ws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Frame, FrameReader, close_payload, frame
from wsproxy.edge.channel import RawChannel
from wsproxy.edge.engine import HAVE_EPOLL, Engine, EngineRelay
from wsproxy.edge.relay import Relay, RelayDriver
from wsproxy.proto.frames import FrameScanner
from wsproxy.proto.limits import MessageRate

if TYPE_CHECKING:
    from wsproxy.app import Generation
    from wsproxy.config.schema import BackendConfig, RateConfig, RouteConfig
    from wsproxy.edge.session import Session

#: The relay drivers a test is parametrised over (the engine needs epoll).
DRIVERS: Sequence[str] = ("engine", "trio") if HAVE_EPOLL else ("trio",)

FAILURE_CODE = 1014  # the default backend_failure_close_code


def build_relay(
    driver: str,
    client: socket.socket,
    backend: socket.socket,
    *,
    engine: Engine | None = None,
    close_timeout_s: float = 5.0,
    backend_failure_code: int = FAILURE_CODE,
    max_message_bytes: int = 0,
    validate_utf8: bool = True,
    message_rate: RateConfig | None = None,
    up_scanner: FrameScanner | None = None,
) -> RelayDriver:
    """A relay of ``driver`` ("engine" or "trio") over the proxy's two sockets, built as ``edge.session`` builds it.

    ``up_scanner`` replaces the scanner of the client's direction (a test's broken one).
    """
    if up_scanner is None:
        up_scanner = FrameScanner(from_client=True, max_message_bytes=max_message_bytes, validate_utf8=validate_utf8)
    down_scanner = FrameScanner(from_client=False, max_message_bytes=max_message_bytes, validate_utf8=validate_utf8)
    rates = (MessageRate(message_rate), MessageRate(message_rate)) if message_rate is not None else None
    if driver == "engine":
        assert engine is not None, "the engine driver needs a running Engine"
        client.setblocking(False)
        backend.setblocking(False)
        return EngineRelay(
            engine, client, backend,
            up_scanner=up_scanner, down_scanner=down_scanner, close_timeout_s=close_timeout_s,
            backend_failure_code=backend_failure_code, message_rate=rates,
        )  # fmt: skip
    assert driver == "trio", driver
    return Relay(
        RawChannel(client), RawChannel(backend),
        up_scanner=up_scanner, down_scanner=down_scanner, close_timeout_s=close_timeout_s,
        backend_failure_code=backend_failure_code, message_rate=rates,
    )  # fmt: skip


def session_for(
    relay: RelayDriver | None,
    generation: Generation,
    *,
    conn_id: str = "c1",
    route: RouteConfig | None = None,
    backend: BackendConfig | None = None,
) -> Session:
    """An established ``Session`` of ``generation`` relayed by ``relay`` (its first route and backend by default)."""
    from wsproxy.edge.session import Session

    session = Session(conn_id, "127.0.0.1:1", "127.0.0.1", generation)
    config = generation.config
    session.route = route if route is not None else config.routes[0]
    session.backend = backend if backend is not None else config.pools[session.route.pool].backends[0]
    session.relay = relay
    return session


@dataclass
class Peer:
    """The far end of one of the relay's sockets, played raw by the test."""

    sock: trio.socket.SocketType
    is_client: bool  # a client masks its frames (RFC 6455 §5.3)
    reader: FrameReader = field(init=False)

    def __post_init__(self) -> None:
        self.stream = trio.SocketStream(self.sock)
        self.reader = FrameReader(self.stream)
        self._sending = trio.Lock()  # the test and ``answer`` may both send: one frame at a time

    async def send(self, data: bytes) -> None:
        """Raw bytes, as they are (a partial frame, garbage)."""
        async with self._sending:
            await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes = b"", **kw: object) -> bytes:
        """One frame as this peer sends it (masked from the client); returns its bytes."""
        data = frame(opcode, payload, mask=self.is_client, **kw)  # type: ignore[arg-type]
        await self.send(data)
        return data

    async def send_close(self, code: int, reason: str = "") -> None:
        await self.send_frame(OP_CLOSE, close_payload(code, reason))

    async def read(self) -> Frame | None:
        """The next frame, or None once TCP has closed."""
        return await self.reader.read()

    async def read_close(self) -> tuple[list[Frame], Frame | None]:
        """Frames up to the first close frame, and that frame (None: TCP closed without one)."""
        return await self.reader.read_until_close()

    async def read_eof(self) -> bytes:
        """Whatever comes until TCP closes (a reset counts as closed)."""
        return await self.reader.read_eof()

    def shutdown_write(self) -> None:
        """Half-close: this peer sends EOF and keeps reading."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Seen:
    """What one peer received (``answer`` fills it in)."""

    frames: list[Frame] = field(default_factory=list)  # data and control frames before the close frame
    close: Frame | None = None
    close_at: float | None = None
    eof_at: float | None = None
    rest: bytes = b""  # bytes of a frame cut short by TCP's end
    sent_close: bool = False  # the test made this peer start the close handshake

    @property
    def data(self) -> list[bytes]:
        return [f.payload for f in self.frames if f.opcode in (OP_TEXT, OP_BINARY)]

    def of(self, opcode: int) -> list[Frame]:
        return [f for f in self.frames if f.opcode == opcode]


@dataclass(frozen=True)
class Behaviour:
    """How a peer played by ``answer`` behaves; by default a well-behaved WebSocket endpoint."""

    answer_close: bool = True  # echo a close frame (and, as the server, then close TCP: RFC 6455 §7.1.1)
    pong: bool = True  # answer pings (§5.5.2)...
    pong_after_s: float = 0.0  # ...this late
    close_tcp_after_s: float = 0.0  # how long the server waits after the close handshake before closing TCP


async def answer(peer: Peer, seen: Seen, how: Behaviour = Behaviour()) -> None:
    """Read until TCP closes, noting what came in ``seen`` and answering pings and the close handshake."""
    while True:
        got = await peer.read()
        if got is None:
            seen.eof_at = trio.current_time()
            seen.rest = bytes(peer.reader.buf)
            return
        try:
            if got.opcode == OP_CLOSE and seen.close is None:
                seen.close, seen.close_at = got, trio.current_time()
                if how.answer_close and not seen.sent_close:
                    await peer.send_close(got.code, got.close_reason)  # the echo of §5.5.1
                if how.answer_close and not peer.is_client:
                    if how.close_tcp_after_s:
                        await trio.sleep(how.close_tcp_after_s)
                    peer.shutdown_write()  # the server closes TCP once the handshake is complete
                continue
            seen.frames.append(got)
            if got.opcode == OP_PING and how.pong:
                if how.pong_after_s:
                    await trio.sleep(how.pong_after_s)
                await peer.send_frame(OP_PONG, got.payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the relay closed it meanwhile: the next read sees the end


@dataclass
class Relayed:
    """A running relay and both far ends."""

    driver: str
    relay: RelayDriver
    client: Peer
    backend: Peer
    ended: trio.Event = field(default_factory=trio.Event)
    ended_at: float | None = None  # trio time at which the relay's run returned

    async def wait_ended(self) -> float:
        await self.ended.wait()
        assert self.ended_at is not None
        return self.ended_at


@asynccontextmanager
async def relayed(driver: str, **options: object) -> AsyncIterator[Relayed]:
    """Run one relay of ``driver`` between two socket pairs; ``options`` go to ``build_relay``.

    Leaving the block cancels the relay if it is still running and closes every socket.
    """
    client_sock, client_far = socket.socketpair()
    backend_sock, backend_far = socket.socketpair()
    socks = (client_sock, backend_sock, client_far, backend_far)
    try:
        async with trio.open_nursery() as nursery:
            engine = None
            if driver == "engine":
                engine = Engine()
                nursery.start_soon(engine.run)
            relay = build_relay(driver, client_sock, backend_sock, engine=engine, **options)  # type: ignore[arg-type]
            client_far.setblocking(False)
            backend_far.setblocking(False)
            relayed = Relayed(
                driver, relay,
                Peer(trio.socket.from_stdlib_socket(client_far), is_client=True),
                Peer(trio.socket.from_stdlib_socket(backend_far), is_client=False),
            )  # fmt: skip

            async def run() -> None:
                try:
                    await relay.run(b"", b"")
                finally:
                    client_sock.close()  # edge.session's finally (the engine closed them already)
                    backend_sock.close()
                    relayed.ended_at = trio.current_time()
                    relayed.ended.set()

            nursery.start_soon(run)
            yield relayed
            nursery.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()
