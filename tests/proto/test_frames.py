"""FrameScanner and encode_close, driven by frames from a real peer (wsproto).

Every valid stream is fed whole, byte by byte and in random splits: the bytes
returned must add up to the input exactly and the scanner must end in the same
state however the input was cut. Every violation listed in the frames.py
docstring is checked for its close code and for the bytes forwarded before it
(exactly the frames that precede the offender). Hand-built frames appear only
where wsproto refuses to produce the offending shape.

No sockets and no event loop here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol, Opcode

from wsproxy.proto.frames import (
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_PROTOCOL_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV_ALL,
    FrameScanner,
    encode_close,
)

MASK_KEY = b"\x37\xfa\x21\x3d"
DIRECTIONS = pytest.mark.parametrize("from_client", [True, False], ids=["from_client", "from_server"])


# --- building input -----------------------------------------------------------


def peer(from_client: bool, *, deflate: bool = False) -> FrameProtocol:
    """A wsproto endpoint that writes what the scanned side would send.

    A client (``from_client``) masks its frames, a server does not. With
    ``deflate`` the endpoint runs a real permessage-deflate extension, which
    sets RSV1 on the first frame of each data message.
    """
    extensions: list[Extension] = []
    if deflate:
        ext = PerMessageDeflate()
        ext.finalize("permessage-deflate")
        extensions.append(ext)
    return FrameProtocol(client=from_client, extensions=extensions)


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    masked: bool,
    fin: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A hand-built frame, for the shapes a real peer refuses to produce.

    ``length`` overrides the length field (the payload is still ``payload``),
    which lets a test announce more than it sends.
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if n <= 125:
        header = bytes((b0, mask_bit | n))
    elif n <= 0xFFFF:
        header = bytes((b0, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((b0, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    return header + MASK_KEY + bytes(b ^ MASK_KEY[i & 3] for i, b in enumerate(payload))


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splits(seed: int) -> Callable[[bytes], list[bytes]]:
    def split(data: bytes) -> list[bytes]:
        rng = random.Random(seed)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 12)))
        return cut(data, cuts)

    split.__name__ = f"random_splits_{seed}"
    return split


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


SPLITTERS = [whole, bytewise, random_splits(1), random_splits(2), random_splits(3)]
SPLIT = pytest.mark.parametrize("split", SPLITTERS, ids=lambda f: f.__name__)
WHOLE_AND_BYTEWISE = pytest.mark.parametrize("split", [whole, bytewise], ids=lambda f: f.__name__)


def run(scanner: FrameScanner, chunks: list[bytes]) -> bytes:
    return b"".join(scanner.feed(chunk) for chunk in chunks)


@dataclass(frozen=True)
class State:
    messages: int
    close_seen: bool
    close_code: int | None
    at_boundary: bool
    remaining: int
    violation_code: int | None


def state(scanner: FrameScanner) -> State:
    return State(
        messages=scanner.messages,
        close_seen=scanner.close_seen,
        close_code=scanner.close_code,
        at_boundary=scanner.at_boundary,
        remaining=scanner.remaining,
        violation_code=scanner.violation.close_code if scanner.violation else None,
    )


def scan_valid(data: bytes, split: Callable[[bytes], list[bytes]], **kwargs: object) -> State:
    """Feed a valid stream; everything must come back, in order, with no violation."""
    scanner = FrameScanner(**kwargs)  # type: ignore[arg-type]
    out = run(scanner, split(data))
    assert scanner.violation is None, scanner.violation
    assert out == data
    return state(scanner)


# --- valid streams --------------------------------------------------------------

# Every length encoding and its edges: 7-bit (0, 125), 16-bit (126, 65535), 64-bit (65536 and more).
LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 65537]


@DIRECTIONS
@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
@pytest.mark.parametrize("length", LENGTHS)
@SPLIT
def test_single_data_frame_of_every_length_encoding(
    from_client: bool, text: bool, length: int, split: Callable[[bytes], list[bytes]]
) -> None:
    payload: str | bytes = "é" * (length // 2) + "x" * (length % 2) if text else bytes(range(256)) * (length // 256) + bytes(length % 256)
    data = bytes(peer(from_client).send_data(payload))
    assert (data[0] & 0x0F) == (OP_TEXT if text else OP_BINARY)
    assert len(data) - (4 if from_client else 0) == length + (2 if length <= 125 else 4 if length <= 0xFFFF else 10)
    result = scan_valid(data, split, from_client=from_client)
    assert result == State(1, False, None, True, 0, None)


@DIRECTIONS
@pytest.mark.parametrize("split", [whole, random_splits(7), random_splits(8)], ids=lambda f: f.__name__)
def test_large_frame(from_client: bool, split: Callable[[bytes], list[bytes]]) -> None:
    data = bytes(peer(from_client).send_data(b"\xab" * (3 << 20)))
    assert scan_valid(data, split, from_client=from_client).messages == 1


@DIRECTIONS
def test_payload_is_forwarded_as_it_arrives(from_client: bool) -> None:
    """Inside a data payload nothing is held back, and ``remaining`` counts down."""
    data = bytes(peer(from_client).send_data(b"z" * 1000))
    header_len = 4 + (4 if from_client else 0)
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(data[: header_len - 1]) == b""  # an incomplete header is held
    assert scanner.at_boundary
    assert scanner.feed(data[header_len - 1 : header_len + 10]) == data[: header_len + 10]
    assert (scanner.remaining, scanner.at_boundary) == (990, False)
    assert scanner.feed(data[header_len + 10 : -1]) == data[header_len + 10 : -1]
    assert scanner.remaining == 1
    assert scanner.feed(data[-1:]) == data[-1:]
    assert scanner.at_boundary


@DIRECTIONS
def test_control_frames_are_held_until_complete(from_client: bool) -> None:
    data = bytes(peer(from_client).ping(b"p" * 125))
    scanner = FrameScanner(from_client=from_client)
    for i in range(len(data) - 1):
        assert scanner.feed(data[i : i + 1]) == b""
        assert scanner.at_boundary
    assert scanner.feed(data[-1:]) == data


def fragmented_stream(from_client: bool) -> tuple[bytes, int]:
    """Two fragmented messages with pings and pongs between the fragments, then a close."""
    p = peer(from_client)
    parts = [
        p.send_data("Hello, ", fin=False),
        p.ping(b"are you there?"),
        p.send_data("fragmented ", fin=False),
        p.pong(b""),
        p.ping(b""),
        p.send_data("world", fin=True),
        p.send_data(b"\x00" * 200, fin=False),
        p.ping(b"x" * 125),
        p.send_data(b"\x01" * 70000, fin=False),
        p.send_data(b"", fin=True),
        p.send_data(b"", fin=True),  # an empty message is a message
        p.close(1001, "going away"),
    ]
    return b"".join(bytes(part) for part in parts), 3


@DIRECTIONS
@SPLIT
def test_fragmented_messages_with_interleaved_control_frames(
    from_client: bool, split: Callable[[bytes], list[bytes]]
) -> None:
    data, messages = fragmented_stream(from_client)
    assert scan_valid(data, split, from_client=from_client) == State(messages, True, 1001, True, 0, None)


@DIRECTIONS
@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [(None, None, CLOSE_NO_STATUS), (1000, None, 1000), (1000, "bye", 1000), (4321, "é" * 61, 4321), (3000, "", 3000)],
)
@SPLIT
def test_close_code(
    from_client: bool,
    code: int | None,
    reason: str | None,
    expected: int,
    split: Callable[[bytes], list[bytes]],
) -> None:
    data = bytes(peer(from_client).close(code, reason))
    result = scan_valid(data, split, from_client=from_client)
    assert result == State(0, True, expected, True, 0, None)


@DIRECTIONS
def test_close_code_is_unmasked_with_the_frames_own_key(from_client: bool) -> None:
    """Several masked close frames, each with a different key: each code is read right."""
    scanner = FrameScanner(from_client=from_client)
    for code in (1000, 1001, 1011, 3999, 4000, 4999):
        data = bytes(peer(from_client).close(code, "r"))
        assert scanner.feed(data) == data
        assert scanner.close_code == code


@DIRECTIONS
def test_message_counting(from_client: bool) -> None:
    p = peer(from_client)
    scanner = FrameScanner(from_client=from_client)
    counts = []
    for part in [
        p.send_data("a"),
        p.ping(),
        p.send_data(b"b", fin=False),
        p.send_data(b"c", fin=False),
        p.pong(),
        p.send_data(b"d", fin=True),
        p.send_data(""),
    ]:
        scanner.feed(bytes(part))
        counts.append(scanner.messages)
    assert counts == [1, 1, 1, 1, 1, 2, 3]


# --- violations -----------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A stream whose frames after ``valid`` must not pass, and the close code for it."""

    valid: bytes  # forwarded
    offender: bytes  # not forwarded, nor anything after it
    close_code: int


