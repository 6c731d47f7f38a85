"""The opening handshake on both hops, driven by real h11 and wsproto peers.

Requests are written by an h11 client and read back by an h11 server, as the
proxy's listener reads them; responses are written by an h11 server (or a
wsproto backend) and read back by an h11 client. Raw bytes are used only for
what h11 refuses to write (HTTP/1.0, obsolete folding, bare LF).

No sockets and no event loop here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import generate_accept_token

from tests.kit.h11_requests import BASE, Headers, KEY, edit, parse_request, request, wire_request
from wsproxy.proto.handshake import (
    Accepted,
    Rejection,
    RequestHead,
    Upgrade,
    accept_key,
    check_raw_head,
    check_upgrade,
    downstream_101,
    h11_reason,
    http_error,
)
from wsproxy.proto.upstream_handshake import check_upstream_response, forwarding_headers, upstream_request

ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade(headers: Headers = BASE, target: bytes = b"/") -> Upgrade:
    up = check_upgrade(request(headers, target=target))
    assert isinstance(up, Upgrade), up
    return up


# --- accept_key -----------------------------------------------------------------


def test_accept_key_rfc_example() -> None:
    assert accept_key(KEY) == ACCEPT


def test_accept_key_agrees_with_wsproto() -> None:
    for key in (b"AQIDBAUGBwgJCgsMDQ4PEA==", b"x3JJHMbDL1EzLkh9GBhXDw=="):
        assert accept_key(key) == generate_accept_token(key)


# --- check_upgrade ----------------------------------------------------------------


@dataclass(frozen=True)
class Valid:
    headers: Headers
    target: bytes
    host: str
    path: str
    subprotocols: tuple[str, ...] = ()
    extensions: frozenset[str] = field(default_factory=frozenset)


VALID = {
    "minimal": Valid(BASE, b"/", "example.com", "/"),
    "host lower-cased, port and query stripped": Valid(
        edit(BASE, Host=b"Chat.Example.COM:8080"), b"/chat/room?x=1&next=/y", "chat.example.com", "/chat/room"
    ),
    "IPv6 host literal": Valid(edit(BASE, Host=b"[2001:DB8::1]:443"), b"/", "2001:db8::1", "/"),
    "tokens are case-insensitive lists": Valid(
        edit(BASE, Upgrade=b"WebSocket", Connection=b"keep-alive, UPGRADE"), b"/ws", "example.com", "/ws"
    ),
    "subprotocols in order, across headers": Valid(
        edit(BASE, add=[(b"Sec-WebSocket-Protocol", b"chat, superchat"), (b"Sec-WebSocket-Protocol", b"v2.Chat")]),
        b"/",
        "example.com",
        "/",
        subprotocols=("chat", "superchat", "v2.Chat"),
    ),
    "extension names, parameters dropped": Valid(
        edit(
            BASE,
            add=[
                (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits, x-webkit-deflate-frame"),
                (b"Sec-WebSocket-Extensions", b"permessage-deflate; server_no_context_takeover"),
            ],
        ),
        b"/",
        "example.com",
        "/",
        extensions=frozenset({"permessage-deflate", "x-webkit-deflate-frame"}),
    ),
    "Content-Length: 0 is no body": Valid(edit(BASE, add=[(b"Content-Length", b"0")]), b"/", "example.com", "/"),
}


@pytest.mark.parametrize("case", list(VALID.values()), ids=list(VALID))
def test_valid_upgrade(case: Valid) -> None:
    req = request(case.headers, target=case.target)
    up = check_upgrade(req)
    assert isinstance(up, Upgrade), up
    assert up.request is req
    assert (up.host, up.path, up.key) == (case.host, case.path, KEY)
    assert up.subprotocols == case.subprotocols
    assert up.extensions == case.extensions


def test_upgrade_written_by_wsproto() -> None:
    """A real WebSocket client's request passes, with what it offered."""
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(
        Request(host="Example.com", target="/chat?room=1", subprotocols=["chat", "json"], extensions=[PerMessageDeflate()])
    )
    up = check_upgrade(parse_request(data))
    assert isinstance(up, Upgrade), up
    assert (up.host, up.path, up.subprotocols, up.extensions) == (
        "example.com",
        "/chat",
        ("chat", "json"),
        frozenset({"permessage-deflate"}),
    )


