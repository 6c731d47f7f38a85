"""RFC 6455 by hand, for tests that play a raw peer: the upgrade and a frame codec.

Written independently of ``wsproxy.proto`` on purpose: the tests check the
proxy with it, so it must not share the proxy's code (a bug in
``proto.frames`` must not be able to hide itself). It is deliberately
lenient: it encodes whatever it is asked to (reserved bits, wrong lengths,
unmasked client frames) so that tests can send what a broken peer would.

What is here:

- the opening handshake: ``accept_for`` (§4.2.2), ``UPGRADE_REQUEST`` and
  ``upgrade_request``, ``read_head``, ``read_head_rest``, ``read_until_eof``
  and ``header`` for raw HTTP;
- the frame codec (§5.2): ``frame`` encodes one frame, masked or not;
  ``Frame`` is one decoded frame; ``parse_frames`` decodes what a buffer
  holds; ``FrameReader`` and ``read_frame`` read frames from a trio stream.

What is not here: extensions (permessage-deflate), fragmentation rules and
UTF-8 checks; a test that needs them uses a real peer (websockets,
trio-websocket).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

import trio

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: RFC 6455 §1.3: the GUID the accept value is computed with.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- the opening handshake ----------------------------------------------------------------------


def accept_for(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID)), the Sec-WebSocket-Accept for ``key``."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def upgrade_request(
    path: bytes = b"/chat", *, key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==", host: bytes = b"127.0.0.1", extra: bytes = b""
) -> bytes:
    """A minimal valid client upgrade request (§4.1); ``extra`` is more header lines, each ending in CRLF."""
    return (
        b"GET " + path + b" HTTP/1.1\r\n"
        b"Host: " + host + b"\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


#: The upgrade request of RFC 6455 §1.2's example, for GET /chat.
UPGRADE_REQUEST = upgrade_request()


def random_key() -> bytes:
    """A fresh Sec-WebSocket-Key (§4.1: 16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16))


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until an HTTP head is complete; everything read (the head and what came with it).
    Fails if the peer closes first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data
    return buf


