"""X-Forwarded-* and Forwarded towards the backend, for trusted and untrusted clients.

Client headers are written by a real h11 client and read back by an h11
server, as the listener reads them; the result is passed through
``upstream_handshake.upstream_request`` and read by an h11 server again, as the backend
would. No sockets and no event loop here.
"""

from __future__ import annotations

import ipaddress

import h11
import pytest

from wsproxy.proto.forwarded import DROPPED_HEADERS, forwarding, is_trusted, parse_trusted
from wsproxy.proto.handshake import FORWARDING_HEADERS, Upgrade, check_upgrade
from wsproxy.proto.upstream_handshake import encode_request, forwarding_headers, upstream_request

Headers = list[tuple[bytes, bytes]]

BASE: Headers = [
    (b"Host", b"chat.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
]

TRUSTED = parse_trusted(["10.0.0.0/8", "2001:db8:cafe::/48"])
CDN = "10.1.2.3"
CLIENT = "203.0.113.9"


def received(*extra: tuple[bytes, bytes]) -> h11.Request:
    client = h11.Connection(h11.CLIENT)
    wire = client.send(h11.Request(method=b"GET", target=b"/chat", headers=BASE + list(extra)))
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def backend_sees(request: h11.Request, add: Headers) -> dict[bytes, list[bytes]]:
    """The headers the backend reads after ``upstream_request`` with ``add``."""
    upgrade = check_upgrade(request)
    assert isinstance(upgrade, Upgrade)
    target, headers = upstream_request(upgrade, add)
    server = h11.Connection(h11.SERVER)
    server.receive_data(encode_request(target, headers))
    event = server.next_event()
    assert isinstance(event, h11.Request)
    seen: dict[bytes, list[bytes]] = {}
    for name, value in event.headers:
        seen.setdefault(name, []).append(value)
    return seen


def run(request: h11.Request, ip: str, *, tls: bool = True, port: int = 51234) -> tuple[Headers, set[bytes]]:
    return forwarding(
        list(request.headers),
        peer_ip=ip,
        client_ip=ip,
        client_port=port,
        host_header=b"chat.example.com",
        tls=tls,
        trusted=TRUSTED,
    )


# --- untrusted ------------------------------------------------------------------------------


def test_untrusted_client_headers_are_replaced() -> None:
    request = received(
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"bank.example"),
        (b"Forwarded", b"for=1.1.1.1"),
        (b"X_Forwarded_For", b"2.2.2.2"),
    )
    add, drop = run(request, CLIENT, tls=False)
    assert add == forwarding_headers(CLIENT, 51234, b"chat.example.com", tls=False)
    assert drop == set(FORWARDING_HEADERS) | {b"x_forwarded_for", b"x_forwarded_proto", b"x_forwarded_host"}
    seen = backend_sees(request, add)
    assert seen[b"x-forwarded-for"] == [CLIENT.encode()]
    assert seen[b"x-forwarded-proto"] == [b"http"]
    assert seen[b"x-forwarded-host"] == [b"chat.example.com"]
    assert seen[b"forwarded"] == [b'for=203.0.113.9;host="chat.example.com";proto=http']
    assert b"x_forwarded_for" not in seen


def test_untrusted_ipv6_is_quoted_in_forwarded() -> None:
    add, _ = run(received(), "2001:db8::1")
    assert dict(add)[b"X-Forwarded-For"] == b"2001:db8::1"
    assert dict(add)[b"Forwarded"] == b'for="[2001:db8::1]";host="chat.example.com";proto=https'


def test_no_trusted_proxies_trusts_nobody() -> None:
    request = received((b"X-Forwarded-For", b"1.1.1.1"))
    add, _ = forwarding(
        list(request.headers), client_ip=CDN, client_port=1, host_header=b"chat.example.com", tls=True, trusted=()
    )
    assert dict(add)[b"X-Forwarded-For"] == CDN.encode()


# --- trusted --------------------------------------------------------------------------------


def test_trusted_proxy_chain_is_extended() -> None:
    request = received(
        (b"X-Forwarded-For", b"198.51.100.20"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"www.example.com"),
        (b"Forwarded", b'for=198.51.100.20;proto=https;host="www.example.com"'),
    )
    add, drop = run(request, CDN, tls=False)
    assert add == [
        (b"X-Forwarded-For", b"198.51.100.20, 10.1.2.3"),
        (b"X-Forwarded-Proto", b"https"),  # theirs, although the hop to us was plain http
        (b"X-Forwarded-Host", b"www.example.com"),
        (
            b"Forwarded",
            b'for=198.51.100.20;proto=https;host="www.example.com", for=10.1.2.3;host="chat.example.com";proto=http',
        ),
    ]
    assert drop >= set(FORWARDING_HEADERS)
    seen = backend_sees(request, add)
    assert seen[b"x-forwarded-for"] == [b"198.51.100.20, 10.1.2.3"]
    assert seen[b"x-forwarded-proto"] == [b"https"]
    assert len(seen[b"forwarded"]) == 1


def test_trusted_proxy_without_headers_gets_ours() -> None:
    add, _ = run(received(), CDN)
    assert add == forwarding_headers(CDN, 51234, b"chat.example.com", tls=True)


