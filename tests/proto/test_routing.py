"""Host and path matching, and the route table's first-match rule. No I/O here."""

from __future__ import annotations

import pytest

from wsproxy.config.schema import PoolName, RouteConfig
from wsproxy.proto.handshake import Upgrade, check_upgrade
from wsproxy.proto.routing import Router, host_matches, path_matches

from .test_handshake import BASE, edit, request


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*", "example.com", True),
        ("*", "localhost", True),
        ("*", "::1", True),
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("example.com", "example.com.evil", False),
        ("example.com", "example.org", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),  # not the bare domain
        ("*.example.com", ".example.com", False),  # no empty label
        ("*.example.com", "badexample.com", False),  # a whole label, not a suffix of one
        ("*.example.com", "a.example.com.evil", False),
        ("*.example.com", "a.example.org", False),
        ("*.b.example.com", "a.b.example.com", True),
        ("*.b.example.com", "b.example.com", False),
        ("*.b.example.com", "a.c.example.com", False),
    ],
)
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        ("/chat", "/chat", True),
        ("/chat", "/chat/", True),
        ("/chat", "/chat/room/42", True),
        ("/chat", "/chatroom", False),  # segments, not characters
        ("/chat", "/chat.json", False),
        ("/chat", "/cha", False),
        ("/chat", "/", False),
        ("/chat", "/other/chat", False),
        ("/chat", "/Chat", False),  # paths are case-sensitive
        ("/a/", "/a/", True),
        ("/a/", "/a/b", True),
        ("/a/", "/a/b/c", True),
        ("/a/", "/a", False),
        ("/a/", "/ab", False),
        ("/a/b", "/a/b/c", True),
        ("/a/b", "/a/bc", False),
    ],
)
def test_path_matches(prefix: str, path: str, expected: bool) -> None:
    assert path_matches(prefix, path) is expected


def route(pool: str, host: str = "*", path: str = "/") -> RouteConfig:
    return RouteConfig(host=host, path=path, pool=PoolName(pool))


ROUTES = (
    route("admin", host="admin.example.com", path="/ws"),
    route("chat-eu", host="*.eu.example.com", path="/chat"),
    route("chat", host="*.example.com", path="/chat"),
    route("api", host="api.example.com"),
    route("fallback-chat", path="/chat"),
    route("default"),
)


@pytest.mark.parametrize(
    ("host", "path", "pool"),
    [
        ("admin.example.com", "/ws", "admin"),
        ("admin.example.com", "/ws/x", "admin"),
        ("admin.example.com", "/chat", "chat"),  # the admin route does not match /chat; next is *.example.com
        ("fr.eu.example.com", "/chat/room", "chat-eu"),  # matches both chat routes: the first wins
        ("www.example.com", "/chat", "chat"),
        ("www.example.com", "/chatroom", "default"),
        ("api.example.com", "/chat", "chat"),  # the wildcard route comes before the exact one
        ("api.example.com", "/v1", "api"),
        ("example.com", "/chat", "fallback-chat"),  # the bare domain is not *.example.com
        ("example.org", "/", "default"),
    ],
)
def test_router_first_match_wins(host: str, path: str, pool: str) -> None:
    matched = Router(ROUTES).match(host, path)
    assert matched is not None
    assert matched.pool == pool


def test_router_no_match() -> None:
    router = Router((route("chat", host="example.com", path="/chat"),))
    assert router.match("example.com", "/other") is None
    assert router.match("other.com", "/chat") is None
    assert Router(()).match("example.com", "/") is None


def test_router_with_a_parsed_upgrade() -> None:
    """Host and path as check_upgrade hands them over: lower case, no port, no query."""
    up = check_upgrade(request(edit(BASE, Host=b"Fr.EU.Example.COM:8443"), target=b"/chat/room?x=/admin"))
    assert isinstance(up, Upgrade)
    matched = Router(ROUTES).match(up.host, up.path)
    assert matched is not None and matched.pool == "chat-eu"