async def read_head_rest(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """An HTTP head up to and including its blank line, and the bytes read after it."""
    head, _, rest = (await read_head(stream)).partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes; a reset or a TLS error counts as closed."""
    buf = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return buf
        if not data:
            return buf
        buf += data


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of the first header ``name`` (any case) in a raw head, or None."""
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


# -- frames -------------------------------------------------------------------------------------


def apply_mask(data: bytes, key: bytes) -> bytes:
    """§5.3 masking (its own inverse), fast enough for megabyte payloads."""
    if not data:
        return data
    keys = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(len(data), "big")


def frame_header(opcode: int, length: int, *, mask: bytes | None = None, fin: bool = True, rsv: int = 0) -> bytes:
    """The header of one frame (§5.2), masking key included; the payload follows it (masked by the caller)."""
    bit = 0x80 if mask else 0
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    if length < 126:
        head.append(bit | length)
    elif length < 1 << 16:
        head += bytes([bit | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + length.to_bytes(8, "big")
    return bytes(head) + (mask or b"")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    mask: bool | bytes | None = None,
    fin: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One frame. ``mask``: True masks with a random key (a client's frame, §5.3), bytes with
    that key, False/None leaves it unmasked (a server's). ``rsv`` is the RSV bits in place
    (0x40 is RSV1); ``length`` overrides the length field (to lie about it)."""
    key = os.urandom(4) if mask is True else (mask or None)
    head = frame_header(opcode, len(payload) if length is None else length, mask=key, fin=fin, rsv=rsv)
    return head + (apply_mask(payload, key) if key else payload)


def client_frame(opcode: int, payload: bytes = b"", **kw: object) -> bytes:
    """A frame as a client must send it: masked with a random key."""
    return frame(opcode, payload, mask=True, **kw)  # type: ignore[arg-type]


def close_payload(code: int, reason: str = "") -> bytes:
    """The body of a close frame (§5.5.1): the code, then the UTF-8 reason."""
    return code.to_bytes(2, "big") + reason.encode()


@dataclass
class Frame:
    """One decoded frame; ``payload`` is unmasked, ``at`` the trio time a reader read it (0 when parsed)."""

    opcode: int
    payload: bytes
    masked: bool
    fin: bool = True
    rsv: int = 0
    at: float = 0.0

    @property
    def code(self) -> int:
        """The close code of a close frame (§5.5.1)."""
        assert self.opcode == OP_CLOSE and len(self.payload) >= 2, self
        return int.from_bytes(self.payload[:2], "big")

    close_code = code

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode()

    @property
    def close(self) -> tuple[int, str]:
        """(code, reason) of a close frame."""
        return self.code, self.close_reason


def parse_frame(buf: bytearray) -> Frame | int:
    """Take the first whole frame off ``buf``; if it holds none, the byte count needed to go on."""
    if len(buf) < 2:
        return 2
    b0, b1 = buf[0], buf[1]
    n, pos = b1 & 0x7F, 2
    if n >= 126:
        size = 2 if n == 126 else 8
        if len(buf) < 2 + size:
            return 2 + size
        n, pos = int.from_bytes(buf[2 : 2 + size], "big"), 2 + size
    key = b""
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return pos + 4
        key, pos = bytes(buf[pos : pos + 4]), pos + 4
    if len(buf) < pos + n:
        return pos + n
    payload = bytes(buf[pos : pos + n])
    del buf[: pos + n]
    return Frame(b0 & 0x0F, apply_mask(payload, key) if key else payload, bool(key), bool(b0 & 0x80), b0 & 0x70)


def parse_frames(data: bytes) -> list[Frame]:
    """Every whole frame in ``data`` (for pure tests of what the proxy queued)."""
    frames = []
    buf = bytearray(data)
    while isinstance(f := parse_frame(buf), Frame):
        frames.append(f)
    return frames


class FrameReader:
    """Reads frames from a raw stream, with the bytes already read after a head as ``buffered``."""

    def __init__(self, stream: trio.abc.ReceiveStream, buffered: bytes | bytearray = b"") -> None:
        self.stream = stream
        self.buf = buffered if isinstance(buffered, bytearray) else bytearray(buffered)
        self.eof = False  # the peer closed (or reset) the connection

    async def fill(self, n: int) -> bool:
        """Read until ``buf`` holds ``n`` bytes; False at EOF, a reset or our own close."""
        while len(self.buf) < n:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof = True
                return False
            self.buf += data
        return True

    async def read(self) -> Frame | None:
        """The next frame (its ``at`` set to the time it was complete), or None at EOF."""
        while not isinstance(got := parse_frame(self.buf), Frame):
            if not await self.fill(got):
                return None
        got.at = trio.current_time()
        return got

    async def read_until_close(self) -> tuple[list[Frame], Frame | None]:
        """Frames up to and including the first close frame (``None`` if EOF came first)."""
        seen: list[Frame] = []
        while True:
            f = await self.read()
            if f is None:
                return seen, None
            if f.opcode == OP_CLOSE:
                return seen, f
            seen.append(f)

    async def read_eof(self) -> bytes:
        """Everything until the peer closes TCP."""
        while not self.eof:
            await self.fill(len(self.buf) + 1)
        return bytes(self.buf)


async def read_frame(stream: trio.abc.ReceiveStream, buf: bytearray) -> Frame | None:
    """The next frame from ``buf`` + ``stream`` (``buf`` keeps what follows it); None at EOF."""
    return await FrameReader(stream, buf).read()


async def raw_client(port: int, extra_headers: bytes = b"") -> tuple[trio.SocketStream, FrameReader, bytes]:
    """A real handshake through the proxy by hand; returns the stream, a reader and the 101 head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n" + extra_headers + b"\r\n"
    )
    head, rest = await read_head_rest(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert header(head, b"sec-websocket-accept") == accept_for(key), head
    return stream, FrameReader(stream, rest), head


async def raw_accept(stream: trio.SocketStream, then: bytes = b"") -> tuple[bytes, FrameReader]:
    """The server half of the handshake by hand; ``then`` goes out in the same send_all as the 101."""
    head, rest = await read_head_rest(stream)
    key = header(head, b"sec-websocket-key")
    assert key is not None, head
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n" + then
    )
    return head, FrameReader(stream, rest)
