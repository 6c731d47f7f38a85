"""The forward-auth settings' checks of ``proto.forward_auth``: the URL and the header names. Pure.

The subrequest against a real auth service is tests/e2e/test_forward_auth.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from wsproxy.config.schema import ForwardAuthConfig
from wsproxy.proto.forward_auth import check_header_names, host_header, parse_url


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("http://127.0.0.1:9100/auth", ("127.0.0.1", 9100, b"/auth")),
        ("http://auth.internal/check?scope=ws&x=%20", ("auth.internal", 80, b"/check?scope=ws&x=%20")),
        ("HTTP://Auth.Internal:8080", ("auth.internal", 8080, b"/")),
        ("http://auth.internal?x=1", ("auth.internal", 80, b"/?x=1")),
        ("http://[::1]:9100/auth", ("::1", 9100, b"/auth")),
        ("http://[2001:db8::1]/", ("2001:db8::1", 80, b"/")),
        ("http://auth_svc.local./a/b", ("auth_svc.local", 80, b"/a/b")),
    ],
)
def test_parse_url(url: str, parsed: tuple[str, int, bytes]) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://auth.internal/auth", "https:// auth services are not supported yet"),
        ("ftp://auth.internal/auth", "unsupported URL scheme 'ftp'"),
        ("auth.internal:9100/auth", 'expected an "http://host[:port]/path" URL'),
        ("http:///auth", "no host"),
        ("http://:9100/auth", "no host"),
        ("http://auth.internal:/auth", "invalid port ''"),
        ("http://auth.internal:http/auth", "invalid port 'http'"),
        ("http://auth.internal:0/auth", "port 0 is out of range"),
        ("http://auth.internal:70000/auth", "port 70000 is out of range"),
        ("http://user:pw@auth.internal/auth", "credentials in the URL are not supported"),
        ("http://::1:9100/auth", "needs brackets"),
        ("http://[::1/auth", 'unclosed "["'),
        ("http://[not-v6]:9100/auth", "invalid IPv6 address 'not-v6'"),
        ("http://[::1]9100/auth", 'expected ":port" after "]"'),
        ("http://auth internal/auth", "invalid host name 'auth internal'"),
        ("http://-bad.example/auth", "invalid host name '-bad.example'"),
        ("http://auth.internal/a b", "character ' ' is not allowed"),
        ("http://auth.internal/café", "character 'é' is not allowed"),
        ("http://auth.internal/auth#frag", "fragment"),
    ],
)
def test_parse_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_url(url)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"send_headers": ("Host",)}, "send_headers: Host is set by the proxy"),
        ({"send_headers": ("X-Forwarded-For",)}, "send_headers: X-Forwarded-For is set by the proxy"),
        ({"send_headers": ("X_Forwarded_Uri",)}, "send_headers: X_Forwarded_Uri is set by the proxy"),
        ({"send_headers": ("Connection",)}, "send_headers: Connection is set by the proxy"),
        ({"send_headers": ("Bad Name",)}, "send_headers: 'Bad Name' is not a header name"),
        ({"copy_headers": ("Upgrade",)}, "copy_headers: Upgrade is set by the proxy"),
        ({"copy_headers": ("Sec-WebSocket-Key",)}, "copy_headers: Sec-WebSocket-Key belongs to the WebSocket handshake"),
    ],
)
def test_reserved_header_names_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_header_names(ForwardAuthConfig(url="http://127.0.0.1:9100/auth", **changes))


@pytest.mark.parametrize("field", ["identity_from", "lifetime_from"])
def test_identity_and_lifetime_headers_must_be_header_names(field: str) -> None:
    good: dict[str, Any] = {field: "X-Auth-User"}
    bad: dict[str, Any] = {field: "X User"}
    check_header_names(ForwardAuthConfig(url="http://127.0.0.1:9100/auth", **good))
    with pytest.raises(ValueError, match=re.escape(f"{field}: 'X User' is not a header name")):
        check_header_names(ForwardAuthConfig(url="http://127.0.0.1:9100/auth", **bad))


@pytest.mark.parametrize(
    ("host", "port", "header"),
    [("auth.internal", 80, b"auth.internal"), ("127.0.0.1", 9100, b"127.0.0.1:9100"), ("::1", 9100, b"[::1]:9100")],
)
def test_host_header(host: str, port: int, header: bytes) -> None:
    assert host_header(host, port) == header
