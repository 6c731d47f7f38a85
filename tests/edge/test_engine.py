"""The epoll relay engine over real socket pairs: relaying, back-pressure, deadlines, failure isolation.

No proxy, no handshakes: each test hands the engine two ``socket.socketpair()`` ends as a session's client
and backend sockets and plays both peers on the other ends.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.kit.relayed import build_relay
from tests.kit.ws import frame, parse_frames
from wsproxy.edge.engine import BIG_RECV_BYTES, HAVE_EPOLL, RECV_BYTES, Engine, EngineRelay
from wsproxy.edge.session_log import SessionLog
from wsproxy.proto.frames import FrameScanner
from wsproxy.proto.relay import Outcome

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

pytestmark = pytest.mark.skipif(not HAVE_EPOLL, reason="the engine needs select.epoll (Linux)")

OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8


class Peers:
    """A session's sockets for the engine, and the peers' ends as trio sockets."""

    def __init__(self, bufsize: int | None = None) -> None:
        self.client, client_peer = socket.socketpair()
        self.backend, backend_peer = socket.socketpair()
        for sock in (self.client, self.backend, client_peer, backend_peer):
            sock.setblocking(False)
            if bufsize:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self.client_peer = trio.socket.from_stdlib_socket(client_peer)
        self.backend_peer = trio.socket.from_stdlib_socket(backend_peer)

    def relay(self, engine: Engine, up_scanner: FrameScanner | None = None, close_timeout_s: float = 5.0) -> EngineRelay:
        relay = build_relay(
            "engine", self.client, self.backend, engine=engine, up_scanner=up_scanner, close_timeout_s=close_timeout_s
        )
        assert isinstance(relay, EngineRelay)
        return relay

    def close(self) -> None:
        for sock in (self.client, self.backend, self.client_peer, self.backend_peer):
            sock.close()


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    p = Peers()
    yield p
    p.close()


async def read_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.recv(65536)
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def read_until_eof(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while True:
        try:
            chunk = await sock.recv(65536)
        except ConnectionError:
            return data
        if not chunk:
            return data
        data += chunk


async def start(nursery: trio.Nursery) -> Engine:
    engine = Engine()
    nursery.start_soon(engine.run)
    return engine


async def relaying(nursery: trio.Nursery, peers: Peers) -> tuple[Engine, EngineRelay]:
    """A started engine relaying ``peers``' session (no bytes waiting on either side)."""
    engine = await start(nursery)
    relay = peers.relay(engine)
    nursery.start_soon(relay.run, b"", b"")
    return engine, relay


async def test_frames_cross_both_ways_byte_for_byte(nursery: trio.Nursery, peers: Peers) -> None:
    with trio.fail_after(5):
        engine = await start(nursery)
        relay = peers.relay(engine)
        hello = frame(OP_TEXT, b"from the client", mask=True)
        nursery.start_soon(relay.run, hello, b"")
        assert await read_exactly(peers.backend_peer, len(hello)) == hello
        reply = frame(OP_BINARY, os.urandom(70_000), mask=False)
        await peers.backend_peer.send(reply)
        assert await read_exactly(peers.client_peer, len(reply)) == reply
        assert (relay.bytes_up, relay.bytes_down) == (len(hello), len(reply))
        assert relay.up.scanner.messages == 1 and relay.down.scanner.messages == 1


async def test_a_full_destination_stops_the_reading_of_its_source(nursery: trio.Nursery) -> None:
    p = Peers(bufsize=4096)
    try:
        with trio.fail_after(10):
            _, relay = await relaying(nursery, p)
            message = frame(OP_BINARY, os.urandom(4000), mask=True)
            sent = 0

            async def client_writes() -> None:
                nonlocal sent
                for _ in range(300):  # 1.2 MB, far more than the buffers hold
                    await p.client_peer.send(message)
                    sent += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(client_writes)
                await trio.sleep(0.3)  # the backend peer reads nothing: buffers fill up
                assert relay.up.out, "the engine should hold a backlog for the backend"
                assert relay.masks[0] & 0x001 == 0, "and stop reading the client meanwhile"
                assert sent < 300  # the client is held back too: nothing is buffered without bound
                received = await read_exactly(p.backend_peer, 300 * len(message))
            assert received == message * 300
    finally:
        p.close()


