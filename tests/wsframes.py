"""A tiny WebSocket frame codec for tests that play a raw peer (RFC 6455 §5.2).

Written independently of ``wsproxy.proto.frames`` on purpose: the tests check
the proxy with it, so it must not share the proxy's code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

OP_CLOSE = 0x8


def frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True, rsv: int = 0) -> bytes:
    """One frame (final unless ``fin`` is false); masked with a random key when ``mask``."""
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes(head) + payload


@dataclass
class Frame:
    opcode: int
    payload: bytes  # unmasked
    masked: bool

    @property
    def code(self) -> int:
        assert self.opcode == OP_CLOSE, self
        return int.from_bytes(self.payload[:2], "big")


async def read_frame(stream: trio.abc.ReceiveStream, buf: bytearray) -> Frame | None:
    """The next frame from ``buf`` + ``stream``; None at EOF."""

    async def fill(n: int) -> bool:
        while len(buf) < n:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return False
            buf.extend(data)
        return True

    if not await fill(2):
        return None
    n, pos = buf[1] & 0x7F, 2
    if n >= 126:
        size = 2 if n == 126 else 8
        if not await fill(2 + size):
            return None
        n, pos = int.from_bytes(buf[2 : 2 + size], "big"), 2 + size
    key = b""
    if buf[1] & 0x80:
        if not await fill(pos + 4):
            return None
        key, pos = bytes(buf[pos : pos + 4]), pos + 4
    if not await fill(pos + n):
        return None
    opcode, payload = buf[0] & 0x0F, bytes(buf[pos : pos + n])
    del buf[: pos + n]
    if key:
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return Frame(opcode, payload, bool(key))


def parse_frames(data: bytes) -> list[Frame]:
    """Every whole frame in ``data`` (for pure tests of what the proxy queued)."""
    frames = []
    buf = bytearray(data)
    while len(buf) >= 2:
        n, pos = buf[1] & 0x7F, 2
        if n >= 126:
            size = 2 if n == 126 else 8
            n, pos = int.from_bytes(buf[2 : 2 + size], "big"), 2 + size
        key = b""
        if buf[1] & 0x80:
            key, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + n:
            break
        opcode, payload = buf[0] & 0x0F, bytes(buf[pos : pos + n])
        del buf[: pos + n]
        if key:
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        frames.append(Frame(opcode, payload, bool(key)))
    return frames