VERSION_13 = (b"Sec-WebSocket-Version", b"13")

INVALID: dict[str, tuple[bytes, bytes, Headers, bytes | None, int]] = {
    # name: (method, target, headers, body, status)
    "plain GET": (b"GET", b"/", [(b"Host", b"example.com")], None, 426),
    "Upgrade to something else": (b"GET", b"/", edit(BASE, Upgrade=b"h2c"), None, 426),
    "POST upgrade": (b"POST", b"/", edit(BASE, add=[(b"Content-Length", b"0")]), None, 400),
    "no Connection header": (b"GET", b"/", edit(BASE, drop=(b"Connection",)), None, 400),
    "Connection without upgrade": (b"GET", b"/", edit(BASE, Connection=b"keep-alive"), None, 400),
    "version 8": (b"GET", b"/", edit(BASE, Sec_WebSocket_Version=b"8"), None, 426),
    "no version": (b"GET", b"/", edit(BASE, drop=(b"Sec-WebSocket-Version",)), None, 426),
    "two versions": (b"GET", b"/", edit(BASE, add=[(b"Sec-WebSocket-Version", b"8")]), None, 426),
    "key of 9 bytes": (b"GET", b"/", edit(BASE, Sec_WebSocket_Key=b"dG9vIHNob3J0"), None, 400),
    "key of 17 bytes": (b"GET", b"/", edit(BASE, Sec_WebSocket_Key=b"AQIDBAUGBwgJCgsMDQ4PEBE="), None, 400),
    "key not base64": (b"GET", b"/", edit(BASE, Sec_WebSocket_Key=b"!!!!!!!!!!!!!!!!!!!!!!!="), None, 400),
    "key without padding": (b"GET", b"/", edit(BASE, Sec_WebSocket_Key=KEY.rstrip(b"=")), None, 400),
    "two keys": (b"GET", b"/", edit(BASE, add=[(b"Sec-WebSocket-Key", b"AQIDBAUGBwgJCgsMDQ4PEA==")]), None, 400),
    "no key": (b"GET", b"/", edit(BASE, drop=(b"Sec-WebSocket-Key",)), None, 400),
    "Content-Length: 5": (b"GET", b"/", edit(BASE, add=[(b"Content-Length", b"5")]), b"hello", 400),
    "Transfer-Encoding": (b"GET", b"/", edit(BASE, add=[(b"Transfer-Encoding", b"chunked")]), b"hello", 400),
    "asterisk target": (b"GET", b"*", BASE, None, 400),
    "absolute-form target": (b"GET", b"http://example.com/chat", BASE, None, 400),
    "authority-form target": (b"GET", b"example.com:80", BASE, None, 400),
    "Host with a bad port": (b"GET", b"/", edit(BASE, Host=b"example.com:http"), None, 400),
    "Host with an unclosed IPv6 literal": (b"GET", b"/", edit(BASE, Host=b"[::1:80"), None, 400),
    "Host with userinfo": (b"GET", b"/", edit(BASE, Host=b"user@example.com"), None, 400),
}


@pytest.mark.parametrize("case", list(INVALID.values()), ids=list(INVALID))
def test_invalid_upgrade(case: tuple[bytes, bytes, Headers, bytes | None, int]) -> None:
    method, target, headers, body, status = case
    verdict = check_upgrade(request(headers, method=method, target=target, body=body))
    assert isinstance(verdict, Rejection), verdict
    assert verdict.status == status, verdict
    assert verdict.reason
    if status == 426:
        assert VERSION_13 in verdict.headers  # RFC 6455 §4.4
    else:
        assert verdict.headers == ()


def test_http_1_0_upgrade() -> None:
    # h11 only writes HTTP/1.1, so this request is written by hand.
    data = b"GET / HTTP/1.0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in BASE) + b"\r\n"
    verdict = check_upgrade(parse_request(data))
    assert isinstance(verdict, Rejection) and verdict.status == 400, verdict


# --- check_raw_head -------------------------------------------------------------

GOOD_HEAD = wire_request(b"GET", b"/chat", BASE)

