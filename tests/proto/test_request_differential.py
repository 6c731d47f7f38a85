"""The request fast path against h11: the same heads give the same verdict.

``parse_request_head`` takes the common shape of an upgrade without h11 (a cost measured in the handshake
profile); for every head it accepts, the verdict (the Upgrade, or the refusal's status and reason) must be
the one h11's parse leads to. Heads are generated around the real shape: websockets' and wsproto's client
requests, with fields added, dropped, duplicated, re-cased and re-spaced.
"""

from __future__ import annotations

import h11
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsproxy.proto.handshake import (
    Rejection,
    Upgrade,
    check_raw_head,
    check_upgrade,
    h11_reason,
    parse_request_head,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
BASE = [
    (b"Host", b"example.com:8080"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]
EXTRA = [
    (b"Origin", b"https://app.example.com"),
    (b"Sec-WebSocket-Protocol", b"chat.v2, chat.v1"),
    (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
    (b"Authorization", b"Bearer abc.def"),
    (b"Cookie", b"a=1; session=xyz"),
    (b"User-Agent", b"Python/3.11 websockets/13.0"),
    (b"X-Forwarded-For", b"203.0.113.9"),
    (b"Content-Length", b"0"),
    (b"Content-Length", b"5"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Host", b"other.example"),
    (b"Sec-WebSocket-Version", b"8"),
    (b"Upgrade", b"h2c"),
    (b"Connection", b"keep-alive"),
    (b"Bad Name", b"x"),
    (b"Empty", b""),
    (b"Obs", b"caf\xc3\xa9"),
]
TARGETS = [b"/", b"/chat", b"/chat?room=1&x=%41", b"/a/./b/../c", b"//double", b"/%2F", b"/x#frag", b"*",
           b"http://h/chat", b"/caf\xc3\xa9", b"/sp ace", b"/..", b"/%7Euser"]


def _head_variant(name: bytes, value: bytes, case: int, space: int) -> bytes:
    name = (name, name.lower(), name.upper())[case]
    sep = (b": ", b":", b":  ", b":\t")[space]
    tail = (b"", b"", b" ", b"\t")[space]
    return name + sep + value + tail


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET"] * 6 + [b"POST", b"get", b"HEAD"]))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0"]))
    fields = [f for f in BASE if draw(st.integers(0, 9))]  # each base field dropped 1 time in 10
    fields += draw(st.lists(st.sampled_from(EXTRA), max_size=4))
    fields = draw(st.permutations(fields))
    lines = [_head_variant(n, v, draw(st.integers(0, 2)), draw(st.integers(0, 3))) for n, v in fields]
    return b"\r\n".join([method + b" " + target + b" " + version, *lines]) + b"\r\n\r\n"


def h11_verdict(head: bytes) -> Upgrade | Rejection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return Rejection(exc.error_status_hint, h11_reason(exc))
    assert isinstance(event, h11.Request)
    return check_upgrade(event)


def same(fast: Upgrade | Rejection, slow: Upgrade | Rejection) -> bool:
    if isinstance(fast, Rejection) or isinstance(slow, Rejection):
        return fast == slow
    fields = ("host", "path", "key", "target", "authority", "subprotocols", "extensions")
    return (
        all(getattr(fast, f) == getattr(slow, f) for f in fields)
        and list(fast.request.headers) == list(slow.request.headers)
        and fast.request.headers.raw_items() == slow.request.headers.raw_items()
        and (fast.request.method, fast.request.target, fast.request.http_version)
        == (slow.request.method, slow.request.target, slow.request.http_version)
    )


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
@example(b"GET /chat HTTP/1.1\r\n" + b"\r\n".join(n + b": " + v for n, v in BASE) + b"\r\n\r\n")
def test_the_fast_path_and_h11_agree(head: bytes) -> None:
    if check_raw_head(head) is not None:
        return  # refused before either parser sees it
    fast = parse_request_head(head)
    if fast is None:
        return  # h11 decides alone
    assert same(check_upgrade(fast), h11_verdict(head)), head


def test_the_common_upgrade_takes_the_fast_path() -> None:
    head = b"GET /chat?x=1 HTTP/1.1\r\n" + b"\r\n".join(n + b": " + v for n, v in BASE + EXTRA[:6]) + b"\r\n\r\n"
    fast = parse_request_head(head)
    assert fast is not None
    verdict = check_upgrade(fast)
    assert isinstance(verdict, Upgrade) and same(verdict, h11_verdict(head))


def test_unusual_shapes_are_left_to_h11() -> None:
    base = b"\r\n".join(n + b": " + v for n, v in BASE)
    for head in (
        b"POST /chat HTTP/1.1\r\n" + base + b"\r\n\r\n",  # another method
        b"GET /chat HTTP/1.0\r\n" + base + b"\r\n\r\n",  # another version
        b"GET http://h/chat HTTP/1.1\r\n" + base + b"\r\n\r\n",  # absolute form
        b"GET /chat HTTP/1.1\r\n" + base + b"\r\nContent-Length: 0\r\n\r\n",  # message framing
        b"GET /chat HTTP/1.1\r\n" + base.replace(b"Host: example.com:8080\r\n", b"") + b"\r\n\r\n",  # no Host
        b"GET /chat HTTP/1.1\r\n" + base + b"\r\nBad Name: x\r\n\r\n",  # not a token
    ):
        assert parse_request_head(head) is None, head