async def test_finish_closes_both_sides_and_the_deadline_ends_a_silent_session(
    nursery: trio.Nursery, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    engine = await start(nursery)
    relay = peers.relay(engine, close_timeout_s=3.0)
    done = trio.Event()

    async def session() -> None:
        await relay.run(b"", b"")
        done.set()

    nursery.start_soon(session)
    await trio.sleep(1)
    started = trio.current_time()
    relay.finish(1012, 1001, "backend draining", Outcome.DRAIN)
    to_client = parse_frames(await read_exactly(peers.client_peer, 4 + len("backend draining")))
    to_backend = parse_frames(await read_exactly(peers.backend_peer, 8 + len("backend draining")))
    assert (to_client[0].code, to_client[0].masked) == (1012, False)
    assert (to_backend[0].code, to_backend[0].masked) == (1001, True)
    await done.wait()  # neither peer answers: the close deadline ends the session
    assert trio.current_time() - started == pytest.approx(3.0, abs=0.01)
    assert relay.machine.kind is Outcome.DRAIN and engine.sessions == 0


class ExplodingScanner(FrameScanner):
    """A scanner with a bug: any input raises."""

    def feed(self, data: bytes) -> bytes:
        if data:
            raise RuntimeError("a bug while scanning")
        return super().feed(data)


@pytest.fixture
async def two() -> AsyncIterator[tuple[Peers, Peers]]:
    """Two sessions' peers: one a test breaks, one that must go on being relayed."""
    bad, good = Peers(), Peers()
    yield bad, good
    bad.close()
    good.close()


async def still_relayed(good: Peers) -> None:
    """The engine goes on serving the other session."""
    hello = frame(OP_TEXT, b"still relayed", mask=True)
    await good.client_peer.send(hello)
    assert await read_exactly(good.backend_peer, len(hello)) == hello


async def test_an_error_while_serving_one_session_ends_that_session_only(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, two: tuple[Peers, Peers]
) -> None:
    bad, good = two
    with trio.fail_after(5):
        engine = await start(nursery)
        bad_relay = bad.relay(engine, up_scanner=ExplodingScanner(from_client=True))
        bad_relay.log = SessionLog("c0ffee1", "127.0.0.1:4242")  # as edge.session hands it over
        good_relay = good.relay(engine)
        ended = trio.Event()

        async def bad_session() -> None:
            await bad_relay.run(b"", b"")
            bad.client.close()  # what edge.session's finally does
            bad.backend.close()
            ended.set()

        nursery.start_soon(bad_session)
        nursery.start_soon(good_relay.run, b"", b"")
        await bad.client_peer.send(frame(OP_TEXT, b"boom", mask=True))
        await ended.wait()
        assert engine.failures == 1 and bad_relay.machine.kind is Outcome.ERROR
        assert await read_until_eof(bad.client_peer) == b""  # closed, nothing forwarded
        [line] = [r.getMessage() for r in caplog.records if "unexpected error while relaying" in r.getMessage()]
        assert line.startswith("event=error conn=c0ffee1 where=engine ")  # which session, for the operator
        await still_relayed(good)


async def test_a_backend_reset_gives_the_client_1014_without_spinning(nursery: trio.Nursery, peers: Peers) -> None:
    with trio.fail_after(5):
        engine, relay = await relaying(nursery, peers)
        await trio.sleep(0.05)
        wakeups = engine.wakeups
        peers.backend_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peers.backend_peer.close()  # RST
        close = parse_frames(await read_exactly(peers.client_peer, 4 + len("backend went away")))[0]
        assert close.code == 1014 and close.payload[2:] == b"backend went away"
        await trio.sleep(0.2)  # the client never answers: the session waits for its deadline...
        assert engine.wakeups - wakeups < 10  # ...without epoll reporting the dead socket in a loop


async def test_the_engine_closes_a_finished_sessions_sockets_itself(nursery: trio.Nursery, peers: Peers) -> None:
    """Closing them is what takes them out of the epoll set (no epoll_ctl), before the session's end runs."""
    with trio.fail_after(5):
        engine = await start(nursery)
        relay = peers.relay(engine)
        ended = trio.Event()
        closed_at_end: list[bool] = []

        def on_end() -> None:
            closed_at_end.append(peers.client.fileno() == -1 and peers.backend.fileno() == -1)
            ended.set()

        relay.start(b"", b"", on_end)
        await peers.client_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
        assert parse_frames(await read_exactly(peers.backend_peer, 8))[0].code == 1000
        await peers.backend_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=False))
        assert parse_frames(await read_exactly(peers.client_peer, 4))[0].code == 1000
        await peers.backend_peer.send(b"")  # nothing; the backend closes its end
        peers.backend_peer.close()
        await ended.wait()
        assert closed_at_end == [True]  # once, with the sockets closed already
        assert engine.sessions == 0 and relay.masks == [-1, -1]


