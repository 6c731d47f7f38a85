"""Output that a non-blocking socket has not accepted yet (shared by echo and load generator).

A ``bytearray`` with ``del buf[:sent]`` moves the whole remainder after every partial send,
which turns bulk transfers under backpressure quadratic. This buffer keeps the pending
chunks as they are and an offset into the first one, so every byte is copied once, by the
kernel. Small chunks are merged on append, so a backlog of small frames still goes out in
few ``send`` calls.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque

MERGE_BELOW = 64 * 1024  # append to the last chunk while it is smaller than this


class OutBuffer:
    """Pending output; ``bool(buf)`` tells whether anything is left."""

    __slots__ = ("chunks", "offset")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # bytes of chunks[0] already sent

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def append(self, data: bytes | memoryview) -> None:
        if self.chunks and len(self.chunks[-1]) < MERGE_BELOW:
            self.chunks[-1] += data
        else:
            self.chunks.append(bytes(data))

    def send_to(self, sock: socket.socket) -> None:
        """Send as much as the kernel takes now. Raises OSError other than would-block."""
        while self.chunks:
            head = self.chunks[0]
            try:
                sent = sock.send(memoryview(head)[self.offset :])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return  # (the SSL ones: echo.py --tls-io sock, where sock is an SSLSocket)
            self.offset += sent
            if self.offset < len(head):
                return
            self.chunks.popleft()
            self.offset = 0
