"""The relay machine's rules, without sockets: the README's endings table as pure tests.

Input is built, and what the machine queues for each side is parsed back, with ``tests.kit.ws``, a codec
written independently of the proxy's (wsproto would do, but it refuses close code 1014).
"""

from __future__ import annotations

import pytest
from tests.kit.ws import frame, parse_frames
from wsproxy.config.schema import RateConfig
from wsproxy.proto.frames import FrameScanner
from wsproxy.proto.limits import MessageRate
from wsproxy.proto.relay import By, Outcome, RelayMachine

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
T0 = 100.0


def machine(**kw: object) -> RelayMachine:
    return RelayMachine(
        FrameScanner(from_client=True), FrameScanner(from_client=False), close_timeout_s=5.0, **kw  # type: ignore[arg-type]
    )


def take(out: list[bytes]) -> bytes:
    data = b"".join(out)
    out.clear()
    return data


class Opcode:
    TEXT, BINARY, CLOSE, PING, PONG = OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG


def parsed(data: bytes, *, to_backend: bool) -> list[tuple[int, object]]:
    """The frames in ``data``: (opcode, text | bytes | (code, reason)); towards a backend they are masked."""
    result: list[tuple[int, object]] = []
    for f in parse_frames(data):
        assert f.masked == to_backend, f  # RFC 6455 §5.1: masked towards the server, never towards the client
        if f.opcode == OP_CLOSE:
            result.append((f.opcode, (f.code, f.payload[2:].decode())))
        elif f.opcode == OP_TEXT:
            result.append((f.opcode, f.payload.decode()))
        else:
            result.append((f.opcode, f.payload))
    return result


def test_frames_pass_through_unchanged_both_ways() -> None:
    m = machine()
    up = frame(OP_TEXT, b"hello", mask=True) + frame(OP_BINARY, b"\x00\xff", mask=True)
    m.feed(m.up, up, T0)
    assert take(m.up.out) == up
    down = frame(OP_TEXT, b"world", mask=False)
    m.feed(m.down, down, T0)
    assert take(m.down.out) == down
    assert (m.bytes_up, m.bytes_down) == (len(up), len(down))
    assert not m.done and m.deadline is None


def test_close_handshake_started_by_the_client_ends_when_the_backend_closes_tcp() -> None:
    m = machine()
    m.feed(m.up, frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye", mask=True), T0)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1000, "bye"))]
    assert m.closed_by is By.CLIENT and m.kind is Outcome.NORMAL
    assert m.deadline == T0 + 5.0
    m.feed(m.down, frame(OP_CLOSE, (1000).to_bytes(2, "big"), mask=False), T0 + 1)
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (1000, ""))]
    assert not m.done  # the backend closes TCP first (RFC 6455 §7.1.1)
    m.eof(m.down, T0 + 1)
    assert m.done


@pytest.mark.parametrize(("failure_code", "expected"), [(1014, 1014), (1011, 1011)])
def test_backend_vanishing_gives_the_client_the_failure_code(failure_code: int, expected: int) -> None:
    m = machine(backend_failure_code=failure_code)
    m.eof(m.down, T0)
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (expected, "backend went away"))]
    assert m.closed_by is By.BACKEND and m.kind is Outcome.BACKEND_GONE
    assert m.up.discard and m.deadline == T0 + 5.0
    m.feed(m.up, frame(OP_CLOSE, (expected).to_bytes(2, "big"), mask=True), T0)  # the client answers
    assert m.done and take(m.up.out) == b""  # nothing goes to the vanished backend


def test_client_vanishing_gives_the_backend_1001() -> None:
    m = machine()
    m.eof(m.up, T0)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1001, "client went away"))]
    assert m.closed_by is By.CLIENT and m.kind is Outcome.CLIENT_GONE
    m.eof(m.down, T0)
    assert m.done


def test_client_violation_1002_to_it_and_1001_to_the_backend() -> None:
    m = machine()
    good = frame(OP_TEXT, b"fine", mask=True)
    m.feed(m.up, good + frame(OP_TEXT, b"unmasked", mask=False), T0)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.TEXT, "fine"), (Opcode.CLOSE, (1001, "peer protocol error"))]
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (1002, "unmasked frame from the client"))]
    assert m.closed_by is By.PROXY and m.kind is Outcome.PROTOCOL_ERROR


def test_client_message_too_big_has_its_own_reason() -> None:
    """Issue 17 item 8: a message over the limit is not a protocol error, in the log
    (``reason``) or in the close the backend gets; the codes stay 1009 and 1001."""
    m = RelayMachine(
        FrameScanner(from_client=True, max_message_bytes=10), FrameScanner(from_client=False), close_timeout_s=5.0
    )
    m.feed(m.up, frame(OP_BINARY, b"x" * 11, mask=True), T0)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1001, "peer sent a message too big"))]
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (1009, "message of more than 10 bytes (at least 11)"))]
    assert m.kind is Outcome.TOO_BIG
    assert m.reason == "client sent a message of more than 10 bytes (at least 11)"
    assert "protocol error" not in m.reason