def preamble(p: FrameProtocol) -> bytes:
    """A few valid frames of every kind and length encoding, ending between messages."""
    return b"".join(
        bytes(x)
        for x in (
            p.ping(b"hi"),
            p.send_data("hello"),
            p.send_data(b"\x00" * 300),
            p.pong(b""),
            p.send_data(b"f", fin=False),
            p.send_data(b"g", fin=True),
        )
    )


ViolationCase = Callable[[bool], tuple[dict[str, object], Bad]]
VIOLATIONS: dict[str, ViolationCase] = {}


def violation(name: str) -> Callable[[ViolationCase], ViolationCase]:
    def register(case: ViolationCase) -> ViolationCase:
        VIOLATIONS[name] = case
        return case

    return register


@violation("wrong masking for the direction (§5.1)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    return {}, Bad(preamble(p), raw_frame(OP_TEXT, b"hi", masked=not from_client), CLOSE_PROTOCOL_ERROR)


for _rsv in (0x40, 0x20, 0x10, 0x70):

    @violation(f"RSV 0x{_rsv:x} on a data frame without an extension (§5.2)")
    def _(from_client: bool, rsv: int = _rsv) -> tuple[dict[str, object], Bad]:
        p = peer(from_client)
        return {}, Bad(preamble(p), raw_frame(OP_BINARY, b"x", masked=from_client, rsv=rsv), CLOSE_PROTOCOL_ERROR)


@violation("RSV1 on a continuation frame without an extension (§5.2)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    valid = preamble(p) + bytes(p.send_data(b"a", fin=False))
    offender = raw_frame(OP_CONTINUATION, b"b", masked=from_client, rsv=RSV1)
    return {}, Bad(valid, offender, CLOSE_PROTOCOL_ERROR)


@violation("RSV1 on a ping without an extension (§5.2)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    return {}, Bad(preamble(p), raw_frame(OP_PING, b"", masked=from_client, rsv=RSV1), CLOSE_PROTOCOL_ERROR)


for _opcode in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):

    @violation(f"reserved opcode 0x{_opcode:x} (§5.2)")
    def _(from_client: bool, opcode: int = _opcode) -> tuple[dict[str, object], Bad]:
        p = peer(from_client)
        return {}, Bad(preamble(p), raw_frame(opcode, b"", masked=from_client), CLOSE_PROTOCOL_ERROR)


@violation("64-bit length with the most significant bit set (§5.2)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    header = bytes((0x82, (0x80 if from_client else 0) | 127)) + (1 << 63).to_bytes(8, "big")
    return {}, Bad(preamble(p), header + (MASK_KEY if from_client else b"") + b"xx", CLOSE_PROTOCOL_ERROR)


@violation("continuation frame first (§5.4)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    return {}, Bad(b"", raw_frame(OP_CONTINUATION, b"x", masked=from_client), CLOSE_PROTOCOL_ERROR)


@violation("continuation frame after a finished message (§5.4)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    return {}, Bad(preamble(p), raw_frame(OP_CONTINUATION, b"x", masked=from_client), CLOSE_PROTOCOL_ERROR)


@violation("text frame inside a fragmented message (§5.4)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    valid = preamble(p) + bytes(p.send_data("a", fin=False)) + bytes(p.ping(b"between"))
    return {}, Bad(valid, raw_frame(OP_TEXT, b"b", masked=from_client), CLOSE_PROTOCOL_ERROR)


@violation("binary frame inside a fragmented message (§5.4)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    valid = preamble(p) + bytes(p.send_data(b"a", fin=False)) + bytes(p.send_data(b"b", fin=False))
    return {}, Bad(valid, raw_frame(OP_BINARY, b"c", masked=from_client), CLOSE_PROTOCOL_ERROR)


for _opcode, _length in ((OP_PING, 126), (OP_PONG, 126), (OP_CLOSE, 126), (OP_PING, 65536)):

    @violation(f"control frame 0x{_opcode:x} of {_length} bytes (§5.5)")
    def _(from_client: bool, opcode: int = _opcode, length: int = _length) -> tuple[dict[str, object], Bad]:
        p = peer(from_client)
        payload = b"\x03\xe8" + b"r" * (length - 2)
        return {}, Bad(preamble(p), raw_frame(opcode, payload, masked=from_client), CLOSE_PROTOCOL_ERROR)


for _opcode in (OP_PING, OP_PONG, OP_CLOSE):

    @violation(f"fragmented control frame 0x{_opcode:x} (§5.5)")
    def _(from_client: bool, opcode: int = _opcode) -> tuple[dict[str, object], Bad]:
        p = peer(from_client)
        offender = raw_frame(opcode, b"\x03\xe8", masked=from_client, fin=False)
        return {}, Bad(preamble(p), offender, CLOSE_PROTOCOL_ERROR)


@violation("close frame with a 1-byte payload (§5.5.1)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    return {}, Bad(preamble(p), raw_frame(OP_CLOSE, b"\x03", masked=from_client), CLOSE_PROTOCOL_ERROR)


@violation("one frame over max_message_bytes")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    valid = bytes(p.send_data(b"a" * 100))
    return {"max_message_bytes": 100}, Bad(valid, bytes(p.send_data(b"a" * 101)), CLOSE_MESSAGE_TOO_BIG)


@violation("fragments over max_message_bytes")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client)
    valid = b"".join(
        bytes(x)
        for x in (
            p.send_data(b"a" * 100),  # the limit exactly
            p.send_data(b"b" * 60, fin=False),
            p.ping(b"x" * 100),  # control payloads do not count
            p.send_data(b"c" * 40, fin=False),  # 100 so far: still fine
            p.send_data(b"", fin=False),
        )
    )
    return {"max_message_bytes": 100}, Bad(valid, bytes(p.send_data(b"d", fin=True)), CLOSE_MESSAGE_TOO_BIG)


@violation("a 64-bit announced length over max_message_bytes")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    offender = raw_frame(OP_BINARY, b"", masked=from_client, length=1 << 40)
    return {"max_message_bytes": 1 << 20}, Bad(b"", offender, CLOSE_MESSAGE_TOO_BIG)


DEFLATE: dict[str, object] = {"deflate": True, "rsv_allowed": RSV1}


@violation("permessage-deflate: RSV1 on a continuation frame (RFC 7692 §6)")
def _(from_client: bool) -> tuple[dict[str, object], Bad]:
    p = peer(from_client, deflate=True)
    valid = preamble(p) + bytes(p.send_data(b"a" * 50, fin=False))
    return DEFLATE, Bad(valid, raw_frame(OP_CONTINUATION, b"b", masked=from_client, rsv=RSV1), CLOSE_PROTOCOL_ERROR)


for _opcode in (OP_PING, OP_PONG, OP_CLOSE):

    @violation(f"permessage-deflate: RSV1 on control frame 0x{_opcode:x} (RFC 7692 §6)")
    def _(from_client: bool, opcode: int = _opcode) -> tuple[dict[str, object], Bad]:
        p = peer(from_client, deflate=True)
        offender = raw_frame(opcode, b"\x03\xe8", masked=from_client, rsv=RSV1)
        return DEFLATE, Bad(preamble(p), offender, CLOSE_PROTOCOL_ERROR)


for _rsv in (0x20, 0x10):

    @violation(f"permessage-deflate: RSV 0x{_rsv:x} on a data frame")
    def _(from_client: bool, rsv: int = _rsv) -> tuple[dict[str, object], Bad]:
        p = peer(from_client, deflate=True)
        offender = raw_frame(OP_TEXT, b"x", masked=from_client, rsv=rsv)
        return DEFLATE, Bad(preamble(p), offender, CLOSE_PROTOCOL_ERROR)


@DIRECTIONS
@pytest.mark.parametrize("case", list(VIOLATIONS), ids=list(VIOLATIONS))
@WHOLE_AND_BYTEWISE
def test_violation(from_client: bool, case: str, split: Callable[[bytes], list[bytes]]) -> None:
    kwargs, bad = VIOLATIONS[case](from_client)
    trailer = bytes(peer(from_client).send_data("after"))  # valid, but after the offender
    scanner = FrameScanner(from_client=from_client, **kwargs)  # type: ignore[arg-type]
    out = run(scanner, split(bad.valid + bad.offender + trailer))
    assert scanner.violation is not None, "no violation"
    assert scanner.violation.close_code == bad.close_code, scanner.violation
    assert scanner.violation.reason
    assert out == bad.valid
    assert scanner.at_boundary
    # Once violated, the scanner accepts nothing.
    assert scanner.feed(trailer) == b""
    assert scanner.feed(b"") == b""


@DIRECTIONS
def test_violation_in_a_later_chunk_keeps_what_came_before(from_client: bool) -> None:
    """An offender that arrives after a payload in progress: the payload's tail still passes."""
    p = peer(from_client)
    data = bytes(p.send_data(b"x" * 1000))
    offender = raw_frame(OP_CONTINUATION, b"", masked=from_client)
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(data[:500]) == data[:500]
    assert scanner.feed(data[500:] + offender) == data[500:]
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_PROTOCOL_ERROR


# --- permessage-deflate ---------------------------------------------------------


@DIRECTIONS
@SPLIT
def test_deflate_rsv1_on_first_frames(from_client: bool, split: Callable[[bytes], list[bytes]]) -> None:
    """Real compressed frames from wsproto pass when permessage-deflate was negotiated."""
    p = peer(from_client, deflate=True)
    frames = [
        bytes(p.send_data("compress me " * 50)),
        bytes(p.send_data(b"\x00" * 5000, fin=False)),
        bytes(p.ping(b"uncompressed")),
        bytes(p.send_data(b"\x01" * 5000, fin=False)),
        bytes(p.send_data(b"\x02" * 5000, fin=True)),
        bytes(p.close(1000, "done")),
    ]
    assert frames[0][0] & RSV_ALL == RSV1  # the real extension did set RSV1
    assert frames[1][0] & RSV_ALL == RSV1
    assert frames[3][0] & RSV_ALL == 0  # and not on continuation frames
    data = b"".join(frames)
    assert scan_valid(data, split, from_client=from_client, **DEFLATE) == State(2, True, 1000, True, 0, None)


@DIRECTIONS
def test_deflate_frames_without_negotiation_are_refused(from_client: bool) -> None:
    data = bytes(peer(from_client, deflate=True).send_data("compress me"))
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(data) == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_PROTOCOL_ERROR


@DIRECTIONS
def test_unknown_extension_may_use_every_rsv_bit(from_client: bool) -> None:
    """``rsv_allowed=RSV_ALL`` (an extension the proxy does not know) lets RSV bits through anywhere."""
    frames = b"".join(
        raw_frame(op, payload, masked=from_client, fin=fin, rsv=rsv)
        for op, payload, fin, rsv in (
            (OP_TEXT, b"a", False, 0x70),
            (OP_CONTINUATION, b"b", False, 0x40),
            (OP_PING, b"", True, 0x20),
            (OP_CONTINUATION, b"c", True, 0x10),
        )
    )
    scanner = FrameScanner(from_client=from_client, rsv_allowed=RSV_ALL)
    assert scanner.feed(frames) == frames
    assert scanner.violation is None and scanner.messages == 1


# --- max_message_bytes ----------------------------------------------------------


@DIRECTIONS
@pytest.mark.parametrize(("sizes", "ok"), [((100,), True), ((101,), False), ((50, 50), True), ((50, 51), False), ((0, 100, 0), True), ((99, 0, 1, 1), False)])
def test_max_message_bytes_across_fragments(from_client: bool, sizes: tuple[int, ...], ok: bool) -> None:
    p = peer(from_client)
    frames = [bytes(p.send_data(b"m" * n, fin=i == len(sizes) - 1)) for i, n in enumerate(sizes)]
    data = b"".join(frames) + bytes(p.send_data(b"m" * 100))  # a second message starts a new count
    scanner = FrameScanner(from_client=from_client, max_message_bytes=100)
    out = run(scanner, bytewise(data))
    if ok:
        assert (out, scanner.violation, scanner.messages) == (data, None, 2)
    else:
        assert scanner.violation is not None and scanner.violation.close_code == CLOSE_MESSAGE_TOO_BIG
        assert out == b"".join(frames[:-1])


def test_zero_means_unlimited() -> None:
    data = raw_frame(OP_BINARY, b"", masked=False, length=(1 << 63) - 1)
    scanner = FrameScanner(from_client=False, max_message_bytes=0)
    assert scanner.feed(data) == data
    assert scanner.remaining == (1 << 63) - 1


# --- stop_at_boundary -----------------------------------------------------------


@DIRECTIONS
def test_stop_at_boundary_inside_a_payload(from_client: bool) -> None:
    p = peer(from_client)
    frame = bytes(p.send_data(b"x" * 1000))
    close = bytes(p.close(1001, "bye"))
    after = bytes(p.send_data("late"))
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(frame[:500]) == frame[:500]
    scanner.stop_at_boundary = True
    # The rest of the frame, the close frame and more, in one chunk.
    assert scanner.feed(frame[500:] + close + after[:3]) == frame[500:]
    assert scanner.stopped and scanner.at_boundary
    assert not scanner.close_seen
    assert scanner.feed(after[3:]) == b""  # held while stopped
    scanner.stop_at_boundary = False
    scanner.stopped = False
    assert scanner.feed(b"") == close + after
    assert (scanner.close_seen, scanner.close_code, scanner.messages) == (True, 1001, 2)
    assert scanner.violation is None


@DIRECTIONS
def test_stop_at_boundary_when_the_chunk_ends_with_the_frame(from_client: bool) -> None:
    p = peer(from_client)
    frame = bytes(p.send_data(b"x" * 1000))
    close = bytes(p.close(1000))
    scanner = FrameScanner(from_client=from_client)
    scanner.feed(frame[:10])
    scanner.stop_at_boundary = True
    assert scanner.feed(frame[10:500]) == frame[10:500]
    assert not scanner.stopped
    assert scanner.feed(frame[500:]) == frame[500:]
    assert scanner.stopped
    assert scanner.feed(close) == b""
    scanner.stop_at_boundary = scanner.stopped = False
    assert scanner.feed(b"") == close
    assert scanner.close_code == 1000


@DIRECTIONS
def test_stop_at_boundary_at_a_boundary(from_client: bool) -> None:
    p = peer(from_client)
    first = bytes(p.send_data("one"))
    rest = bytes(p.ping(b"p")) + bytes(p.send_data("two"))
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(first) == first
    scanner.stop_at_boundary = True
    assert scanner.feed(rest[:3]) == b""
    assert scanner.stopped
    assert scanner.feed(rest[3:]) == b""
    scanner.stop_at_boundary = scanner.stopped = False
    assert scanner.feed(b"") == rest
    assert scanner.messages == 2


@DIRECTIONS
def test_stop_at_boundary_then_violation_is_still_caught(from_client: bool) -> None:
    p = peer(from_client)
    frame = bytes(p.send_data(b"x" * 100))
    offender = raw_frame(OP_CONTINUATION, b"", masked=from_client)
    scanner = FrameScanner(from_client=from_client)
    scanner.feed(frame[:50])
    scanner.stop_at_boundary = True
    assert scanner.feed(frame[50:] + offender) == frame[50:]
    scanner.stop_at_boundary = scanner.stopped = False
    assert scanner.feed(b"") == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_PROTOCOL_ERROR


# --- properties -----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    text: bool
    fragment_sizes: list[int]
    controls: list[list[tuple[str, int]]]  # control frames after each fragment


control_frame = st.tuples(st.sampled_from(["ping", "pong"]), st.integers(0, 125))
messages = st.lists(
    st.integers(1, 4).flatmap(
        lambda n: st.builds(
            Message,
            text=st.booleans(),
            fragment_sizes=st.lists(st.integers(0, 3000), min_size=n, max_size=n),
            controls=st.lists(st.lists(control_frame, max_size=2), min_size=n, max_size=n),
        )
    ),
    max_size=6,
)
closes = st.none() | st.just((None, None)) | st.tuples(st.sampled_from([1000, 1001, 1011, 3000, 4999]), st.text(max_size=20))


def build_stream(p: FrameProtocol, msgs: list[Message], close: tuple[int | None, str | None] | None) -> Iterator[bytes]:
    for msg in msgs:
        last = len(msg.fragment_sizes) - 1
        for i, (size, controls) in enumerate(zip(msg.fragment_sizes, msg.controls)):
            yield bytes(p.send_data("t" * size if msg.text else b"\xb0" * size, fin=i == last))
            for kind, n in controls:
                yield bytes(getattr(p, kind)(b"c" * n))
    if close is not None:
        yield bytes(p.close(*close))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    from_client=st.booleans(),
    deflate=st.booleans(),
    msgs=messages,
    close=closes,
    data=st.data(),
)
def test_valid_streams_pass_unchanged_however_split(
    from_client: bool,
    deflate: bool,
    msgs: list[Message],
    close: tuple[int | None, str | None] | None,
    data: st.DataObject,
) -> None:
    stream = b"".join(build_stream(peer(from_client, deflate=deflate), msgs, close))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    kwargs = {"from_client": from_client, **(DEFLATE if deflate else {})}
    scanner = FrameScanner(**kwargs)  # type: ignore[arg-type]
    out = b""
    for chunk in cut(stream, cuts):
        out += scanner.feed(chunk)
        assert stream.startswith(out)
    assert scanner.violation is None
    assert out == stream
    expected_close = None if close is None else (close[0] if close[0] is not None else CLOSE_NO_STATUS)
    assert state(scanner) == State(len(msgs), close is not None, expected_close, True, 0, None)


def header_walk(data: bytes) -> tuple[set[int], list[tuple[int, int, int, int]]]:
    """A test-side reading of frame headers, without validation.

    Returns the frame boundaries and, for each complete header, (start,
    header_end, frame_end, opcode).
    """
    boundaries = {0}
    headers = []
    pos = 0
    while len(data) - pos >= 2:
        length = data[pos + 1] & 0x7F
        header_len = 2 + {126: 2, 127: 8}.get(length, 0) + (4 if data[pos + 1] & 0x80 else 0)
        if len(data) - pos < header_len:
            break
        if length == 126:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        headers.append((pos, pos + header_len, pos + header_len + length, data[pos] & 0x0F))
        pos += header_len + length
        if pos > len(data):
            break
        boundaries.add(pos)
    return boundaries, headers


@dataclass(frozen=True)
class FrameSpec:
    """A frame of any shape, valid or not; its mask bit is decided by the direction."""

    opcode: int
    payload: bytes
    wrong_mask: bool
    fin: bool
    rsv: int
    length: int | None  # announced length, when it differs from the payload's

    def build(self, from_client: bool) -> bytes:
        masked = from_client != self.wrong_mask
        return raw_frame(self.opcode, self.payload, masked=masked, fin=self.fin, rsv=self.rsv, length=self.length)


frame_specs = st.builds(
    FrameSpec,
    # Mostly the six defined opcodes, so that streams get far enough to be interesting.
    opcode=st.sampled_from([OP_TEXT, OP_BINARY, OP_CONTINUATION, OP_PING, OP_PONG, OP_CLOSE] * 3 + list(range(16))),
    payload=st.binary(max_size=200),
    wrong_mask=st.sampled_from([False] * 19 + [True]),
    fin=st.sampled_from([True, True, True, False]),
    rsv=st.sampled_from([0] * 8 + [RSV1, 0x20, 0x10]),
    length=st.one_of(
        st.none(),
        st.sampled_from([0, 1, 2, 125, 126, 65535, 65536, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
    ),
)
garbage: st.SearchStrategy[tuple[list[FrameSpec], bytes]] = st.one_of(
    st.tuples(st.lists(frame_specs, min_size=1, max_size=8), st.binary(max_size=40)),  # frames, then junk
    st.binary(max_size=400).map(lambda junk: ([], junk)),  # junk only
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    junk=garbage,
    from_client=st.booleans(),
    rsv_allowed=st.sampled_from([0, RSV1, RSV_ALL]),
    max_message_bytes=st.sampled_from([0, 1, 100, 70000]),
    validate_utf8=st.booleans(),
    splits=st.data(),
)
def test_garbage_never_raises_and_forwards_a_frame_aligned_prefix(
    junk: tuple[list[FrameSpec], bytes],
    from_client: bool,
    rsv_allowed: int,
    max_message_bytes: int,
    validate_utf8: bool,
    splits: st.DataObject,
) -> None:
    specs, tail = junk
    data = b"".join(spec.build(from_client) for spec in specs) + tail
    kwargs = {
        "from_client": from_client,
        "rsv_allowed": rsv_allowed,
        "deflate": rsv_allowed == RSV1,
        "max_message_bytes": max_message_bytes,
        "validate_utf8": validate_utf8,
    }
    reference = FrameScanner(**kwargs)  # type: ignore[arg-type]
    whole_out = reference.feed(data)
    cuts = splits.draw(st.lists(st.integers(0, len(data)), max_size=10), label="cuts")
    scanner = FrameScanner(**kwargs)  # type: ignore[arg-type]
    split_out = run(scanner, cut(data, cuts))

    assert data.startswith(whole_out)
    if reference.violation is not None and reference.violation.close_code == CLOSE_INVALID_DATA:
        # Invalid UTF-8 is found where its byte arrives: fed whole, before the frame that
        # holds it; fed in pieces, possibly inside that frame, after its valid start.
        assert scanner.violation == reference.violation
        assert data.startswith(split_out) and split_out.startswith(whole_out)
        return
    # However it was cut, the same bytes pass and the scanner ends in the same state.
    assert split_out == whole_out
    assert state(scanner) == state(reference)

    boundaries, headers = header_walk(data)
    end = len(whole_out)
    if reference.violation is not None:
        event(f"violation {reference.violation.close_code}")
    elif not reference.at_boundary:
        event("inside a data payload")
    else:
        event("all passed" if end == len(data) else "holding an incomplete frame")
    # Never inside a header, nor before a header was validated.
    assert not any(start < end < header_end for start, header_end, _, _ in headers)
    if reference.violation is not None or end < len(data):
        # Stopped early (violation, or holding an incomplete header/control frame): at a boundary.
        assert end in boundaries
        assert reference.at_boundary
    if not reference.at_boundary:
        # Inside a data payload: all of the input passed, and what is still expected adds up.
        assert end == len(data)
        start, header_end, frame_end, opcode = max(h for h in headers if h[0] < end)
        assert opcode < OP_CLOSE
        assert reference.remaining == frame_end - end


# --- encode_close ---------------------------------------------------------------


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, ""), (1001, "going away"), (1002, "unmasked frame from the client"), (1009, "message of more than 100 bytes"),
     (1011, "é"), (1012, "restart"), (1013, "try again later"), (3000, "x" * 123), (4999, "ü" * 61)],
)
def test_encode_close_round_trips_through_wsproto(masked: bool, code: int, reason: str) -> None:
    frame = encode_close(code, reason, mask=MASK_KEY if masked else None)
    # A masked frame goes to a server (the backend), an unmasked one to a client.
    receiver = FrameProtocol(client=not masked, extensions=[])
    receiver.receive_bytes(frame)
    (parsed,) = list(receiver.received_frames())
    assert parsed.opcode is Opcode.CLOSE
    assert parsed.payload == (code, reason)
    # And the scanner of that direction reads the same code.
    scanner = FrameScanner(from_client=masked)
    assert scanner.feed(frame) == frame
    assert scanner.close_code == code


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_encode_close_truncates_a_long_reason_to_fit_a_control_frame(masked: bool) -> None:
    frame = encode_close(1001, "r" * 500, mask=MASK_KEY if masked else None)
    receiver = FrameProtocol(client=not masked, extensions=[])
    receiver.receive_bytes(frame)
    (parsed,) = list(receiver.received_frames())
    assert parsed.payload == (1001, "r" * 123)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_encode_close_truncates_a_long_reason_on_a_character_boundary(masked: bool) -> None:
    """RFC 6455 §5.5.1: the reason is UTF-8; cutting it at 123 bytes must not split a character."""
    reason = "é" * 100  # 200 bytes; 123 would cut the 62nd "é" in half
    frame = encode_close(1001, reason, mask=MASK_KEY if masked else None)
    receiver = FrameProtocol(client=not masked, extensions=[])
    receiver.receive_bytes(frame)
    (parsed,) = list(receiver.received_frames())
    assert parsed.payload == (1001, "é" * 61)