class RecordingSocket(socket.socket):
    """A real socket that records what each recv asked for and got, and what each send was given and took
    (None: refused, EAGAIN)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.setblocking(False)
        self.reads: list[tuple[int, int]] = []
        self.sends: list[tuple[int, int | None]] = []

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        self.reads.append((size, len(data)))
        return data

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        try:
            sent = super().send(data, flags)
        except BlockingIOError:
            self.sends.append((len(memoryview(data)), None))
            raise
        self.sends.append((len(memoryview(data)), sent))
        return sent


async def test_after_a_short_send_the_rest_waits_for_the_socket_to_be_writable(nursery: trio.Nursery) -> None:
    """A slow client: a send meets its full buffer and takes part of a chunk or none of it; the engine then
    waits for the socket to be writable, not trying again at once (a second system call that EAGAIN refuses)."""
    peers = Peers(bufsize=4096)
    peers.client = RecordingSocket(peers.client)
    try:
        with trio.fail_after(10):
            _, relay = await relaying(nursery, peers)
            bulk = b"".join(frame(OP_BINARY, os.urandom(20_000), mask=False) for _ in range(20))
            nursery.start_soon(send_all, peers.backend_peer, bulk)
            received = b""
            while len(received) < len(bulk):
                received += await peers.client_peer.recv(2048)
                await trio.sleep(0)  # slowly: the engine meets a full buffer again and again
            assert received == bulk
        sends = peers.client.sends
        short = [i for i, (given, took) in enumerate(sends) if took is None or took < given]
        assert short, sends  # the case under test happened
        again_at_once = [i for i in short if i + 1 < len(sends) and sends[i + 1][1] is None]
        assert not again_at_once, [sends[i : i + 2] for i in again_at_once]
    finally:
        peers.close()


async def test_a_side_whose_read_was_full_reads_bigger_next_time(nursery: trio.Nursery) -> None:
    """Bulk traffic: after a read that filled RECV_BYTES the side asks for BIG_RECV_BYTES (one recv per
    64 KiB message instead of two); small messages never make the engine allocate the big buffer."""
    peers = Peers(bufsize=1 << 20)
    peers.backend = RecordingSocket(peers.backend)
    try:
        with trio.fail_after(5):
            _, relay = await relaying(nursery, peers)
            small = frame(OP_BINARY, b"x" * 100, mask=False)
            for _ in range(5):
                await peers.backend_peer.send(small)
                assert await read_exactly(peers.client_peer, len(small)) == small
            assert {asked for asked, _ in peers.backend.reads} == {RECV_BYTES}
            bulk = b"".join(frame(OP_BINARY, os.urandom(65536), mask=False) for _ in range(8))
            nursery.start_soon(send_all, peers.backend_peer, bulk)
            assert await read_exactly(peers.client_peer, len(bulk)) == bulk
            reads = peers.backend.reads
            full = [i for i, (asked, got) in enumerate(reads) if got >= RECV_BYTES]
            assert full, reads
            assert all(reads[i + 1][0] == BIG_RECV_BYTES for i in full if i + 1 < len(reads))
            assert any(got > RECV_BYTES for _, got in reads), reads  # a read took more than 64 KiB at once
            await peers.backend_peer.send(small)
            assert await read_exactly(peers.client_peer, len(small)) == small
            await peers.backend_peer.send(small)
            assert await read_exactly(peers.client_peer, len(small)) == small
            assert reads[-1] == (RECV_BYTES, len(small))  # back to the small size after a small read
    finally:
        peers.close()


async def close_both_ways(p: Peers) -> None:
    """The client closes, the backend answers and hangs up: a session that ends well before its deadline."""
    await p.client_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
    await read_exactly(p.backend_peer, 8)
    await p.backend_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=False))
    await read_exactly(p.client_peer, 4)
    p.backend_peer.close()


async def test_the_timer_ends_only_late_sessions_and_forgets_the_others(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Close deadlines: a session silent after its close ends at its deadline; entries of ended ones go."""
    quick = [Peers() for _ in range(20)]
    late = Peers()
    try:
        engine = await start(nursery)
        ended: list[tuple[str, float]] = []
        for i, p in enumerate(quick):
            p.relay(engine, close_timeout_s=5.0).start(b"", b"", lambda i=i: ended.append((f"q{i}", trio.current_time())))
        late_relay = late.relay(engine, close_timeout_s=5.0)
        late_relay.start(b"", b"", lambda: ended.append(("late", trio.current_time())))
        await trio.sleep(1)
        started = trio.current_time()
        await late.client_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))  # the backend never answers
        for p in quick:
            await close_both_ways(p)
        await trio.sleep(0.1)
        assert sorted(name for name, _ in ended) == sorted(f"q{i}" for i in range(20))  # ended by their peers
        assert len(engine._timers) == 21  # their entries are still there, and harmless
        await trio.sleep(10)
        [(_, at)] = [e for e in ended if e[0] == "late"]
        assert at - started == pytest.approx(5.0, abs=0.01)  # its deadline, not another's
        assert engine._timers == [] and engine.sessions == 0  # nothing left behind
    finally:
        for p in [*quick, late]:
            p.close()