def test_backend_message_too_big_has_its_own_reason() -> None:
    m = RelayMachine(
        FrameScanner(from_client=True), FrameScanner(from_client=False, max_message_bytes=10), close_timeout_s=5.0,
        backend_failure_code=1011,
    )
    m.feed(m.down, frame(OP_TEXT, b"y" * 11, mask=False), T0)
    assert parsed(take(m.down.out), to_backend=False) == [
        (Opcode.CLOSE, (1011, "backend sent a message of more than 10 bytes (at least 11)"))
    ]
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1009, "message of more than 10 bytes (at least 11)"))]
    assert m.kind is Outcome.TOO_BIG
    assert m.reason == "backend sent a message of more than 10 bytes (at least 11)"


def test_backend_invalid_utf8_1007_to_it_and_the_failure_code_to_the_client() -> None:
    m = machine(backend_failure_code=1011)
    m.feed(m.down, frame(OP_TEXT, b"\xed\xa0\x80", mask=False), T0)
    assert parsed(take(m.down.out), to_backend=False) == [
        (Opcode.CLOSE, (1011, "backend protocol error: invalid UTF-8 in a text message"))
    ]
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1007, "invalid UTF-8 in a text message"))]
    assert m.kind is Outcome.INVALID_DATA


def test_violation_inside_a_frame_already_started_closes_that_destination_without_a_close_frame() -> None:
    m = machine()
    data = frame(OP_TEXT, b"a" * 1000 + b"\xff", mask=True)
    m.feed(m.up, data[:500], T0)
    assert take(m.up.out) == data[:500]
    m.feed(m.up, data[500:], T0)
    assert take(m.up.out) == b"" and m.up.dst_gone  # the backend is inside the frame: TCP close only
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (1007, "invalid UTF-8 in a text message"))]
    assert m.done  # the client had its close frame; the backend's TCP just closes


def test_finish_inside_a_frame_waits_for_its_end() -> None:
    """A drain's 1012 goes after the frame in flight, never inside it."""
    m = machine()
    data = frame(OP_BINARY, b"x" * 1000, mask=False)
    m.feed(m.down, data[:300], T0)
    m.finish(1012, 1001, "backend draining", Outcome.DRAIN, T0)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.CLOSE, (1001, "backend draining"))]
    first = take(m.down.out)
    assert first == data[:300]  # the client's close waits for the frame's end
    m.feed(m.down, data[300:] + frame(OP_TEXT, b"after the boundary", mask=False), T0)
    frames = parsed(first + take(m.down.out), to_backend=False)
    assert frames == [(Opcode.BINARY, b"x" * 1000), (Opcode.CLOSE, (1012, "backend draining"))]
    assert m.closed_by is By.PROXY and m.kind is Outcome.DRAIN


def test_keepalive_pings_swallows_its_pong_and_declares_a_silent_backend_dead() -> None:
    m = machine()
    m.keepalive(T0, 1.0, 0.5)  # first look: the interval starts
    m.keepalive(T0 + 1, 1.0, 0.5)
    (ping_up,) = parsed(take(m.up.out), to_backend=True)
    (ping_down,) = parsed(take(m.down.out), to_backend=False)
    assert ping_up[0] == OP_PING and ping_down[0] == OP_PING
    # The client answers: its pong is taken out of the stream, the backend never sees it.
    pong = frame(OP_PONG, bytes(ping_down[1]), mask=True)  # type: ignore[arg-type]
    m.feed(m.up, pong + frame(OP_TEXT, b"x", mask=True), T0 + 1.1)
    assert parsed(take(m.up.out), to_backend=True) == [(Opcode.TEXT, "x")]
    # The backend stays silent: dead after the timeout, the client gets the failure code.
    m.keepalive(T0 + 1.7, 1.0, 0.5)
    assert parsed(take(m.down.out), to_backend=False) == [(Opcode.CLOSE, (1014, "backend not responding"))]
    assert m.kind is Outcome.KEEPALIVE and m.up.dst_gone


def test_message_rate_1008_to_the_sender() -> None:
    m = machine(message_rate=MessageRate(RateConfig(rate_per_s=1.0, burst=2)))
    m.feed(m.up, frame(OP_TEXT, b"1", mask=True) * 3, T0)
    up = parsed(take(m.up.out), to_backend=True)
    assert up[-1] == (Opcode.CLOSE, (1001, "peer policy violation"))
    (close,) = parsed(take(m.down.out), to_backend=False)
    assert close[0] == OP_CLOSE and close[1][0] == 1008  # type: ignore[index]
    assert m.kind is Outcome.RATE_LIMITED


def test_broken_destination_drops_its_queue_and_counts_as_gone() -> None:
    m = machine()
    m.feed(m.up, frame(OP_TEXT, b"lost", mask=True), T0)
    m.broken(m.up)
    assert m.up.out == [] and m.up.dst_gone


def test_abort_ends_the_session_as_an_error() -> None:
    m = machine()
    m.abort("internal error while relaying")
    assert m.done and m.kind is Outcome.ERROR and m.closed_by is By.PROXY
