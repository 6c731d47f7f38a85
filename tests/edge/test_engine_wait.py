"""``Engine.wait_readable``: a handshake's wait for its backend's answer, in the engine's epoll set and timer heap.

Real socket pairs, a real engine task; the epoll set is looked at through ``/proc/self/fdinfo`` (what the
kernel has registered), not through the engine's own bookkeeping.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from tests.kit.h11_requests import BASE
from tests.kit.relayed import build_relay
from tests.kit.ws import frame
from wsproxy.edge.channel import ChannelBroken
from wsproxy.edge.engine import HAVE_EPOLL, Engine, EngineRelay
from wsproxy.proto.frames import FrameScanner

pytestmark = pytest.mark.skipif(not HAVE_EPOLL, reason="the engine needs select.epoll (Linux)")

OP_TEXT, OP_CLOSE = 0x1, 0x8


#: event masks as /proc shows them (EPOLLERR and EPOLLHUP are always added; a fired one-shot keeps only its flag)
ARMED_ONCE = 0x40000019  # EPOLLONESHOT | EPOLLHUP | EPOLLERR | EPOLLIN
DISABLED = 0x40000000  # EPOLLONESHOT, after its one event
READING = 0x19  # EPOLLHUP | EPOLLERR | EPOLLIN


def registered(engine: Engine) -> dict[int, int]:
    """The kernel's view of the engine's epoll set: {fd: event mask}."""
    entries = {}
    with open(f"/proc/self/fdinfo/{engine._epoll.fileno()}") as info:
        for line in info:
            if line.startswith("tfd:"):
                fields = line.split()
                entries[int(fields[1])] = int(fields[3], 16)
    return entries


def pair() -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


@pytest.fixture
def socks() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The proxy's end of a connection, and its peer's; closed after the test."""
    ours, peer = pair()
    yield ours, peer
    ours.close()
    peer.close()


@pytest.fixture
async def engine(nursery: trio.Nursery) -> Engine:
    """A running engine (its task in the test's nursery)."""
    running = Engine()
    nursery.start_soon(running.run)
    await trio.testing.wait_all_tasks_blocked()
    return running


