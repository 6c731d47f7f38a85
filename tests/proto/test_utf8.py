"""The scanner's payload checks: UTF-8 of text messages and close reasons, close codes, length encodings.

RFC 6455 §8.1 (text is UTF-8; invalid text fails the connection with 1007), §7.4 (which close codes may be
sent), §5.5.1 (the close reason is UTF-8), §5.2 (minimal length encoding). The inputs are the Autobahn
testsuite's categories (6.x, 7.5, 7.9) written out here, fed whole, byte by byte and in random pieces; a
hypothesis property checks the verdict against Python's own UTF-8 decoder over arbitrary fragmentations.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kit.ws import frame
from wsproxy.proto.frames import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    RSV1,
    FrameScanner,
    UNMASK_IMPL,
    close_code_allowed,
    unmask,
    unmask_portable,
)

OP_CONT = 0x0

VALID = {
    "ascii": b"Hello, world",
    "2-byte": "caf\u00e9".encode(),
    "3-byte": "\u20ac\u2603".encode(),
    "4-byte": "\U0001f600\U0010ffff".encode(),
    "greek kosme": "\u03ba\u1f79\u03c3\u03bc\u03b5".encode(),
    "boundary U+D7FF": "\ud7ff".encode(),
    "boundary U+E000": "\ue000".encode(),
    "boundary U+FFFD": "\ufffd".encode(),
    "empty": b"",
}

INVALID = {
    "overlong /": b"\xc0\xaf",
    "overlong 3-byte /": b"\xe0\x80\xaf",
    "overlong 4-byte /": b"\xf0\x80\x80\xaf",
    "overlong NUL": b"\xc0\x80",
    "lone continuation": b"\x80",
    "surrogate U+D800": b"\xed\xa0\x80",
    "surrogate U+DFFF": b"\xed\xbf\xbf",
    "surrogate pair": b"\xed\xa0\x80\xed\xb0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "0xF5 lead": b"\xf5\x80\x80\x80",
    "0xFE": b"\xfe",
    "0xFF": b"\xff",
    "truncated 2-byte at end": b"abc\xc3",
    "truncated 4-byte at end": b"abc\xf0\x9f\x98",
    "kosme then invalid": "\u03ba\u1f79\u03c3\u03bc\u03b5".encode() + b"\xed\xa0\x80edited",
    "invalid after valid ascii": b"hello\xffworld",
}


def fragments(payload: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(payload)]
    return [payload[a:b] for a, b in zip(bounds, bounds[1:])]


def text_message(parts: list[bytes], *, mask: bool, ping_between: bool = False) -> bytes:
    """One text message in ``len(parts)`` frames, with a ping between fragments if asked."""
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        out.append(frame(OP_TEXT if i == 0 else OP_CONT, part, mask=mask, fin=last))
        if ping_between and not last:
            out.append(frame(OP_PING, b"\xff\xfe not text", mask=mask))
    return b"".join(out)


def chunks(data: bytes, how: str, seed: int = 0) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    return fragments(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 10))])


def scan(data: bytes, how: str, *, from_client: bool, **kwargs: object) -> tuple[bytes, FrameScanner]:
    scanner = FrameScanner(from_client=from_client, **kwargs)  # type: ignore[arg-type]
    out = b"".join(scanner.feed(piece) for piece in chunks(data, how, seed=len(data)))
    return out, scanner


HOW = pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
SIDE = pytest.mark.parametrize("from_client", [True, False], ids=["client", "server"])


@HOW
@SIDE
@pytest.mark.parametrize("name", list(VALID))
def test_valid_text_passes_unchanged(name: str, how: str, from_client: bool) -> None:
    payload = VALID[name]
    data = text_message([payload], mask=from_client) + text_message(fragments(payload, [1, 2, 5]), mask=from_client, ping_between=True)
    out, scanner = scan(data, how, from_client=from_client)
    assert scanner.violation is None
    assert out == data  # byte for byte: the client's masked bytes are forwarded as they came
    assert scanner.messages == 2


@HOW
@SIDE
@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_text_is_1007_and_the_frame_holding_it_is_not_forwarded_whole(name: str, how: str, from_client: bool) -> None:
    before = frame(OP_BINARY, b"\xff binary is not checked", mask=from_client)
    bad = text_message([INVALID[name]], mask=from_client)
    after = frame(OP_TEXT, b"never", mask=from_client)
    out, scanner = scan(before + bad + after, how, from_client=from_client)
    assert scanner.violation is not None
    assert scanner.violation.close_code == CLOSE_INVALID_DATA
    assert scanner.violation.reason == "invalid UTF-8 in a text message"
    assert out.startswith(before) and len(out) < len(before + bad)
    if how == "whole":
        assert out == before and scanner.at_boundary


@SIDE
@pytest.mark.parametrize("name", ["4-byte", "3-byte", "2-byte", "greek kosme"])
def test_a_code_point_split_between_frames_is_valid(name: str, from_client: bool) -> None:
    payload = VALID[name]
    for cut in range(1, len(payload)):
        data = text_message(fragments(payload, [cut]), mask=from_client, ping_between=True)
        out, scanner = scan(data, "bytewise", from_client=from_client)
        assert scanner.violation is None, (cut, scanner.violation)
        assert out == data


@SIDE
def test_fragmented_message_fails_fast_at_the_bad_fragment(from_client: bool) -> None:
    """Autobahn 6.4.x: the fragment holding the invalid byte fails at once, before the message ends."""
    first = frame(OP_TEXT, "\u03ba\u1f79\u03c3\u03bc\u03b5".encode(), mask=from_client, fin=False)
    bad = frame(OP_CONT, b"\xf4\x90\x80\x80", mask=from_client, fin=False)
    scanner = FrameScanner(from_client=from_client)
    assert scanner.feed(first) == first
    assert scanner.feed(bad) == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA


@SIDE
def test_invalid_byte_arriving_late_inside_a_long_frame_stops_there(from_client: bool) -> None:
    """The frame's valid start has gone; the scanner stops inside it (``remaining`` > 0)."""
    payload = b"a" * 1000 + b"\xff" + b"b" * 99
    data = frame(OP_TEXT, payload, mask=from_client)
    scanner = FrameScanner(from_client=from_client)
    first = scanner.feed(data[:600])
    assert first == data[:600]
    assert scanner.feed(data[600:]) == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA
    assert scanner.remaining > 0


