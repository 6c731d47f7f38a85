"""The backend's 101 fast path against h11, on the same generated responses.

``edge.upstream.upgrade`` parses a backend's answer with
``parse_response_head`` (strict, fast) and hands everything it does not take
to h11. Both then go through ``check_upstream_response``. These tests feed the
same bytes to both paths and require the same verdict, so the fast path can
never accept what h11 would refuse (issue 15, item 8: a 101 with
``Transfer-Encoding: gzip`` or two conflicting ``Content-Length`` headers was
accepted by the fast path and refused by h11).

No sockets and no event loop here: h11 is a real peer, hypothesis writes the
responses (header names, values, duplicates, obsolete folding, bare LF, odd
spacing, status lines).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsproxy.proto.handshake import Accepted, Rejection, Upgrade, check_upgrade
from wsproxy.proto.upstream_handshake import (
    FRAMING_IN_101,
    check_upstream_response,
    ResponseHead,
    parse_response_head,
    upstream_request,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _upgrade() -> Upgrade:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    headers = [
        (b"Host", b"example.com"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Protocol", b"chat"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
    ]
    server.receive_data(client.send(h11.Request(method=b"GET", target=b"/chat", headers=headers)))
    request = server.next_event()
    assert isinstance(request, h11.Request)
    verdict = check_upgrade(request)
    assert isinstance(verdict, Upgrade), verdict
    return verdict


UP = _upgrade()

Verdict = tuple[str, object]


def fast_path(head: bytes) -> Verdict | None:
    """What ``edge.upstream.upgrade`` decides without h11; None when it hands over to h11."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    parsed = parse_response_head(head[: end + 4])
    if parsed is None or parsed.status_code != 101:
        return None
    return _verdict(check_upstream_response(parsed, UP), head[end + 4 :])


def h11_path(head: bytes) -> Verdict:
    """What h11 (the proxy's fallback, and the oracle) makes of the same bytes."""
    target, headers = upstream_request(UP, [])
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=target, headers=headers))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return ("rejected", 502)  # upgrade(): "backend sent invalid HTTP", 502
    if event is h11.NEED_DATA:
        return ("incomplete", None)
    if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
        return _verdict(check_upstream_response(event, UP), bytes(conn.trailing_data[0]))
    assert isinstance(event, (h11.InformationalResponse, h11.Response)), event
    return ("status", event.status_code)


def proxy_path(head: bytes) -> Verdict:
    """The whole decision of ``upgrade``: the fast path, else h11."""
    fast = fast_path(head)
    return fast if fast is not None else h11_path(head)


def _verdict(verdict: Accepted | Rejection, trailing: bytes) -> Verdict:
    if isinstance(verdict, Rejection):
        return ("rejected", verdict.status)
    return ("accepted", (verdict, trailing))


# --- generated responses ----------------------------------------------------------

GOOD = [
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Accept", ACCEPT),
]
NAMES = [
    b"Upgrade", b"Connection", b"Sec-WebSocket-Accept", b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions",
    b"Content-Length", b"content-length", b"Transfer-Encoding", b"TRANSFER-ENCODING", b"X-Backend",
    b"Content_Length", b"Transfer-Encoding ", b" Upgrade", b"X\x00Y", b"X Y", b"", b"X:Y", b"\xc3\xa9",
]
VALUES = [
    b"websocket", b"Upgrade", ACCEPT, b"chat", b"mqtt", b"permessage-deflate", b"0", b"1", b"2", b"01",
    b"1, 1", b"1,2", b"-1", b"chunked", b"gzip", b"chunked, gzip", b"gzip, chunked", b"identity", b"",
    b"a\tb", b"a  b", b"\x80\xff", b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb", b"a\nb",
]
SEPARATORS = [b": ", b":", b":\t", b":  ", b" : ", b" :", b"\t:"]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]
STATUS_LINES = [
    b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101", b"HTTP/1.1 101 ", b"HTTP/1.1 101  x",
    b"HTTP/1.0 101 Switching Protocols", b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 OK", b"HTTP/1.1 099 x",
    b"HTTP/1.1  101 x", b"HTTP/1.1 1010 x", b"http/1.1 101 x", b"HTTP/1.1 101 a\x01b", b"HTTP/1.1 101 \x80",
    b"HTTP/1.1 101 a\tb", b"HTTP/2 101 x", b" HTTP/1.1 101 x", b"HTTP/1.1 101 x\x7f",
]