RAW_HEADS = {
    "obs-fold with a space": b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n",
    "obs-fold with a tab": b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n\ttwo\r\n\r\n",
    "bare LF everywhere": b"GET / HTTP/1.1\nHost: a\n\n",
    "one bare LF": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "Content-Length twice": b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\ncontent-length: 0\r\n\r\n",
    "Content-Length twice, different values": b"GET / HTTP/1.1\r\nContent-Length: 0\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "Transfer-Encoding and Content-Length": b"GET / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n",
}


@pytest.mark.parametrize("head", list(RAW_HEADS.values()), ids=list(RAW_HEADS))
def test_raw_head_smuggling_shapes(head: bytes) -> None:
    verdict = check_raw_head(head)
    assert isinstance(verdict, Rejection) and verdict.status == 400, verdict


@pytest.mark.parametrize(
    "head",
    [
        GOOD_HEAD,
        wire_request(b"GET", b"/", edit(BASE, add=[(b"Content-Length", b"0")])),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 1\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["h11 upgrade request", "one Content-Length", "a header ending in content-length"],
)


def test_raw_head_normal(head: bytes) -> None:
    assert check_raw_head(head) is None


# --- control characters and what refusals say (issue 15, items 4 and 9) -------------------

SECRET = "SECRET-xyz"


@pytest.mark.parametrize("byte", [*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
def test_control_characters_in_a_header_value_are_refused(byte: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Note: a" + bytes([byte]) + b"b\r\n\r\n"
    verdict = check_raw_head(head)
    assert isinstance(verdict, Rejection) and verdict.status == 400
    assert verdict.reason == "control character in a header"


def test_h11_lets_some_control_characters_through() -> None:
    """Why check_raw_head looks: h11 accepts 0x01 and 0x7F in a value (it refuses NUL, VT, FF)."""
    for byte in (0x01, 0x1F, 0x7F):
        parsed = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Note: a" + bytes([byte]) + b"b\r\n\r\n")
        assert (b"x-note", b"a" + bytes([byte]) + b"b") in list(parsed.headers)


def test_a_tab_in_a_header_value_is_allowed() -> None:
    assert check_raw_head(b"GET / HTTP/1.1\r\nHost: a\r\nX-Note: a\tb\r\n\r\n") is None


MALFORMED = {
    "request line": (f"GET /chat?access_token={SECRET} HTTP/1.1 extra\r\nHost: a\r\n\r\n", "malformed request line"),
    "header line": (f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization : Bearer {SECRET}\r\n\r\n", "malformed header line"),
    "header name": (f"GET / HTTP/1.1\r\nHost: a\r\nX(Token): {SECRET}\r\n\r\n", "malformed header line"),
    "continuation first": (f"GET / HTTP/1.1\r\n {SECRET}\r\nHost: a\r\n\r\n", "malformed header line"),
    "no Host": (f"GET /{SECRET} HTTP/1.1\r\nX: {SECRET}\r\n\r\n", "no Host header"),
    "two Hosts": ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host header"),
    "bad Content-Length": (f"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: {SECRET}\r\n\r\n", "malformed Content-Length header"),
    "Transfer-Encoding": (f"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {SECRET}\r\n\r\n", "unsupported Transfer-Encoding"),
}


@pytest.mark.parametrize("case", list(MALFORMED.values()), ids=list(MALFORMED))
def test_h11_errors_get_fixed_reasons(case: tuple[str, str]) -> None:
    head, reason = case
    server = h11.Connection(h11.SERVER)
    server.receive_data(head.encode())
    with pytest.raises(h11.RemoteProtocolError) as caught:
        server.next_event()
    assert h11_reason(caught.value) == reason


@pytest.mark.parametrize(
    ("headers", "target", "status"),
    [
        (edit(BASE, Upgrade=SECRET.encode()), b"/", 426),
        (edit(BASE, Host=f"{SECRET} x".encode()), b"/", 400),
        (edit(BASE, Host=f"{SECRET}:x".encode()), b"/", 400),
        (edit(BASE, Sec_WebSocket_Version=SECRET.encode()), b"/", 426),
        (edit(BASE, Sec_WebSocket_Key=SECRET.encode()), b"/", 400),
        (BASE, f"http://h/chat?access_token={SECRET}".encode(), 400),
        (BASE, f"/a%2f?access_token={SECRET}".encode(), 400),
        (BASE, f"/a/../..?access_token={SECRET}".encode(), 400),
    ],
)


def test_refusal_reasons_never_quote_a_value_or_the_target(headers: Headers, target: bytes, status: int) -> None:
    verdict = check_upgrade(request(headers, target=target))
    assert isinstance(verdict, Rejection) and verdict.status == status
    assert "SECRET" not in verdict.reason


def test_a_method_refusal_names_only_known_methods() -> None:
    verdict = check_upgrade(request(BASE, method=SECRET.encode()))
    assert isinstance(verdict, Rejection) and verdict.reason == "WebSocket upgrade with method other"
    verdict = check_upgrade(request(BASE, method=b"POST"))
    assert isinstance(verdict, Rejection) and verdict.reason == "WebSocket upgrade with method POST"


def test_upgrade_carries_the_normalised_target_and_host() -> None:
    up = upgrade(edit(BASE, Host=b"Secure.Example.COM.:8443"), target=b"//x/../%61dmin?q=%2e")
    assert (up.host, up.path, up.target, up.authority) == ("secure.example.com", "/admin", b"/admin?q=%2e", b"secure.example.com:8443")
    up = upgrade(edit(BASE, Host=b"[2001:DB8::1]:443"))
    assert (up.host, up.authority) == ("2001:db8::1", b"[2001:db8::1]:443")


# --- forwarding_headers and upstream_request ---------------------------------------


def test_forwarding_headers_ipv4() -> None:
    assert forwarding_headers("203.0.113.9", 51234, b"example.com", tls=False) == [
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"example.com"),
        (b"Forwarded", b'for=203.0.113.9;host="example.com";proto=http'),
    ]


def test_forwarding_headers_ipv6_is_quoted_and_bracketed() -> None:
    """RFC 7239 §6: an IPv6 node is "[v6]" in a quoted-string."""
    headers = dict(forwarding_headers("2001:db8::1", 443, b"example.com:8443", tls=True))
    assert headers[b"X-Forwarded-For"] == b"2001:db8::1"
    assert headers[b"X-Forwarded-Proto"] == b"https"
    assert headers[b"Forwarded"] == b'for="[2001:db8::1]";host="example.com:8443";proto=https'


def test_forwarding_headers_host_cannot_break_the_quoted_string() -> None:
    headers = dict(forwarding_headers("192.0.2.1", 1, b'evil";for=1.2.3.4', tls=False))
    assert headers[b"Forwarded"] == b'for=192.0.2.1;host="evil;for=1.2.3.4";proto=http'


CLIENT_HEADERS: Headers = [
    (b"Host", b"Example.com"),
    (b"User-Agent", b"test/1.0"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"keep-alive, Upgrade, X-Secret-Hop"),
    (b"Keep-Alive", b"timeout=5"),
    (b"TE", b"trailers"),
    (b"Trailer", b"X-Checksum"),
    (b"Proxy-Authorization", b"Basic dXNlcjpwYXNz"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"X-Secret-Hop", b"named in Connection"),
    (b"X-Forwarded-For", b"6.6.6.6"),
    (b"X-Forwarded-Proto", b"https"),
    (b"x-forwarded-host", b"spoofed.example"),
    (b"Forwarded", b"for=6.6.6.6"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Protocol", b"chat"),
    (b"Cookie", b"session=abc"),
    (b"X-MixedCase-Header", b"kept as spelled"),
]


def test_upstream_request_strips_hop_by_hop_and_replaces_forwarding() -> None:
    up = upgrade(CLIENT_HEADERS, target=b"/chat?room=1")
    forwarded = forwarding_headers("203.0.113.9", 51234, b"Example.com", tls=True)
    target, headers = upstream_request(up, forwarded)
    assert target == b"/chat?room=1"  # the query goes to the backend
    assert headers == [
        (b"Host", b"example.com"),  # normalised, as routing saw it
        (b"User-Agent", b"test/1.0"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Protocol", b"chat"),
        (b"Cookie", b"session=abc"),
        (b"X-MixedCase-Header", b"kept as spelled"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        *forwarded,
    ]


def test_upstream_request_is_a_valid_upgrade_for_a_real_backend() -> None:
    """h11 writes it, a wsproto server accepts it, and the key is the client's."""
    up = upgrade(CLIENT_HEADERS)
    target, headers = upstream_request(up, forwarding_headers("203.0.113.9", 1, b"example.com", tls=False))
    data = h11.Connection(h11.CLIENT).send(h11.Request(method=b"GET", target=target, headers=headers))
    backend = WSConnection(ConnectionType.SERVER)
    backend.receive_data(data)
    (event,) = list(backend.events())
    assert isinstance(event, Request)
    assert event.subprotocols == ["chat"]
    answer = backend.send(AcceptConnection())
    assert b"Sec-WebSocket-Accept: " + ACCEPT in answer


# --- check_upstream_response and downstream_101 ----------------------------------


def backend_answer(up: Upgrade, headers: Headers, status: int = 101) -> h11.InformationalResponse:
    """The backend's answer as the proxy reads it: an h11 server writes it, an h11 client reads it."""
    target, request_headers = upstream_request(up, [])
    proxy = h11.Connection(h11.CLIENT)
    backend = h11.Connection(h11.SERVER)
    backend.receive_data(proxy.send(h11.Request(method=b"GET", target=target, headers=request_headers)))
    assert isinstance(backend.next_event(), h11.Request)
    proxy.receive_data(backend.send(h11.InformationalResponse(status_code=status, headers=headers)))
    event = proxy.next_event()
    assert isinstance(event, h11.InformationalResponse), event
    return event


OFFERING = edit(
    BASE,
    add=[
        (b"Sec-WebSocket-Protocol", b"chat, superchat"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
    ],
)

GOOD_101: Headers = [
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Accept", ACCEPT),
    (b"Sec-WebSocket-Protocol", b"superchat"),
    (b"Sec-WebSocket-Extensions", b"permessage-deflate; server_no_context_takeover"),
    (b"X-Backend", b"b1"),
]


def test_upstream_101_accepted() -> None:
    up = upgrade(OFFERING)
    verdict = check_upstream_response(backend_answer(up, GOOD_101), up)
    assert verdict == Accepted(
        headers=(
            (b"Sec-WebSocket-Protocol", b"superchat"),
            (b"Sec-WebSocket-Extensions", b"permessage-deflate; server_no_context_takeover"),
            (b"X-Backend", b"b1"),
        ),
        accept=ACCEPT,
        subprotocol="superchat",
        extensions=frozenset({"permessage-deflate"}),
    )


def test_upstream_101_without_subprotocol_or_extensions() -> None:
    up = upgrade(OFFERING)
    answer = edit(GOOD_101, drop=(b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions"), Connection=b"upgrade", Upgrade=b"WebSocket")
    verdict = check_upstream_response(backend_answer(up, answer), up)
    assert isinstance(verdict, Accepted), verdict
    assert (verdict.subprotocol, verdict.extensions) == (None, frozenset())


BAD_101 = {
    "wrong accept": edit(GOOD_101, Sec_WebSocket_Accept=accept_key(b"AQIDBAUGBwgJCgsMDQ4PEA==")),
    "no accept": edit(GOOD_101, drop=(b"Sec-WebSocket-Accept",)),
    "two accepts": edit(GOOD_101, add=[(b"Sec-WebSocket-Accept", ACCEPT)]),
    "no Upgrade": edit(GOOD_101, drop=(b"Upgrade",)),
    "Upgrade to something else": edit(GOOD_101, Upgrade=b"h2c"),
    "no Connection": edit(GOOD_101, drop=(b"Connection",)),
    "Connection without upgrade": edit(GOOD_101, Connection=b"keep-alive"),
    "unoffered subprotocol": edit(GOOD_101, Sec_WebSocket_Protocol=b"mqtt"),
    "two subprotocols in one header": edit(GOOD_101, Sec_WebSocket_Protocol=b"chat, superchat"),
    "two subprotocol headers": edit(GOOD_101, add=[(b"Sec-WebSocket-Protocol", b"chat")]),
    "unoffered extension": edit(GOOD_101, Sec_WebSocket_Extensions=b"x-webkit-deflate-frame"),
    "one unoffered extension of two": edit(
        GOOD_101, Sec_WebSocket_Extensions=b"permessage-deflate, permessage-bzip2"
    ),
}


@pytest.mark.parametrize("headers", list(BAD_101.values()), ids=list(BAD_101))
def test_upstream_101_rejected(headers: Headers) -> None:
    up = upgrade(OFFERING)
    verdict = check_upstream_response(backend_answer(up, headers), up)
    assert isinstance(verdict, Rejection), verdict
    assert verdict.status == 502
    assert verdict.reason


def test_upstream_subprotocol_when_the_client_offered_none() -> None:
    up = upgrade(BASE)
    answer = edit(GOOD_101, drop=(b"Sec-WebSocket-Extensions",))
    verdict = check_upstream_response(backend_answer(up, answer), up)
    assert isinstance(verdict, Rejection) and verdict.status == 502


def test_upstream_informational_other_than_101() -> None:
    up = upgrade(BASE)
    proxy = h11.Connection(h11.CLIENT)
    target, headers = upstream_request(up, [])
    proxy.send(h11.Request(method=b"GET", target=target, headers=headers))
    proxy.receive_data(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    event = proxy.next_event()
    assert isinstance(event, h11.InformationalResponse)
    verdict = check_upstream_response(event, up)
    assert isinstance(verdict, Rejection) and verdict.status == 502


def read_101(data: bytes) -> h11.InformationalResponse:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=BASE))
    client.receive_data(data)
    event = client.next_event()
    assert isinstance(event, h11.InformationalResponse), event
    return event


def test_downstream_101_parses_with_h11() -> None:
    up = upgrade(OFFERING)
    accepted = check_upstream_response(backend_answer(up, GOOD_101), up)
    assert isinstance(accepted, Accepted)
    response = read_101(downstream_101(accepted))
    assert response.status_code == 101
    assert list(response.headers) == [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", ACCEPT),
        (b"sec-websocket-protocol", b"superchat"),
        (b"sec-websocket-extensions", b"permessage-deflate; server_no_context_takeover"),
        (b"x-backend", b"b1"),
    ]


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
def test_whole_handshake_between_real_peers(deflate: bool) -> None:
    """wsproto client → proxy → wsproto backend → proxy → wsproto client, all verdicts positive."""
    client = WSConnection(ConnectionType.CLIENT)
    offered = [PerMessageDeflate()] if deflate else []
    head = client.send(Request(host="chat.example.com", target="/ws", subprotocols=["v1", "v2"], extensions=offered))
    assert check_raw_head(head) is None
    up = check_upgrade(parse_request(head))
    assert isinstance(up, Upgrade), up

    target, headers = upstream_request(up, forwarding_headers("192.0.2.7", 40000, b"chat.example.com", tls=False))
    proxy = h11.Connection(h11.CLIENT)
    backend = WSConnection(ConnectionType.SERVER)
    backend.receive_data(proxy.send(h11.Request(method=b"GET", target=target, headers=headers)))
    (offer,) = list(backend.events())
    assert isinstance(offer, Request)
    proxy.receive_data(backend.send(AcceptConnection(subprotocol="v2", extensions=[PerMessageDeflate()] if deflate else [])))
    response = proxy.next_event()
    assert isinstance(response, h11.InformationalResponse)

    accepted = check_upstream_response(response, up)
    assert isinstance(accepted, Accepted), accepted
    assert accepted.subprotocol == "v2"
    assert accepted.extensions == (frozenset({"permessage-deflate"}) if deflate else frozenset())

    client.receive_data(downstream_101(accepted))
    (event,) = list(client.events())
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol == "v2"
    assert [e.name for e in event.extensions] == (["permessage-deflate"] if deflate else [])


# --- http_error -----------------------------------------------------------------


def read_response(data: bytes) -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"example.com")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")  # the proxy closes after an error
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data), event
        body += event.data
    assert isinstance(client.next_event(), h11.ConnectionClosed)
    return response, body


@pytest.mark.parametrize(
    ("rejection", "phrase"),
    [
        (Rejection(426, "not a WebSocket upgrade", ((b"Upgrade", b"websocket"), (b"Sec-WebSocket-Version", b"13"))), b"Upgrade Required"),
        (Rejection(400, "bad key"), b"Bad Request"),
        (Rejection(403, "origin"), b"Forbidden"),
        (Rejection(502, "backend"), b"Bad Gateway"),
        (Rejection(418, "teapot", ((b"X-Extra", b"1"),)), b"Error"),
    ],
    ids=lambda x: str(x.status) if isinstance(x, Rejection) else None,
)


def test_http_error_parses_with_h11(rejection: Rejection, phrase: bytes) -> None:
    response, body = read_response(http_error(rejection))
    assert response.status_code == rejection.status
    assert response.reason == phrase
    headers = list(response.headers)
    for name, value in rejection.headers:
        assert (name.lower(), value) in headers
    assert (b"connection", b"close") in headers
    assert body == phrase + b"\n"
    assert rejection.reason.encode() not in body  # the reason is for the log


SPOOFED: Headers = [
    (b"X-Auth-Subject", b"root"),
    (b"X_Auth_Subject", b"root"),
    (b"x-auth-claim-role", b"admin"),
    (b"X_AUTH_CLAIM_ROLE", b"admin"),
    (b"X-Real-IP", b"6.6.6.6"),
    (b"X_Real_IP", b"6.6.6.6"),
    (b"True-Client-IP", b"6.6.6.6"),
    (b"X-Original-URL", b"/admin"),
    (b"X-Keep", b"me"),
]


def test_upstream_request_strips_claims_and_the_strip_set() -> None:
    from wsproxy.proto.handshake import DEFAULT_STRIP_HEADERS

    up = upgrade(BASE + SPOOFED, target=b"/x/../chat")
    target, headers = upstream_request(up, [], strip=DEFAULT_STRIP_HEADERS | {b"x-auth-subject"})
    assert target == b"/chat"
    names = [name for name, _ in headers]
    assert b"X-Keep" in names
    assert not {n.lower().replace(b"_", b"-") for n in names} & {
        b"x-auth-subject", b"x-auth-claim-role", b"x-real-ip", b"true-client-ip", b"x-original-url"
    }
    # X-Auth-Claim-* goes even with nothing else to strip; the rest only when asked
    _, headers = upstream_request(up, [])
    kept = {name.lower() for name, _ in headers}
    assert b"x-auth-claim-role" not in kept and b"x_auth_claim_role" not in kept
    assert {b"x-auth-subject", b"x-real-ip", b"x-original-url"} <= kept


@pytest.mark.parametrize("space", [b"\xa0", b"\x85", b"\x1c"])
def test_a_host_wrapped_in_non_http_whitespace_is_refused(space: bytes) -> None:
    """Only SP and HTAB are optional around a value (RFC 9110 §5.6.3); found by fuzz/fuzz_handshake.py."""
    head = (
        b"GET / HTTP/1.1\r\nHost:" + space + b"8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    if check_raw_head(head) is not None:
        return  # a control character: refused before parsing
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    verdict = check_upgrade(conn.next_event())
    assert isinstance(verdict, Rejection) and (verdict.status, verdict.reason) == (400, "invalid Host header")


# --- Sec-WebSocket-Key: binascii's strict mode gives base64.b64decode(validate=True)'s verdicts --------------

_KEY_BYTES = st.sampled_from(list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_.\t \x00\xff"))


@settings(max_examples=3000, deadline=None)
@given(
    seed=st.binary(min_size=16, max_size=16),
    edits=st.lists(st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 30), _KEY_BYTES), max_size=3),
)
def test_a_key_is_accepted_exactly_when_b64decode_with_validate_finds_16_bytes(
    seed: bytes, edits: list[tuple[str, int, int]]
) -> None:
    import base64
    import binascii

    key = bytearray(base64.b64encode(seed))
    for op, at, byte in edits:
        at %= len(key) + 1
        if op == "insert":
            key.insert(at, byte)
        elif key and at < len(key):
            if op == "set":
                key[at] = byte
            else:
                del key[at]
    try:
        expected = len(base64.b64decode(bytes(key).strip(), validate=True)) == 16  # check_upgrade strips it
    except binascii.Error:
        expected = False
    # the parsed form: h11 would refuse some of these bytes before the check
    head = RequestHead(b"/", edit(BASE, Sec_WebSocket_Key=bytes(key)))
    verdict = check_upgrade(head)
    assert (not isinstance(verdict, Rejection)) == expected, (bytes(key), verdict)
