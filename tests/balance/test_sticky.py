"""Sticky keys and signed pin cookies: parsing, formatting, forgery. No I/O here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from wsproxy.balance.sticky import cookie_value, pinned_backend, request_cookie, set_cookie, sticky_key
from wsproxy.config.schema import Address, BackendConfig, StickyConfig, StickyCookieConfig

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32
BACKENDS = tuple(BackendConfig(address=Address(f"10.0.0.{i}", 9000)) for i in range(1, 5))
COOKIE = StickyCookieConfig(secret=SECRET, secret_file="/etc/wsproxy/sticky.key", max_age_s=3600.0, same_site="Strict")


# -- cookie values -----------------------------------------------------------------------------------------------------


def test_cookie_value_is_opaque_short_and_url_safe() -> None:
    value = cookie_value(SECRET, "chat", BACKENDS[0].address)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", value)
    assert "10.0.0.1" not in value
    assert value == cookie_value(SECRET, "chat", Address("10.0.0.1", 9000))  # any instance computes the same


def test_cookie_value_known_answer() -> None:
    """HMAC-SHA256 over the context, pool and address, cut to 128 bits, base64url without padding."""
    mac = hmac.new(SECRET, b"wsproxy sticky v1\x00chat\x0010.0.0.1:9000", hashlib.sha256).digest()[:16]
    assert cookie_value(SECRET, "chat", BACKENDS[0].address) == base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_cookie_values_differ_by_backend_pool_and_secret() -> None:
    values = {
        cookie_value(SECRET, "chat", BACKENDS[0].address),
        cookie_value(SECRET, "chat", BACKENDS[1].address),
        cookie_value(SECRET, "chat", Address("10.0.0.1", 9001)),
        cookie_value(SECRET, "feed", BACKENDS[0].address),
        cookie_value(OTHER_SECRET, "chat", BACKENDS[0].address),
    }
    assert len(values) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pinned_backend_round_trip(backend: BackendConfig) -> None:
    assert pinned_backend(cookie_value(SECRET, "chat", backend.address), SECRET, "chat", BACKENDS) is backend


def test_pinned_backend_v6() -> None:
    v6 = BackendConfig(address=Address("2001:db8::1", 9000))
    assert pinned_backend(cookie_value(SECRET, "chat", v6.address), SECRET, "chat", (*BACKENDS, v6)) is v6


@pytest.mark.parametrize(
    "value",
    [
        "",
        "AAAAAAAAAAAAAAAAAAAAAA",  # forged: right shape, wrong MAC
        cookie_value(SECRET, "feed", BACKENDS[0].address),  # another pool's pin
        cookie_value(OTHER_SECRET, "chat", BACKENDS[0].address),  # another deployment's secret
        cookie_value(SECRET, "chat", Address("10.0.0.9", 9000)),  # a backend no longer in the pool
        cookie_value(SECRET, "chat", BACKENDS[0].address)[:-1],  # truncated
        cookie_value(SECRET, "chat", BACKENDS[0].address) + "A",  # extended
        "10.0.0.1:9000",  # the address itself is not a pin
        "Ünïcödé",
    ],
    ids=["empty", "forged", "foreign-pool", "other-secret", "removed-backend", "truncated", "extended", "plain", "unicode"],
)
def test_pinned_backend_ignores_values_it_did_not_sign(value: str) -> None:
    assert pinned_backend(value, SECRET, "chat", BACKENDS) is None


# -- Set-Cookie and Cookie ---------------------------------------------------------------------------------------------


def test_set_cookie_plain() -> None:
    assert set_cookie("srv", "abc", COOKIE, secure=False) == b"srv=abc; Path=/; Max-Age=3600; HttpOnly; SameSite=Strict"


def test_set_cookie_on_tls_is_secure() -> None:
    assert set_cookie("srv", "abc", COOKIE, secure=True) == (
        b"srv=abc; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Strict"
    )


def test_set_cookie_max_age_is_a_positive_integer() -> None:
    short = StickyCookieConfig(secret=SECRET, secret_file="k", max_age_s=0.25)
    assert b"; Max-Age=1;" in set_cookie("srv", "abc", short, secure=False)
    default = StickyCookieConfig(secret=SECRET, secret_file="k")
    assert set_cookie("srv", "abc", default, secure=False).endswith(b"Max-Age=86400; HttpOnly; SameSite=Lax")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"cookie", b"srv=abc")], "abc"),
        ([(b"cookie", b"a=1; srv=abc; b=2")], "abc"),
        ([(b"cookie", b"a=1;srv=abc")], "abc"),
        ([(b"cookie", b'srv="abc"')], "abc"),
        ([(b"cookie", b"a=1"), (b"cookie", b"srv=abc")], "abc"),  # HTTP/2-style split headers
        ([(b"cookie", b"srv=first; srv=second")], "first"),  # RFC 6265 §5.4: most specific first
        ([(b"cookie", b"srv=")], ""),
        ([(b"cookie", b"xsrv=abc; srvx=abc")], None),
        ([(b"cookie", b"srv")], None),
        ([(b"x-cookie", b"srv=abc")], None),
        ([(b"host", b"example.com")], None),
        ([], None),
    ],
)
def test_request_cookie(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert request_cookie(headers, "srv") == expected


def test_set_cookie_round_trips_through_request_cookie() -> None:
    value = cookie_value(SECRET, "chat", BACKENDS[2].address)
    header = set_cookie("srv", value, COOKIE, secure=True)
    name_value = header.split(b";", 1)[0]  # what a browser sends back
    found = request_cookie([(b"cookie", b"theme=dark; " + name_value)], "srv")
    assert found is not None and pinned_backend(found, SECRET, "chat", BACKENDS) is BACKENDS[2]


# -- sticky keys -------------------------------------------------------------------------------------------------------


def key(
    source: str,
    name: str = "",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    target: bytes = b"/",
    client_ip: str = "203.0.113.9",
    claims: dict[str, object] | None = None,
    identity: str | None = None,
) -> bytes | None:
    sticky = StickyConfig(source=source, name=name, cookie=COOKIE if source == "cookie" else None)
    return sticky_key(sticky, headers=headers or [], target=target, client_ip=client_ip, claims=claims, identity=identity)


@pytest.mark.parametrize(
    ("identity", "expected"), [("alice", b"alice"), ("Zoë", "Zoë".encode()), ("", None), (None, None)]
)
def test_identity_key(identity: str | None, expected: bytes | None) -> None:
    """The session's identity, whichever auth kind (or client certificate) gave it."""
    assert key("identity", identity=identity, headers=[(b"x-user", b"mallory")], claims={"sub": "mallory"}) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-user", b"alice")], b"alice"),
        ([(b"x-user", b"  alice ")], b"alice"),
        ([(b"x-user", b"a"), (b"host", b"h"), (b"x-user", b"b")], b"a,b"),  # RFC 9110 §5.3
        ([(b"x-user", b"")], None),
        ([(b"x-other", b"alice")], None),
        ([], None),
    ],
)
def test_header_key(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert key("header", "X-User", headers=headers) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/chat?room=42", b"42"),
        (b"/chat?a=1&room=42&b=2", b"42"),
        (b"/chat?room=a%20b", b"a b"),
        (b"/chat?room=a+b", b"a b"),
        (b"/chat?room=%C3%A9t%C3%A9", "été".encode()),
        (b"/chat?room=%2F%26%3D", b"/&="),
        (b"/chat?ro%6Fm=42", b"42"),  # the name is decoded too
        (b"/chat?room=1&room=2", b"1"),  # the first wins
        (b"/chat?room=", None),
        (b"/chat?room", None),
        (b"/chat?rooms=42&xroom=1", None),
        (b"/chat", None),
        (b"/room=42", None),  # in the path, not the query
        (b"/chat?x=1#room=42", None),
    ],
)
def test_query_key(target: bytes, expected: bytes | None) -> None:
    assert key("query", "room", target=target) == expected


@pytest.mark.parametrize(
    ("client_ip", "expected"),
    [
        ("203.0.113.9", b"203.0.113.9"),
        ("::ffff:203.0.113.9", b"203.0.113.9"),  # a dual-stack listener sees IPv4 clients like this
        ("2001:DB8:0:0::1", b"2001:db8::1"),
        ("fe80::1%eth0", b"fe80::1"),
        ("", None),
    ],
)
def test_ip_key(client_ip: str, expected: bytes | None) -> None:
    assert key("ip", client_ip=client_ip) == expected


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"sub": "alice"}, b"alice"),
        ({"sub": "élise"}, "élise".encode()),
        ({"sub": 1234}, b"1234"),
        ({"sub": ""}, None),
        ({"sub": True}, None),
        ({"sub": None}, None),
        ({"sub": ["a"]}, None),
        ({"tenant": "x"}, None),
        (None, None),
    ],
)
def test_claim_key(claims: dict[str, object] | None, expected: bytes | None) -> None:
    assert key("claim", "sub", claims=claims) == expected


def test_cookie_source_has_no_key() -> None:
    """A cookie is a pin, read by pinned_backend, not a key to hash."""
    assert key("cookie", "srv", headers=[(b"cookie", b"srv=abc")]) is None