async def test_an_error_in_a_sessions_end_is_logged_and_the_engine_goes_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, two: tuple[Peers, Peers]
) -> None:
    bad, good = two
    with trio.fail_after(5):
        engine = await start(nursery)
        bad_relay = bad.relay(engine)
        bad_relay.log = SessionLog("badend1", "127.0.0.1:4242")

        def explode() -> None:
            raise RuntimeError("a bug in the session's end")

        bad_relay.start(b"", b"", explode)
        good_relay = good.relay(engine)
        good_ended = trio.Event()
        good_relay.start(b"", b"", good_ended.set)
        await close_both_ways(bad)
        await trio.testing.wait_all_tasks_blocked()
        [line] = [r.getMessage() for r in caplog.records if "while ending a session" in r.getMessage()]
        assert line.startswith("event=error conn=badend1 where=engine ")
        await still_relayed(good)
        assert engine.sessions == 1 and not good_ended.is_set()
        engine.end_all()  # a shutdown's deadline: every session goes, its end runs once
        assert good_ended.is_set() and engine.sessions == 0
        await engine.until_empty()  # returns at once with nothing left


async def test_the_timer_heap_keeps_few_entries_of_ended_sessions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under churn the heap is rebuilt without ended sessions' entries; a late session still ends on time."""
    monkeypatch.setattr("wsproxy.edge.engine.TIMER_SLACK", 4)
    engine = await start(nursery)
    late = Peers()
    try:
        late_ended = trio.Event()
        late.relay(engine, close_timeout_s=5.0).start(b"", b"", late_ended.set)
        await late.client_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))  # never answered
        started = trio.current_time()
        await read_exactly(late.backend_peer, 8)
        sizes = []
        for _ in range(40):
            p = Peers()
            try:
                p.relay(engine, close_timeout_s=5.0).start(b"", b"", lambda: None)
                await close_both_ways(p)
                await trio.testing.wait_all_tasks_blocked()
                sizes.append(len(engine._timers))
            finally:
                p.close()
        assert max(sizes) <= 2 * 2 + 4 + 1  # twice the live ones (late and the new one), the slack, the push
        await late_ended.wait()
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.01)
    finally:
        late.close()