def test_trusted_proto_and_host_fall_back_to_ours_one_by_one() -> None:
    add, _ = run(received((b"X-Forwarded-Proto", b"https")), CDN, tls=False)
    assert dict(add)[b"X-Forwarded-Proto"] == b"https"
    assert dict(add)[b"X-Forwarded-Host"] == b"chat.example.com"


def test_multiple_x_forwarded_for_headers_are_joined_in_order() -> None:
    request = received(
        (b"X-Forwarded-For", b"198.51.100.1, 198.51.100.2"),
        (b"Forwarded", b"for=198.51.100.1"),
        (b"X-Forwarded-For", b"198.51.100.3"),
        (b"X-Forwarded-For", b""),
        (b"Forwarded", b"for=198.51.100.3"),
    )
    add, _ = run(request, CDN)
    assert dict(add)[b"X-Forwarded-For"] == b"198.51.100.1, 198.51.100.2, 198.51.100.3, 10.1.2.3"
    assert dict(add)[b"Forwarded"] == (
        b'for=198.51.100.1, for=198.51.100.3, for=10.1.2.3;host="chat.example.com";proto=https'
    )
    assert [name for name, _ in add].count(b"X-Forwarded-For") == 1


def test_trusted_ipv6_proxy_is_quoted_in_forwarded() -> None:
    request = received((b"Forwarded", b'for="[2001:db8::7]:4711"'), (b"X-Forwarded-For", b"2001:db8::7"))
    add, _ = run(request, "2001:db8:cafe::1")
    assert dict(add)[b"X-Forwarded-For"] == b"2001:db8::7, 2001:db8:cafe::1"
    assert dict(add)[b"Forwarded"] == (
        b'for="[2001:db8::7]:4711", for="[2001:db8:cafe::1]";host="chat.example.com";proto=https'
    )


def test_underscore_look_alikes_are_dropped_even_from_trusted_proxies() -> None:
    request = received((b"X_Forwarded_For", b"6.6.6.6"), (b"X-Forwarded-For", b"198.51.100.1"))
    add, drop = run(request, CDN)
    assert b"x_forwarded_for" in drop
    assert dict(add)[b"X-Forwarded-For"] == b"198.51.100.1, 10.1.2.3"
    assert b"x_forwarded_for" not in backend_sees(request, add)


# --- which address is checked -----------------------------------------------------------------


def test_trust_is_checked_on_the_client_address_not_the_tcp_peer() -> None:
    """Behind an L4 balancer with PROXY protocol, the TCP peer is the balancer (trusted
    network), but the HTTP request comes from the client the PROXY header named."""
    request = received((b"X-Forwarded-For", b"1.1.1.1"))

    def via(peer_ip: str, client_ip: str) -> bytes:
        add, _ = forwarding(
            list(request.headers),
            peer_ip=peer_ip,
            client_ip=client_ip,
            client_port=1,
            host_header=b"chat.example.com",
            tls=True,
            trusted=TRUSTED,
        )
        return dict(add)[b"X-Forwarded-For"]

    assert via(peer_ip=CDN, client_ip=CLIENT) == CLIENT.encode()  # a trusted balancer: forged header dropped
    assert via(peer_ip=CLIENT, client_ip=CDN) == b"1.1.1.1, 10.1.2.3"  # a trusted HTTP proxy: kept


def test_is_trusted() -> None:
    assert is_trusted("10.255.0.1", TRUSTED)
    assert is_trusted("::ffff:10.0.0.1", TRUSTED)  # IPv4-mapped: checked as IPv4
    assert is_trusted("2001:db8:cafe:1::1", TRUSTED)
    assert not is_trusted("2001:db8:caff::1", TRUSTED)
    assert not is_trusted("11.0.0.1", TRUSTED)
    assert not is_trusted("not an address", TRUSTED)
    assert not is_trusted("", TRUSTED)
    assert not is_trusted("10.0.0.1", ())


# --- parse_trusted --------------------------------------------------------------------------------


def test_parse_trusted() -> None:
    assert parse_trusted(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("192.0.2.7/32"),
        ipaddress.IPv6Network("2001:db8::/32"),
        ipaddress.IPv6Network("::1/128"),
    )
    assert parse_trusted([]) == ()


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.1/8", "trusted proxy network '10.0.0.1/8' has host bits set; did you mean \"10.0.0.0/8\"?"),
        ("2001:db8::1/32", 'did you mean "2001:db8::/32"?'),
        ("10.0.0.0/33", "got '10.0.0.0/33'"),
        ("10.0.0", "got '10.0.0'"),
        ("example.com", 'expected an IP address or network like "10.0.0.0/8" or "2001:db8::/32", got \'example.com\''),
        (" 10.0.0.0/8", "got ' 10.0.0.0/8'"),
        ("", "got ''"),
    ],
)
def test_parse_trusted_errors(cidr: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_trusted(["192.0.2.0/24", cidr])
    assert message in str(caught.value)


def test_dropped_headers_cover_the_handshake_list() -> None:
    assert FORWARDING_HEADERS <= DROPPED_HEADERS