async def test_readable_wakes_the_task_and_leaves_the_socket_in_the_set_disabled(
    nursery: trio.Nursery, engine: Engine, socks: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = socks
    with trio.fail_after(5):
        woken: list[bool] = []

        async def waiter() -> None:
            woken.append(await engine.wait_readable(ours, trio.current_time() + 10))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [] and registered(engine) == {ours.fileno(): ARMED_ONCE}
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        while not woken:
            await trio.sleep(0.001)
        assert woken == [True]
        assert registered(engine) == {ours.fileno(): DISABLED}  # fired once: still in the set
        assert engine._waiters == {} and engine._timed == 0
        # a second wait on the same socket re-arms it (it is in the set already)
        peer.send(b"more")
        assert await engine.wait_readable(ours, trio.current_time() + 10) is True


async def test_a_silent_socket_times_out_at_its_deadline_and_leaves_the_set(
    autojump_clock: trio.testing.MockClock, engine: Engine, socks: tuple[socket.socket, socket.socket]
) -> None:
    begun = trio.current_time()
    assert await engine.wait_readable(socks[0], begun + 7.5) is False
    assert trio.current_time() - begun == pytest.approx(7.5, abs=0.01)
    assert registered(engine) == {} and engine._waiters == {} and engine._timed == 0


async def test_a_cancelled_wait_takes_the_socket_out_of_the_set(engine: Engine, socks: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = socks
    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await engine.wait_readable(ours, trio.current_time() + 60)
        assert scope.cancelled_caught
        assert registered(engine) == {} and engine._waiters == {} and engine._timed == 0
        peer.send(b"late answer")  # nothing in the engine reacts to it any more
        await trio.sleep(0.05)
        assert engine.wakeups == 0


async def test_waits_do_not_delay_each_other_or_the_sessions(nursery: trio.Nursery, engine: Engine) -> None:
    """Twenty waits with their own deadlines beside a relayed session: each ends by its own event or deadline."""
    socks = [pair() for _ in range(20)]
    client, client_peer = pair()
    backend, backend_peer = pair()
    try:
        with trio.fail_after(5):
            relay = build_relay("engine", client, backend, engine=engine)
            assert isinstance(relay, EngineRelay)
            relay.start(b"", b"", lambda: None)
            results: dict[int, bool] = {}

            async def wait(i: int, ours: socket.socket) -> None:
                results[i] = await engine.wait_readable(ours, trio.current_time() + (0.2 if i % 2 else 30))

            for i, (ours, _) in enumerate(socks):
                nursery.start_soon(wait, i, ours)
            await trio.testing.wait_all_tasks_blocked()
            for i, (_, peer) in enumerate(socks):
                if i % 2 == 0:
                    peer.send(b"x")
            hello = frame(OP_TEXT, b"relayed meanwhile", mask=True)
            client_peer.send(hello)
            while len(results) < 10:
                await trio.sleep(0.01)
            assert results == {i: True for i in range(0, 20, 2)}  # the answered ones, before the short deadlines
            await trio.sleep(0.01)
            assert backend_peer.recv(100) == hello
            while len(results) < 20:
                await trio.sleep(0.01)
            assert results == {i: i % 2 == 0 for i in range(20)}
            assert engine._waiters == {} and engine._timed == 0
    finally:
        for ours, peer in [*socks, (client, client_peer), (backend, backend_peer)]:
            ours.close()
            peer.close()


async def test_a_session_whose_backend_was_awaited_is_relayed_from_the_set_it_is_in(engine: Engine) -> None:
    """``backend_in_set``: the relay re-arms the backend's disabled registration (no second add, no EEXIST)."""
    client, client_peer = pair()
    backend, backend_peer = pair()
    try:
        with trio.fail_after(5):
            backend_peer.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            assert await engine.wait_readable(backend, trio.current_time() + 5)
            backend.recv(1000)
            relay = EngineRelay(
                engine,
                client,
                backend,
                up_scanner=FrameScanner(from_client=True),
                down_scanner=FrameScanner(from_client=False),
                close_timeout_s=5.0,
                backend_failure_code=1011,
                backend_in_set=True,
            )
            ended = trio.Event()
            relay.start(b"", b"", ended.set)
            assert registered(engine) == {client.fileno(): READING, backend.fileno(): READING}
            reply = frame(OP_TEXT, b"from the backend", mask=False)
            backend_peer.send(reply)
            await trio.sleep(0.05)
            assert client_peer.recv(100) == reply
            client_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
            await trio.sleep(0.05)
            backend_peer.recv(100)
            backend_peer.send(frame(OP_CLOSE, struct.pack("!H", 1000), mask=False))
            backend_peer.close()
            await ended.wait()
    finally:
        for sock in (client, client_peer, backend, backend_peer):
            sock.close()


async def test_a_task_still_waiting_when_the_engine_stops_gets_channel_broken(
    socks: tuple[socket.socket, socket.socket]
) -> None:
    ours = socks[0]
    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            engine_scope = trio.CancelScope()
            engine = Engine()

            async def run_engine() -> None:
                with engine_scope:
                    await engine.run()

            outer.start_soon(run_engine)
            await trio.testing.wait_all_tasks_blocked()
            errors: list[BaseException] = []

            async def waiter() -> None:
                try:
                    await engine.wait_readable(ours, trio.current_time() + 60)
                except ChannelBroken as exc:
                    errors.append(exc)

            outer.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            engine_scope.cancel()
        assert len(errors) == 1 and "engine stopped" in str(errors[0])


async def test_the_proxy_waits_for_the_backends_answer_in_the_engine(nursery: trio.Nursery, engine: Engine) -> None:
    """Through ``edge.upstream.upgrade``: a plain backend's answer is awaited in the engine, not under a cancel scope."""
    from wsproxy.edge.channel import RawChannel
    from wsproxy.edge.upstream import upgrade
    from wsproxy.proto.handshake import RequestHead, check_upgrade

    ours, peer = pair()
    headers = list(BASE)
    up = check_upgrade(RequestHead(b"/chat", headers))
    assert not hasattr(up, "status")
    channel = RawChannel(ours)
    seen: list[int] = []

    async def backend() -> None:
        data = b""
        peer_t = trio.socket.from_stdlib_socket(peer)
        while b"\r\n\r\n" not in data:
            data += await peer_t.recv(4096)
        seen.extend(registered(engine))  # the proxy's socket is in the engine's set while it waits
        await peer_t.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\ntrailing"
        )

    try:
        with trio.fail_after(5):
            nursery.start_soon(backend)
            result = await upgrade(channel, b"/chat", headers, up, timeout_s=5, max_header_bytes=16384, engine=engine)
            assert isinstance(result, tuple)
            accepted, trailing = result
            assert trailing == b"trailing" and accepted.subprotocol is None
            assert seen == [ours.fileno()]
            assert channel.in_engine and registered(engine) == {ours.fileno(): DISABLED}
    finally:
        channel.close()
        peer.close()
