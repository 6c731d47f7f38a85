"""Listening sockets and the accept loop (trio shell).

``open_listener`` binds a ``ListenerConfig``'s address (every address a name
resolves to); ``accept_loop`` accepts in batches and starts one handler task
per connection in the nursery it is given, with the peer's address as
``accept`` gave it (no ``getpeername`` later).

With ``workers: N`` the supervisor opens N sockets per address with
``SO_REUSEPORT`` (``open_listener(spec, reuse_port=True)``), one per worker,
and keeps them open itself, so a worker that exits or is replaced loses no
connection waiting in its accept queue: nothing is closed, so nothing needs
draining. Only a socket closed for good (fewer workers after an upgrade)
loses its queue, unless ``net.ipv4.tcp_migrate_req = 1`` (Linux 5.13+), with
which the kernel moves it to another socket of the group (``migrate_req``
reads the setting; the supervisor logs a hint when it is off).

Out of file descriptors (``EMFILE``/``ENFILE``), a plain ``accept`` fails and
the connection stays in the backlog, unanswered, until the client gives up.
The accept loop sheds load instead, with the spare-descriptor technique: it
holds one descriptor in reserve (``/dev/null``); on EMFILE it closes the
spare, accepts, answers (``overload_answer``, a 503 with ``Retry-After`` on
plain listeners; nothing on TLS ones, which are just closed) and closes, as
long as connections are waiting (at most ``SHED_BATCH`` in a row), then opens
the spare again. Then it backs off for ``OVERLOAD_BACKOFF_S`` without
spinning, so established sessions can finish and free descriptors. Out of
memory or buffers, it only backs off. Either way one WARNING a second at most
says so (``event=accept_overload``, with ``shed`` and ``suppressed`` counts);
connections already established are unaffected.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config.schema import ListenerConfig
from .overload import RateLimitedWarning
from ..log import log_event

log = logging.getLogger("wsproxy.edge.listener")

BACKLOG = 4096
#: Linux copies a listening socket's TCP_NODELAY to the sockets it accepts (``accept_loop`` sets
#: it on the listener): no ``setsockopt`` per connection (``edge.session``). Elsewhere, one each.
NODELAY_INHERITED = sys.platform.startswith("linux")
ACCEPT_BATCH = 64  # connections accepted before the loop lets other tasks run
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN}
#: Connections answered and closed in a row while out of descriptors, before backing off.
SHED_BATCH = 256
#: Pause of the accept loop after running out of descriptors, memory or buffers.
OVERLOAD_BACKOFF_S = 0.05

_overloaded = RateLimitedWarning(log)


#: The sysctl that makes closing one SO_REUSEPORT listener hand its queue to another.
MIGRATE_REQ_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def open_listener(spec: ListenerConfig, *, reuse_port: bool = False, port: int | None = None) -> list[socket.socket]:
    """Bind and listen on every address ``spec.bind`` resolves to.

    ``reuse_port``: set ``SO_REUSEPORT`` (one socket per worker on the same
    address); ``port`` overrides the configured port (the port 0 of a listener
    resolved by its first socket, for the others of the group).
    """
    infos = socket.getaddrinfo(
        spec.bind.host, spec.bind.port if port is None else port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _canon, address in infos:
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def migrate_req() -> bool | None:
    """``net.ipv4.tcp_migrate_req``: True on, False off, None where the kernel has no such setting."""
    try:
        with open(MIGRATE_REQ_SYSCTL, encoding="ascii") as file:
            return file.read().strip() == "1"
    except OSError:
        return None


def _open_spare() -> int | None:
    """The reserved descriptor (``/dev/null``), or None when even that cannot be had now."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _shed(sock: socket.socket, answer: bytes | None) -> None:
    """Answer (or not) and close a connection accepted only to be refused, without waiting.

    The request the client already sent is read and dropped before the close,
    so that the close is a FIN and not a reset that could destroy the answer
    in flight (RFC 9112 §9.6).
    """
    try:
        sock.setblocking(False)
        if answer is not None:
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        for _ in range(4):
            if not sock.recv(65536):
                break
    except OSError:  # BlockingIOError (nothing more yet), reset, ...
        pass
    finally:
        sock.close()


async def accept_loop(
    lsock: socket.socket,
    handler: Callable[[socket.socket, Any], Awaitable[None]],
    nursery: trio.Nursery,
    overload_answer: Callable[[], bytes | None] = lambda: None,
    on_shed: Callable[[int], None] | None = None,
) -> None:
    """Accept forever on ``lsock``, one ``handler(sock, address)`` task per connection.

    The listener gets TCP_NODELAY, which the sockets it accepts inherit on
    Linux (``NODELAY_INHERITED``); the connections that were already queued
    (until the queue is first empty: systemd's or an upgrade's socket, a
    restarted loop) get it one by one.

    ``overload_answer`` gives the bytes sent to a connection shed while the
    process is out of file descriptors (None: close it without a word);
    ``on_shed(n)`` counts them (``wsproxy_refused_total{reason="overload"}``).
    """
    batch = 0
    spare = _open_spare()
    try:
        lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # for every socket it accepts from now on
        backlog = True  # connections queued before that (until the queue is first empty) have not got it
    except OSError:  # not TCP (a unix socket in tests)
        backlog = False
    try:
        while True:
            try:
                sock, address = lsock.accept()
            except BlockingIOError:
                batch = 0
                backlog = False
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:
                if lsock.fileno() == -1:  # closed by its owner (a shutdown or reload) before this task ran
                    return
                if exc.errno in _RESOURCE_ERRNOS:
                    shed = 0
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and spare is not None:
                        os.close(spare)
                        spare = None
                        shed = _shed_waiting(lsock, overload_answer())
                        if shed and on_shed is not None:
                            on_shed(shed)
                    if spare is None:
                        spare = _open_spare()  # None again if the descriptor was taken meanwhile
                    _overloaded.warning("accept_overload", listener=_name(lsock), reason=exc.strerror, shed=shed)
                    await trio.sleep(OVERLOAD_BACKOFF_S)
                    continue
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                raise
            if backlog:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # reset already: the handler finds out
                    pass
            nursery.start_soon(handler, sock, address)
            batch += 1
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()
    finally:
        if spare is not None:
            os.close(spare)


def _shed_waiting(lsock: socket.socket, answer: bytes | None) -> int:
    """With the spare's descriptor free: accept, answer and close waiting connections; how many."""
    shed = 0
    while shed < SHED_BATCH:
        try:
            sock, _address = lsock.accept()
        except OSError:  # none waiting (BlockingIOError), or the free descriptor was taken meanwhile
            break
        _shed(sock, answer)
        shed += 1
    return shed


def _name(lsock: socket.socket) -> str:
    try:
        host, port = lsock.getsockname()[:2]
    except OSError:  # pragma: no cover - closed under us
        return "-"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
