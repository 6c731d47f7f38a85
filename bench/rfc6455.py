"""The few pieces of RFC 6455 that the benchmark's echo server and load generator share.

Stdlib only, no I/O: the opening-handshake key arithmetic, frame building, frame
header parsing and the XOR unmask. Both ``echo.py`` and ``loadgen.py`` import this
module by its bare name, so they run as plain scripts (``python bench/echo.py``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

ZERO_MASK = b"\x00\x00\x00\x00"
HEADER_END = b"\r\n\r\n"


def new_key() -> bytes:
    """A fresh random ``Sec-WebSocket-Key`` (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def parse_headers(block: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Split an HTTP/1.1 head (without the blank line) into its first line and headers.

    Header names are lower-cased; a repeated header keeps its last value.
    """
    lines = block.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def build_frame(opcode: int, payload: bytes, *, mask: bytes | None, fin: bool = True) -> bytes:
    """One complete frame; ``mask`` is the 4-byte key (client side) or None (server side)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + xor_mask(payload, mask, 0)


def parse_header(buf: bytes, pos: int) -> tuple[int, int, int, bytes | None, int] | None:
    """Parse the frame header starting at ``buf[pos]``.

    Returns ``(first_byte, payload_len, header_len, mask_or_None, rsv_bits)`` or None when
    the header is not complete yet. ``first_byte & 0x80`` is FIN, ``& 0x0F`` the opcode.
    """
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    n = b1 & 0x7F
    hlen = 2
    if n == 126:
        hlen = 4
        if avail < hlen:
            return None
        n = (buf[pos + 2] << 8) | buf[pos + 3]
    elif n == 127:
        hlen = 10
        if avail < hlen:
            return None
        (n,) = struct.unpack_from("!Q", buf, pos + 2)
    mask = None
    if b1 & 0x80:
        if avail < hlen + 4:
            return None
        mask = bytes(buf[pos + hlen : pos + hlen + 4])
        hlen += 4
    return b0, n, hlen, mask, b0 & 0x70


def xor_mask(data: bytes | memoryview, mask: bytes, offset: int) -> bytes:
    """(Un)mask ``data`` whose first byte sits at ``offset`` within its frame payload.

    Uses one big-integer XOR instead of a per-byte loop. An all-zero key is the identity
    and costs only the copy.
    """
    n = len(data)
    if n == 0:
        return b""
    if mask == ZERO_MASK:
        return bytes(data)
    r = offset & 3
    key = mask[r:] + mask[:r]
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def server_header(first_byte: int, n: int) -> bytes:
    """An unmasked frame header with ``first_byte`` (FIN/RSV/opcode) and payload length n."""
    if n < 126:
        return bytes((first_byte, n))
    if n < 65536:
        return struct.pack("!BBH", first_byte, 126, n)
    return struct.pack("!BBQ", first_byte, 127, n)
