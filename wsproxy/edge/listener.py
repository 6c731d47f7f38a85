"""Listening sockets and the accept loop (trio shell).

``open_listener`` binds a ``ListenerConfig``'s address (every address a name
resolves to); ``accept_loop`` accepts in batches and starts one handler task
per connection in the nursery it is given. When the process runs out of file
descriptors or memory, accepting pauses briefly and says so once a second
instead of spinning; connections already established are unaffected.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from ..config.schema import ListenerConfig

log = logging.getLogger("wsproxy.edge.listener")

BACKLOG = 4096
ACCEPT_BATCH = 64  # connections accepted before the loop lets other tasks run
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN}


def open_listener(spec: ListenerConfig) -> list[socket.socket]:
    """Bind and listen on every address ``spec.bind`` resolves to."""
    infos = socket.getaddrinfo(
        spec.bind.host, spec.bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _canon, address in infos:
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


async def accept_loop(
    lsock: socket.socket,
    handler: Callable[[socket.socket], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept forever on ``lsock``, one ``handler(sock)`` task per connection."""
    batch = 0
    last_warning = -1.0
    while True:
        try:
            sock, _address = lsock.accept()
        except BlockingIOError:
            batch = 0
            await trio.lowlevel.wait_readable(lsock)
            continue
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                now = trio.current_time()
                if now - last_warning >= 1.0:
                    last_warning = now
                    log.warning("event=accept_paused reason=%r", exc.strerror)
                await trio.sleep(0.1)
                continue
            if exc.errno in _TRANSIENT_ERRNOS:
                continue
            raise
        nursery.start_soon(handler, sock)
        batch += 1
        if batch >= ACCEPT_BATCH:
            batch = 0
            await trio.lowlevel.checkpoint()
