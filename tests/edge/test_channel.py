"""``edge.channel`` over real loopback sockets: connecting without a wait, and closing with or without trio."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from wsproxy.edge.channel import RawChannel, connect
from wsproxy.edge.listener import NODELAY_INHERITED, accept_loop


async def test_a_loopback_connect_completes_without_a_wait() -> None:
    """The kernel finishes a loopback connect before it answers EINPROGRESS: no trio wait is taken."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    host, port = listener.getsockname()
    try:
        with trio.fail_after(5):
            channel = await connect(host, port)
        assert channel.sock.gettimeout() == 0.0  # born non-blocking
        assert channel.watched is False
        accepted, _ = listener.accept()
        await channel.send(b"ping")
        assert accepted.recv(4) == b"ping"
        accepted.close()
        channel.close()
        assert channel.sock.fileno() == -1
    finally:
        listener.close()


async def test_a_refused_connect_still_raises() -> None:
    """The fallback (not connected yet, or failed) waits for writability and reads SO_ERROR."""
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", port)


async def test_closing_a_channel_wakes_a_task_waiting_on_it() -> None:
    """A channel a task waits on (``watched``) tells trio before closing; the waiter reads EOF."""
    a, b = socket.socketpair()
    channel = RawChannel(a)
    try:
        with trio.fail_after(5):
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    got.append(await channel.receive())

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert channel.watched
                channel.close()
            assert got == [b""]
    finally:
        b.close()


async def test_a_channel_closed_by_someone_else_closes_quietly() -> None:
    """The engine closes the sockets it relayed; the session's own close afterwards is a no-op."""
    a, b = socket.socketpair()
    channel = RawChannel(a)
    channel.watched = True
    a.close()
    channel.close()  # no notify_closing on fd -1, no error
    assert channel.closed
    b.close()


async def test_a_connect_left_in_progress_ends_at_its_timeout() -> None:
    """A listener whose accept queue is full drops SYNs: the connect waits, within ``timeout_s`` only."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    fillers = []
    try:
        for _ in range(8):  # more than the queue holds; the last ones stay in progress
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect((host, port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(trio.TooSlowError):
            await connect(host, port, timeout_s=0.3)
        assert 0.25 <= trio.current_time() - started < 2.0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.skipif(not NODELAY_INHERITED, reason="TCP_NODELAY is set per connection where it is not inherited")
async def test_the_accept_loop_gives_every_accepted_socket_tcp_nodelay_through_the_listener() -> None:
    """``accept_loop`` sets TCP_NODELAY on the listener; the sockets it accepts have it without a setsockopt each.

    Connections queued before the loop started (systemd's socket, an upgrade's) were made from the listener
    without it: those get it one by one.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    seen: list[int] = []

    async def handler(sock: socket.socket, address: object) -> None:
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        RawChannel(sock, nodelay=False).close()  # as edge.session opens it

    clients = []

    def connect() -> None:
        client = socket.socket()
        client.connect(listener.getsockname())
        clients.append(client)

    try:
        with trio.fail_after(5):
            for _ in range(2):
                connect()  # queued before the loop runs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_loop, listener, handler, nursery)
                while len(seen) < 2:
                    await trio.sleep(0.01)
                for _ in range(3):
                    connect()  # made from a listener that has it
                while len(seen) < 5:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert seen == [1, 1, 1, 1, 1]
    finally:
        for client in clients:
            client.close()
        listener.close()