@SIDE
def test_truncated_sequence_at_message_end_is_invalid_even_with_an_empty_last_frame(from_client: bool) -> None:
    data = frame(OP_TEXT, b"ok\xe2\x82", mask=from_client, fin=False) + frame(OP_CONT, b"", mask=from_client)
    out, scanner = scan(data, "whole", from_client=from_client)
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA
    # ...while the same bytes completed by the next fragment are fine.
    good = frame(OP_TEXT, b"ok\xe2\x82", mask=from_client, fin=False) + frame(OP_CONT, b"\xac", mask=from_client)
    out, scanner = scan(good, "bytewise", from_client=from_client)
    assert scanner.violation is None and out == good


def test_a_new_message_starts_with_a_clean_decoder() -> None:
    """Binary messages are never checked, and do not inherit a text message's state."""
    data = frame(OP_BINARY, b"\xff\xfe", mask=False) + frame(OP_TEXT, b"fine", mask=False)
    out, scanner = scan(data, "bytewise", from_client=False)
    assert scanner.violation is None and out == data


def test_validation_off_forwards_invalid_text() -> None:
    data = text_message([INVALID["surrogate U+D800"]], mask=True)
    out, scanner = scan(data, "whole", from_client=True, validate_utf8=False)
    assert scanner.violation is None and out == data


def test_compressed_text_is_not_checked() -> None:
    """With permessage-deflate, RSV1 marks a compressed message: its bytes are not UTF-8 to check."""
    data = frame(OP_TEXT, b"\xff\x00\xfe", mask=True, rsv=RSV1)
    out, scanner = scan(data, "whole", from_client=True, rsv_allowed=RSV1, deflate=True)
    assert scanner.violation is None and out == data
    # An uncompressed text message in the same session still is.
    bad = frame(OP_TEXT, b"\xff", mask=True)
    out, scanner = scan(data + bad, "whole", from_client=True, rsv_allowed=RSV1, deflate=True)
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA


@settings(deadline=None, max_examples=400)
@given(
    payload=st.one_of(
        st.text(max_size=40).map(str.encode),
        st.binary(max_size=40),
        st.lists(st.sampled_from([*VALID.values(), *INVALID.values(), b"\xe2", b"\x82\xac", b"\xf0\x9f"]), max_size=6).map(b"".join),
    ),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    read_cuts=st.lists(st.integers(0, 400), max_size=8),
    from_client=st.booleans(),
)
def test_verdict_matches_pythons_decoder_however_the_message_is_cut(
    payload: bytes, cuts: list[int], read_cuts: list[int], from_client: bool
) -> None:
    parts = fragments(payload, [c for c in cuts if c <= len(payload)])
    data = text_message(parts, mask=from_client, ping_between=True)
    scanner = FrameScanner(from_client=from_client)
    out = b"".join(scanner.feed(piece) for piece in fragments(data, [c for c in read_cuts if c <= len(data)]))
    try:
        payload.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    if valid:
        assert scanner.violation is None and out == data
    else:
        assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA
        assert data.startswith(out) and out != data


@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4), phase=st.integers(0, 3))
def test_unmask_is_the_bytewise_xor(payload: bytes, key: bytes, phase: int) -> None:
    expected = bytes(b ^ key[(i + phase) & 3] for i, b in enumerate(payload))
    assert unmask(payload, key, phase) == expected
    # The portable routine (used where websockets' C extension is missing) agrees.
    assert unmask_portable(payload, key[phase:] + key[:phase]) == expected


def test_the_c_masking_routine_is_in_use() -> None:
    """websockets ships its C extension in every wheel for this platform: a fallback here is a packaging bug."""
    assert UNMASK_IMPL == "websockets.speedups"


# --- close frames (Autobahn 7.x) ----------------------------------------------------------


def close_frame(code: int | None, reason: bytes = b"", *, mask: bool) -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(OP_CLOSE, payload, mask=mask)


@SIDE
@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_close_codes_allowed_on_the_wire_pass(code: int, from_client: bool) -> None:
    data = close_frame(code, "bye \u00e9".encode(), mask=from_client)
    out, scanner = scan(data, "bytewise", from_client=from_client)
    assert scanner.violation is None and out == data and scanner.close_code == code


@SIDE
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_close_codes_not_allowed_on_the_wire_are_1002(code: int, from_client: bool) -> None:
    out, scanner = scan(close_frame(code, mask=from_client), "whole", from_client=from_client)
    assert out == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_PROTOCOL_ERROR
    assert scanner.violation.reason == f"close code {code} is not allowed on the wire"
    assert not close_code_allowed(code)


@SIDE
def test_close_reason_must_be_utf8(from_client: bool) -> None:
    data = close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", mask=from_client)
    out, scanner = scan(data, "bytewise", from_client=from_client)
    assert out == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_INVALID_DATA
    assert scanner.violation.reason == "invalid UTF-8 in a close reason"
    # With validation off the reason is not read, the code still is.
    out, scanner = scan(data, "whole", from_client=from_client, validate_utf8=False)
    assert scanner.violation is None and out == data


def test_empty_close_is_fine_and_means_no_status() -> None:
    out, scanner = scan(close_frame(None, mask=True), "whole", from_client=True)
    assert scanner.violation is None and scanner.close_code == 1005


# --- length encodings (§5.2) --------------------------------------------------------------


def header(opcode: int, length_field: bytes, payload: bytes) -> bytes:
    return bytes((0x80 | opcode,)) + length_field + payload


@pytest.mark.parametrize(
    ("field", "n"),
    [(bytes((126,)) + (5).to_bytes(2, "big"), 5), (bytes((126,)) + (125).to_bytes(2, "big"), 125),
     (bytes((127,)) + (5).to_bytes(8, "big"), 5), (bytes((127,)) + (65535).to_bytes(8, "big"), 65535)],
    ids=["16-bit for 5", "16-bit for 125", "64-bit for 5", "64-bit for 65535"],
)
def test_non_minimal_length_is_1002(field: bytes, n: int) -> None:
    data = header(OP_BINARY, field, b"x" * n)
    out, scanner = scan(data, "whole", from_client=False)
    assert out == b""
    assert scanner.violation is not None and scanner.violation.close_code == CLOSE_PROTOCOL_ERROR
    assert scanner.violation.reason == f"length {n} not in its minimal encoding"


@pytest.mark.parametrize("n", [126, 65535, 65536])
def test_minimal_lengths_at_the_boundaries_pass(n: int) -> None:
    data = frame(OP_BINARY, b"x" * n, mask=False)
    out, scanner = scan(data, "whole", from_client=False)
    assert scanner.violation is None and out == data
