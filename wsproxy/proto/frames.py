"""Incremental WebSocket frame scanner for the relay (RFC 6455 §5). No I/O here.

The relay forwards bytes, not messages: payloads are never unmasked, decoded or
copied. A ``FrameScanner`` watches one direction of a session and decides, for
each chunk received, how much of it may be forwarded now.

Theory of operation
-------------------
The scanner walks frame *headers* and skips payloads by arithmetic. It keeps one
invariant that the rest of the proxy relies on:

    The bytes forwarded so far always end either inside a data frame's payload
    or exactly at a frame boundary, never inside a frame header, and no byte of
    a frame is forwarded before its whole header has been validated.

To keep it, an incomplete header at the end of a chunk is held back (at most 14
bytes) and joined to the next chunk. Control frames (close, ping, pong: at most
131 bytes) are held back until they are complete, so the scanner always sees a
whole control frame: it can read a close frame's status code, and a later
keepalive can take its own pongs out of the stream.

Because of the invariant, ``at_boundary`` after a chunk has been forwarded tells
the relay whether a frame of its own (a close frame, a ping) may be written to
the same destination now, and every violation is caught before the offending
frame starts on the wire: the relay forwards what precedes it and closes.

What is enforced (a ``Violation`` with the close code for the offender):
- RFC 6455 §5.1: client frames MUST be masked, server frames MUST NOT be (1002).
- §5.2: RSV bits MUST be 0 unless an extension defines them (1002); with
  permessage-deflate (RFC 7692 §6) RSV1 is allowed on the first frame of a data
  message only.
- §5.2: reserved opcodes 3-7 and 0xB-0xF (1002).
- §5.2: a 64-bit length with the most significant bit set (1002).
- §5.4: continuation without a message in progress, a new data message inside a
  fragmented one (1002).
- §5.5: control frames of more than 125 bytes or fragmented (1002); §5.5.1: a
  close payload of exactly one byte (1002).
- ``max_message_bytes``: the sum of a message's payload lengths, checked from
  the headers before any byte of the frame that would exceed it is sent (1009).

Keepalive: when the proxy pings a peer, the scanner reading that peer is given
the ping's payload (``swallow_pong``); the matching pong is cut out of what
``feed`` returns, so the other side never sees an answer to a ping it did not
send. Everything else, including unsolicited pongs, passes.

Payload checks (``validate_utf8``, on by default; RFC 6455 §8.1, §5.5.1, §7.4):
- text messages must be valid UTF-8 (1007). The check is incremental: a code
  point may be split between frames of a message, or between two reads, and
  control frames interleaved in a fragmented message do not disturb it. Client
  payloads are unmasked only for the check (a copy; the forwarded bytes are
  the client's own). A frame whose payload is wholly in the chunk is checked
  before any byte of it is forwarded; when the invalid byte of a long frame
  arrives in a later read, the scanner stops there with ``remaining`` still
  non-zero (the destination is inside that frame and can get no close frame).
  Compressed messages (RSV1 with permessage-deflate) are not checked: the
  check would need an inflater and its window per direction and session
  (about 64 KiB each); both endpoints inflate, and check, anyway.
- close frames: the code must be one allowed on the wire (1000-1003,
  1007-1014, 3000-4999; 1002 otherwise) and the reason valid UTF-8 (1007);
  the code check is always on, the reason check follows ``validate_utf8``.
- §5.2: a length must use the minimal encoding (1002).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_GATEWAY = 1014

RSV1 = 0x40
RSV_ALL = 0x70

_MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask key)

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def close_code_allowed(code: int) -> bool:
    """May ``code`` appear in a close frame on the wire? (RFC 6455 §7.4, the IANA registry)

    1004 is reserved, 1005, 1006 and 1015 are for APIs only, 1016-2999 are
    unassigned or for extensions, 3000-4999 are for libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask_portable(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``key`` repeated, as one big-integer XOR (no per-byte loop)."""
    n = len(payload)
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


_apply_mask: Callable[[bytes, bytes], bytes]
try:
    # The websockets library's C masking routine: about 15 times faster than the integer
    # XOR on a 1 KiB payload (bench/README.md); the portable version where it is missing.
    # (Imported under another name and assigned: mypyc's build does not see websockets.)
    from websockets.speedups import apply_mask as _speedups_apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    _apply_mask = unmask_portable
else:
    _apply_mask = _speedups_apply_mask

#: Which masking routine ``unmask`` uses, for ``wsproxy --version``.
UNMASK_IMPL = "websockets.speedups" if _apply_mask is not unmask_portable else "portable"


def unmask(payload: bytes, key: bytes, phase: int = 0) -> bytes:
    """``payload`` XORed with the masking ``key`` (RFC 6455 §5.3).

    ``phase`` is the offset of ``payload`` within its frame's payload, modulo 4.
    """
    if phase:
        key = key[phase:] + key[:phase]
    return _apply_mask(payload, key)


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the protocol: close it with ``close_code``.

    Everything the scanner returned before the violation may be forwarded; the
    offending frame and everything after it must not be.
    """

    close_code: int
    reason: str


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it (a scanner with a bug)
class FrameScanner:
    """Scans one direction of a WebSocket connection.

    ``from_client`` selects the masking rule. ``rsv_allowed`` is the set of RSV
    bits the negotiated extensions may use (``RSV1`` for permessage-deflate,
    ``RSV_ALL`` when an extension the proxy does not know was negotiated).
    ``max_message_bytes`` of 0 means unlimited.

    Usage, once per chunk received::

        out = scanner.feed(chunk)     # forward ``out`` (may be empty)
        if scanner.violation: ...     # close the offender with its close_code
    """

    __slots__ = (
        "from_client",
        "rsv_allowed",
        "deflate",
        "max_message_bytes",
        "remaining",
        "violation",
        "in_message",
        "message_bytes",
        "messages",
        "close_code",
        "close_seen",
        "stop_at_boundary",
        "stopped",
        "swallow_pong",
        "pongs_swallowed",
        "validate_utf8",
        "_held",
        "_cuts",
        "_text",
        "_frame_text",
        "_frame_fin",
        "_mask",
        "_phase",
        "_utf8",
        "_utf8_pending",
    )

    def __init__(
        self,
        *,
        from_client: bool,
        rsv_allowed: int = 0,
        deflate: bool = False,
        max_message_bytes: int = 0,
        validate_utf8: bool = True,
    ) -> None:
        self.from_client = from_client
        self.rsv_allowed = rsv_allowed
        self.deflate = deflate  # RSV1 only on the first frame of a data message
        self.max_message_bytes = max_message_bytes
        #: payload bytes of the current data frame not yet seen
        self.remaining = 0
        #: set once; the scanner accepts nothing after it
        self.violation: Violation | None = None
        self.in_message = False  # a fragmented data message is in progress
        self.message_bytes = 0  # payload bytes of the current message so far
        self.messages = 0  # data messages whose final frame header has been seen
        #: the close frame's status code (CLOSE_NO_STATUS when it had no payload)
        self.close_code: int | None = None
        self.close_seen = False
        #: when set, ``feed`` returns only up to the next frame boundary and sets ``stopped``
        self.stop_at_boundary = False
        self.stopped = False
        #: the payload of the proxy's own outstanding ping to the other side of this
        #: direction's source: its pong is taken out of the stream, not forwarded
        self.swallow_pong: bytes | None = None
        self.pongs_swallowed = 0
        self.validate_utf8 = validate_utf8  # text payloads and close reasons must be UTF-8
        self._held = b""  # an incomplete header or control frame, not yet forwarded
        self._cuts: list[tuple[int, int]] = []  # frames to take out of the current chunk
        self._text = False  # the data message in progress is text whose payload is checked
        self._frame_text = False  # the frame in progress (``remaining``) is such a text frame
        self._frame_fin = False  # ...and it ends its message
        self._mask = b""  # ...its masking key (client frames)
        self._phase = 0  # ...and how far into its payload we are, modulo 4
        self._utf8: codecs.IncrementalDecoder | None = None  # made on the first non-ASCII text
        self._utf8_pending = False  # the decoder holds the start of a split code point

    @property
    def at_boundary(self) -> bool:
        """True when what has been forwarded ends exactly at a frame boundary."""
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        """Scan ``data``; return the part of it that may be forwarded now.

        With ``stop_at_boundary`` set, return only up to the end of the current
        frame and set ``stopped``; what follows is kept and scanned by the next
        ``feed`` once ``stop_at_boundary`` and ``stopped`` are cleared again
        (``feed(b"")`` scans it at once).
        """
        if self.violation is not None:
            return b""
        if self.stopped:
            self._held += data
            return b""
        remaining = self.remaining
        if remaining:
            # Inside a data payload: skip it without looking at it (unless it is text to check).
            n = len(data)
            if self._frame_text and self._check_more_text(data, min(remaining, n), remaining <= n):
                return b""
            if remaining >= n:
                self.remaining = remaining - n
                if self.stop_at_boundary and self.remaining == 0:
                    self.stopped = True
                return data
            self.remaining = 0
            if self.stop_at_boundary:
                self.stopped = True
                self._held = data[remaining:]
                return data[:remaining]
            end = self._scan(data, remaining)
            if self._cuts:
                return self._cut(data, end)
            return data if end == n else data[:end]
        if self._held:
            data = self._held + data
            self._held = b""
        if self.stop_at_boundary:
            self.stopped = True
            self._held = data
            return b""
        end = self._scan(data, 0)
        if self._cuts:
            return self._cut(data, end)
        return data if end == len(data) else data[:end]

    def _cut(self, data: bytes, end: int) -> bytes:
        """``data[:end]`` without the frames recorded in ``_cuts`` (the proxy's own pongs)."""
        pieces = []
        start = 0
        for cut_start, cut_end in self._cuts:
            pieces.append(data[start:cut_start])
            start = cut_end
        pieces.append(data[start:end])
        self._cuts = []
        return b"".join(pieces)

    def _scan(self, data: bytes, pos: int) -> int:
        """Walk the frames of ``data`` from ``pos`` (a frame boundary).

        Returns how many bytes of ``data`` may be forwarded; holds back an
        incomplete header or control frame, and stops before a violation.
        """
        n = len(data)
        from_client = self.from_client
        limit = self.max_message_bytes or 1 << 64
        while pos < n:
            if n - pos < 2:
                self._held = data[pos:]
                return pos
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            header_len = 2
            if length == 126:
                header_len = 4
            elif length == 127:
                header_len = 10
            masked = b1 & 0x80
            if masked:
                header_len += 4
            if n - pos < header_len:
                self._held = data[pos:]
                return pos
            if length == 126:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    return self._fail_length(pos, length)
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if length >> 63:
                    self.violation = Violation(
                        CLOSE_PROTOCOL_ERROR, "64-bit payload length with the most significant bit set"
                    )
                    return pos
                if length < 65536:
                    return self._fail_length(pos, length)
            opcode = b0 & 0x0F
            rsv = b0 & RSV_ALL
            fin = b0 & 0x80
            if (masked == 0) == from_client:
                return self._fail_mask(pos, from_client)
            if (b0 == 0x82 or b0 == 0x81) and length <= limit and not self.in_message:
                # The common case, a whole unfragmented text or binary message without
                # RSV bits: nothing else to check (the general path below agrees), but
                # the UTF-8 of a text frame that is all here.
                frame_end = pos + header_len + length
                if b0 == 0x81 and self.validate_utf8:
                    if frame_end > n:
                        pass  # text that continues in a later read: the general path
                    else:
                        start = pos + header_len
                        payload = data[start:frame_end]
                        if masked:
                            payload = _apply_mask(payload, data[start - 4 : start])
                        if not payload.isascii() and self._check_text(payload, True):
                            return pos
                        self.messages += 1
                        pos = frame_end
                        continue
                else:
                    self.messages += 1
                    if frame_end > n:
                        self.remaining = frame_end - n
                        return n
                    pos = frame_end
                    continue
            if opcode >= OP_CLOSE:
                if self._check_control(opcode, rsv, fin, length):
                    return pos
                frame_end = pos + header_len + length
                if frame_end > n:
                    self._held = data[pos:]
                    return pos
                if opcode == OP_CLOSE:
                    if self._read_close(data, pos + header_len, length, masked):
                        return pos
                elif opcode == OP_PONG and self.swallow_pong is not None:
                    if self._our_pong(data, pos + header_len, length, masked):
                        self._cuts.append((pos, frame_end))  # the answer to the proxy's own ping
                pos = frame_end
                continue
            if self._check_data(opcode, rsv, fin, length):
                return pos
            frame_end = pos + header_len + length
            if self._text and length:
                start = pos + header_len
                whole = frame_end <= n
                payload = data[start:frame_end] if whole else data[start:]
                if masked:
                    self._mask = data[start - 4 : start]
                    payload = unmask(payload, self._mask)
                if self._check_text(payload, whole and fin != 0):
                    return pos  # nothing of this frame has been forwarded
                if not whole:
                    self._frame_text = True
                    self._frame_fin = fin != 0
                    self._phase = (n - start) & 3
            elif self._text and fin and self._check_text(b"", True):
                return pos  # an empty final frame ends a message cut inside a code point
            if frame_end > n:
                self.remaining = frame_end - n
                return n
            pos = frame_end
        return pos

    def _check_text(self, payload: bytes, final: bool) -> bool:
        """Feed (unmasked) text payload to the UTF-8 check; True when it is invalid."""
        if not self._utf8_pending and payload.isascii():
            return False  # the common case: nothing split, nothing to decode
        decoder = self._utf8
        if decoder is None:
            decoder = self._utf8 = _Utf8Decoder()
        try:
            decoder.decode(payload, final)
        except UnicodeDecodeError:
            self.violation = Violation(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
            return True
        self._utf8_pending = bool(decoder.getstate()[0])
        return False

    def _check_more_text(self, data: bytes, count: int, frame_ends: bool) -> bool:
        """Check the next ``count`` payload bytes of the text frame in progress."""
        payload = data[:count]
        if self._mask:
            payload = unmask(payload, self._mask, self._phase)
            self._phase = (self._phase + count) & 3
        if frame_ends:
            self._frame_text = False
        return self._check_text(payload, frame_ends and self._frame_fin)

    def _fail_length(self, pos: int, length: int) -> int:
        """RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length"."""
        self.violation = Violation(CLOSE_PROTOCOL_ERROR, f"length {length} not in its minimal encoding")
        return pos

    def _fail_mask(self, pos: int, from_client: bool) -> int:
        """RFC 6455 §5.1: a client MUST mask every frame, a server MUST NOT."""
        reason = "unmasked frame from the client" if from_client else "masked frame from the server"
        self.violation = Violation(CLOSE_PROTOCOL_ERROR, reason)
        return pos

    def _check_opcode(self, opcode: int, rsv: int) -> bool:
        if opcode > OP_BINARY:
            self.violation = Violation(CLOSE_PROTOCOL_ERROR, f"reserved opcode 0x{opcode:x}")
            return True
        if rsv & ~self.rsv_allowed:
            self.violation = Violation(
                CLOSE_PROTOCOL_ERROR, f"RSV bits 0x{rsv >> 4:x} set without a negotiated extension"
            )
            return True
        return False

    def _check_control(self, opcode: int, rsv: int, fin: int, length: int) -> bool:
        """RFC 6455 §5.5: control frames are short and never fragmented."""
        if opcode > OP_PONG:
            self.violation = Violation(CLOSE_PROTOCOL_ERROR, f"reserved opcode 0x{opcode:x}")
        elif rsv and (self.deflate or rsv & ~self.rsv_allowed):
            # RFC 7692 §6: permessage-deflate never sets RSV1 on control frames.
            self.violation = Violation(
                CLOSE_PROTOCOL_ERROR, f"RSV bits 0x{rsv >> 4:x} set on a control frame"
            )
        elif not fin:
            self.violation = Violation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
        elif length > 125:
            self.violation = Violation(
                CLOSE_PROTOCOL_ERROR, f"control frame of {length} bytes (the limit is 125)"
            )
        return self.violation is not None

    def _check_data(self, opcode: int, rsv: int, fin: int, length: int) -> bool:
        """Fragmentation (§5.4), RSV bits and the message size limit of a data frame."""
        if self._check_opcode(opcode, rsv):
            return True
        if opcode == OP_CONTINUATION:
            if not self.in_message:
                self.violation = Violation(
                    CLOSE_PROTOCOL_ERROR, "continuation frame without a message in progress"
                )
                return True
            if rsv & RSV1 and self.deflate:
                self.violation = Violation(CLOSE_PROTOCOL_ERROR, "RSV1 set on a continuation frame")
                return True
            size = self.message_bytes + length
        else:
            if self.in_message:
                self.violation = Violation(
                    CLOSE_PROTOCOL_ERROR, "new data message inside a fragmented message"
                )
                return True
            size = length
            # A new message: its payload is checked if it is text and not compressed.
            self._text = opcode == OP_TEXT and self.validate_utf8 and not (rsv & RSV1 and self.deflate)
            if self._utf8_pending:
                assert self._utf8 is not None
                self._utf8.reset()
                self._utf8_pending = False
            self._mask = b""
        limit = self.max_message_bytes
        if limit and size > limit:
            self.violation = Violation(
                CLOSE_MESSAGE_TOO_BIG, f"message of more than {limit} bytes (at least {size})"
            )
            return True
        if fin:
            self.in_message = False
            self.message_bytes = 0
            self.messages += 1
        else:
            self.in_message = True
            self.message_bytes = size
        return False

    def _our_pong(self, data: bytes, start: int, length: int, masked: int) -> bool:
        """Is this pong the answer to the proxy's ping (``swallow_pong``)? Then it is taken out."""
        expected = self.swallow_pong
        assert expected is not None
        if length != len(expected):
            return False
        payload = data[start : start + length]
        if masked:
            payload = unmask(payload, data[start - 4 : start])
        if payload != expected:
            return False
        self.swallow_pong = None
        self.pongs_swallowed += 1
        return True

    def _read_close(self, data: bytes, start: int, length: int, masked: int) -> bool:
        """Record a close frame's status code (§5.5.1)."""
        if length == 1:
            self.violation = Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
            return True
        if length == 0:
            code = CLOSE_NO_STATUS
        else:
            payload = data[start : start + length]
            if masked:
                payload = unmask(payload, data[start - 4 : start])
            code = (payload[0] << 8) | payload[1]
            if not close_code_allowed(code):
                self.violation = Violation(CLOSE_PROTOCOL_ERROR, f"close code {code} is not allowed on the wire")
                return True
            if self.validate_utf8:
                try:
                    payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    self.violation = Violation(CLOSE_INVALID_DATA, "invalid UTF-8 in a close reason")
                    return True
        self.close_code = code
        self.close_seen = True
        return False


def encode_ping(payload: bytes, *, mask: bytes | None = None) -> bytes:
    """A complete ping frame (RFC 6455 §5.5.2), masked when ``mask`` is given."""
    if mask is None:
        return bytes((0x80 | OP_PING, len(payload))) + payload
    return bytes((0x80 | OP_PING, 0x80 | len(payload))) + mask + unmask(payload, mask)


def encode_close(code: int, reason: str = "", *, mask: bytes | None = None) -> bytes:
    """A complete close frame (RFC 6455 §5.5.1), masked when ``mask`` is given.

    The proxy writes close frames of its own towards a client unmasked and
    towards a backend masked (it is the backend's client).
    """
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:  # §5.5: 125 bytes of payload; cut on a character boundary
        encoded = encoded[:123].decode("utf-8", "ignore").encode("utf-8")
    payload = code.to_bytes(2, "big") + encoded
    if mask is None:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + mask + unmask(payload, mask)
