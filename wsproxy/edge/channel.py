"""Non-blocking sockets driven by trio's I/O waits: the proxy's fast byte pipes.

trio's ``SocketStream`` yields to the scheduler on every successful receive
and send (that is how trio guarantees fairness), which costs a full scheduler
pass per chunk, two or three per relayed message. The relay moves a chunk in
one ``recv`` and one ``send`` system call whenever the kernel is ready, and
only parks the task (``trio.lowlevel.wait_readable``/``wait_writable``) when
it is not. Fairness is kept by the callers: a pump that has not waited for
``YIELD_EVERY`` chunks in a row checkpoints once.

``RawChannel`` wraps a connected non-blocking stdlib socket. It is all that
the edge layer needs from a connection: ``receive``, ``send``, ``send_eof``,
``close``; a TLS channel (later) offers the same four.

System calls: a socket that is already non-blocking is not set so again
(``ioctl``), and a channel on which no task ever waited through trio is
closed without ``notify_closing`` (an ``epoll_ctl`` that could only fail:
trio never registered it). Most handshakes find their data ready and never
wait, so this saves a few system calls per connection.

Errors: a reset or broken connection is not an exception here. ``receive``
returns ``b""`` (the peer is gone, as for EOF) and ``send`` raises
``ChannelBroken`` so the writer knows its destination is gone.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from typing import Any

import trio

from ..errors import WsproxyError
from .overload import is_local_exhaustion, local_overload

RECEIVE_BYTES = 65536
#: upstream sockets are born non-blocking where the kernel allows it (no ``ioctl`` afterwards)
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
YIELD_EVERY = 32

_GONE = (ConnectionError, TimeoutError)  # reset, aborted, broken pipe, ETIMEDOUT
_CLOSED = trio.ClosedResourceError  # another task closed the socket while we waited


class ChannelBroken(WsproxyError):
    """The peer cannot receive any more (reset, broken pipe, closed)."""


class RawChannel:
    """One TCP connection, as a non-blocking stdlib socket."""

    __slots__ = ("sock", "closed", "watched", "in_engine")

    def __init__(self, sock: socket.socket, *, nodelay: bool = True) -> None:
        """``nodelay=False``: the socket has TCP_NODELAY already (accepted from a listener that has it)."""
        if sock.gettimeout() != 0.0:  # an accepted socket; one made with SOCK_NONBLOCK already is
            sock.setblocking(False)
        if nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not TCP (unix socket in tests)
                pass
        self.sock = sock
        self.closed = False
        self.watched = False  # a task has waited on it through trio (close must notify trio)
        self.in_engine = False  # in the relay engine's epoll set, disabled (Engine.wait_readable)

    async def receive(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        """The next bytes from the peer; ``b""`` once it has closed or reset."""
        while True:
            data = self.receive_ready(max_bytes)
            if data is not None:
                return data
            self.watched = True
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except _CLOSED:
                return b""

    def receive_ready(self, max_bytes: int = RECEIVE_BYTES) -> bytes | None:
        """What the kernel holds for us now, without waiting: None when nothing yet, ``b""`` once the peer left."""
        try:
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            return None
        except _GONE:
            return b""
        except OSError as exc:
            if exc.errno == errno.EBADF or self.closed:
                return b""
            raise

    def send_ready(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes of ``data`` now, without waiting: how many bytes (0 when none).

        The bytes go to the socket as they are (a TLS channel's ciphertext:
        ``send`` is the plaintext side). Raises ``ChannelBroken`` when the peer is gone.
        """
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ChannelBroken(str(exc)) from None

    async def send(self, data: bytes | memoryview) -> None:
        """Send all of ``data``; raise ``ChannelBroken`` when the peer is gone."""
        sent = self.send_ready(data)
        if sent == len(data):
            return
        sock = self.sock
        view = memoryview(data)[sent:]
        self.watched = True
        try:
            while view:
                try:
                    await trio.lowlevel.wait_writable(sock)
                except _CLOSED:
                    raise ChannelBroken("closed") from None
                view = view[self.send_ready(view) :]
        finally:
            view.release()

    def send_eof(self) -> None:
        """Half-close: the peer reads EOF after what was sent."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Close now (idempotent); tasks waiting on the socket are woken."""
        if not self.closed:
            self.closed = True
            sock = self.sock
            if sock.fileno() == -1:  # the engine closes the sockets it relayed itself
                return
            if self.watched:
                try:
                    trio.lowlevel.notify_closing(sock)
                except RuntimeError:  # pragma: no cover - outside trio
                    pass
            sock.close()


def _literal_family(host: str) -> socket.AddressFamily | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def connect(host: str, port: int, *, timeout_s: float | None = None) -> RawChannel:
    """Open a TCP connection to an IP literal or a name (resolved by trio, in a thread).

    Raises ``OSError`` when the backend cannot be reached, and
    ``errors.LocalOverload`` (503) when the proxy itself is out of file
    descriptors, buffers, memory or local ports (``edge.overload``): that is
    not the backend's failure, and another backend would fail the same way.

    The socket is made non-blocking at creation, and a connect that the
    kernel completed before answering EINPROGRESS (always, on loopback and
    on most local networks) is taken as done without a wait: one
    ``getpeername`` instead of two ``epoll_ctl``, an ``epoll_wait``, a
    scheduler pass and a ``getsockopt``.

    ``timeout_s`` bounds the whole connect (``trio.TooSlowError``); the cancel
    scope that enforces it is only entered for a wait (a name to resolve, a
    connect still in progress), so the usual connect enters none.
    """
    deadline = trio.current_time() + timeout_s if timeout_s is not None else math.inf
    literal = _literal_family(host)
    targets: list[tuple[int, tuple[Any, ...]]]
    if literal is not None:
        targets = [(literal, (host, port))]
    else:
        with trio.fail_at(deadline):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        targets = [(info[0], info[4]) for info in infos]
    last: OSError | None = None
    for family, address in targets:
        try:
            sock = socket.socket(family, _STREAM_NONBLOCK)
        except OSError as exc:
            if is_local_exhaustion(exc):
                raise local_overload(exc, "creating the upstream socket") from None
            raise
        if _STREAM_NONBLOCK == socket.SOCK_STREAM:  # pragma: no cover - no SOCK_NONBLOCK (not Linux)
            sock.setblocking(False)
        try:
            waited = False
            try:
                sock.connect(address)
            except BlockingIOError:
                try:
                    sock.getpeername()  # connected already: the kernel finished before it answered
                except OSError:  # still in progress, or failed: the writable wait says which
                    waited = True
                    with trio.fail_at(deadline):
                        await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
            channel = RawChannel(sock)
            channel.watched = waited
            return channel
        except OSError as exc:
            sock.close()
            if is_local_exhaustion(exc):
                raise local_overload(exc, f"connecting to {address[0]}:{address[1]}") from None
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last if last is not None else OSError(f"no address for {host}")