byte_text = st.binary(max_size=12)
names = st.one_of(st.sampled_from(NAMES[:10]), st.sampled_from(NAMES), byte_text)
values = st.one_of(st.sampled_from(VALUES[:20]), st.sampled_from(VALUES), byte_text)


@st.composite
def header_lines(draw: st.DrawFn) -> list[bytes]:
    """One header line, sometimes with padding, an odd separator or an obs-fold continuation."""
    if draw(st.booleans()):
        name, value = draw(st.sampled_from(GOOD))
    else:
        name, value = draw(names), draw(values)
    separator = draw(st.sampled_from(SEPARATORS)) if draw(st.integers(0, 3)) == 0 else b": "
    padding = draw(st.sampled_from([b"", b"", b"", b" ", b"\t", b"  "]))
    lines = [name + separator + value + padding]
    if draw(st.integers(0, 7)) == 0:  # RFC 9112 §5.2: obs-fold, continuation after SP or HTAB
        lines.append(draw(st.sampled_from([b" ", b"\t"])) + draw(values))
    return lines


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.one_of(st.just(STATUS_LINES[0]), st.sampled_from(STATUS_LINES)))
    lines: list[bytes] = [status]
    headers = list(GOOD) if draw(st.integers(0, 3)) else []
    for extra in draw(st.lists(header_lines(), max_size=5)):
        position = draw(st.integers(0, len(headers)))
        headers[position:position] = [extra]  # type: ignore[list-item]
    for header in headers:
        if isinstance(header, tuple):
            lines.append(header[0] + b": " + header[1])
        else:
            lines.extend(header)
    if draw(st.integers(0, 3)) == 0:  # a duplicate of a line already there
        lines.append(draw(st.sampled_from(lines[1:] or [b"X: y"])))
    crlf = draw(st.integers(0, 4)) != 0
    out = b""
    for line in lines:
        out += line + (b"\r\n" if crlf else draw(st.sampled_from(ENDINGS)))
    out += b"\r\n" if crlf else draw(st.sampled_from(ENDINGS))
    return out + draw(st.sampled_from([b"", b"\x81\x05hello"]))


def _agree(head: bytes) -> None:
    fast = fast_path(head)
    oracle = h11_path(head)
    if fast is not None:
        # The fast path decided alone: h11 must reach exactly the same verdict
        # (same status, same headers passed on, same trailing bytes).
        assert fast == oracle, (head, fast, oracle)
    assert proxy_path(head) == oracle, head


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
@example(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nTransfer-Encoding: gzip\r\n\r\n")
def test_fast_path_and_h11_agree(head: bytes) -> None:
    _agree(head)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_fast_path_and_h11_agree_on_any_bytes(noise: bytes) -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    _agree(head + noise + b"\r\n\r\n")


# --- regression tests (issue 15, item 8) ------------------------------------------

GOOD_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n"
)


def test_the_good_101_is_accepted_by_both() -> None:
    head = GOOD_HEAD + b"\r\n"
    fast = fast_path(head)
    assert fast is not None and fast[0] == "accepted"
    assert fast == h11_path(head)


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 1\r\nContent-Length: 2\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"transfer-encoding: gzip, chunked\r\n",
    ],
    ids=["te-gzip", "te-chunked", "two-conflicting-cl", "cl-0", "two-equal-cl", "te-list"],
)
def test_101_with_message_framing_is_refused(framing: bytes) -> None:
    head = GOOD_HEAD + framing + b"\r\n"
    assert parse_response_head(head) is None  # the fast path leaves message framing to h11 ...
    assert proxy_path(head) == ("rejected", 502)  # ... and the proxy refuses it: 502, nothing reaches the client
    assert h11_path(head) == ("rejected", 502)
    # The 101 check itself refuses framing headers whichever parser read the head.
    lines = [line.split(b": ", 1) for line in (GOOD_HEAD + framing).split(b"\r\n")[1:] if line]
    parsed = ResponseHead(101, tuple((name, value) for name, value in lines))
    assert check_upstream_response(parsed, UP) == Rejection(502, FRAMING_IN_101)
