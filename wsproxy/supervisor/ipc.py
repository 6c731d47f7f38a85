"""The supervisor ↔ worker channel: JSON lines over a Unix stream socket, sockets as SCM_RIGHTS (trio shell).

``Channel.send`` writes one message (``messages.encode``) in one ``sendmsg``
with the descriptors of ``sockets`` attached; ``Channel.receive`` returns the
next message and the sockets that came with it. The kernel delivers the
descriptors with the first byte of the message they were sent with, so they
are queued in arrival order and a message takes as many as it announces
(``"fds": n``). Sending and receiving are each serialised by a lock, so tasks
may share a channel.

What this is not: it does not know what the messages mean (``supervisor.main``
and ``supervisor.worker`` do) and it never blocks the event loop.
"""

from __future__ import annotations

import array
import socket
from collections import deque
from collections.abc import Sequence

import trio

from ..errors import WsproxyError
from .messages import LineDecoder, Message, ProtocolError, encode

#: Descriptors accepted by one recvmsg (a listener resolving to several addresses, times a few listeners).
MAX_FDS_PER_READ = 253
READ_BYTES = 256 * 1024


class ChannelClosed(WsproxyError):
    """The other process closed its end (it exited)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = LineDecoder()
        self._messages: deque[Message] = deque()
        self._fds: deque[int] = deque()
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._closed = False

    def close(self) -> None:
        """Close our end; a task waiting on it gets ChannelClosed."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        while self._fds:
            socket.close(self._fds.popleft())

    async def send(self, message: Message, sockets: Sequence[socket.socket] = ()) -> None:
        """Send ``message`` and, attached, the descriptors of ``sockets`` (which stay open here)."""
        if sockets:
            message = {**message, "fds": len(sockets)}
        data = memoryview(encode(message))
        fds = [s.fileno() for s in sockets]
        async with self._send_lock:
            while data:
                try:
                    if fds:
                        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        sent = self.sock.sendmsg([data], ancillary)
                        fds = []
                    else:
                        sent = self.sock.send(data)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(self.sock)
                    except trio.ClosedResourceError:
                        raise ChannelClosed("closed here") from None
                    continue
                except OSError as exc:
                    raise ChannelClosed(str(exc)) from None
                data = data[sent:]

    async def receive(self) -> tuple[Message, list[socket.socket]]:
        """The next message and its sockets (non-blocking, close-on-exec); ChannelClosed at the end."""
        async with self._receive_lock:
            while not self._messages:
                try:
                    data, ancdata, _flags, _address = self.sock.recvmsg(
                        READ_BYTES, socket.CMSG_SPACE(MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_readable(self.sock)
                    except trio.ClosedResourceError:
                        raise ChannelClosed("closed here") from None
                    continue
                except OSError as exc:
                    raise ChannelClosed(str(exc)) from None
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                        self._fds.extend(fds)
                if not data:
                    raise ChannelClosed("closed by the other process")
                self._messages.extend(self._decoder.feed(data))
            message = self._messages.popleft()
            count = message.get("fds", 0)
            if not isinstance(count, int) or count < 0 or count > len(self._fds):
                raise ProtocolError(f"message {message.get('t')!r} announces {count!r} descriptors, {len(self._fds)} came")
            sockets = []
            for _ in range(count):
                sock = socket.socket(fileno=self._fds.popleft())
                sock.setblocking(False)
                sockets.append(sock)
            return message, sockets
