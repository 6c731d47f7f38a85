"""Host and path matching, and the route table's first-match rule. No I/O here."""

from __future__ import annotations

import pytest

from wsproxy.config.schema import PoolName, RouteConfig
from wsproxy.proto.handshake import Rejection, Upgrade, check_upgrade
from wsproxy.proto.routing import Router, host_matches, path_matches

from tests.kit.h11_requests import BASE, edit, request


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


# --- normalised requests, path parameters, case, stripped headers ---------------------------

GUARDED = (
    RouteConfig(path="/admin", pool=PoolName("admin")),
    RouteConfig(host="secure.example.com", pool=PoolName("secure")),
    RouteConfig(path="/public", pool=PoolName("public")),
    RouteConfig(pool=PoolName("open")),
)


@pytest.mark.parametrize(
    ("host", "target", "pool"),
    [
        ("h", b"/%61dmin", "admin"),
        ("h", b"//admin", "admin"),
        ("h", b"/x/../admin", "admin"),
        ("h", b"/admin/;x", "admin"),
        ("h", b"/admin/x;y", "admin"),
        ("Secure.Example.COM.", b"/", "secure"),
        ("secure.example.com.:443", b"/x", "secure"),
        ("h", b"/Admin", "open"),  # case-sensitive unless the route says otherwise
        ("h", b"/chat;jsessionid=1", "open"),  # parameters that do not change the route pass
        ("h", b"/public/a;b", "public"),
    ],
)


def test_a_normalised_upgrade_is_routed_as_its_backend_reads_it(host: str, target: bytes, pool: str) -> None:
    up = check_upgrade(request(edit(BASE, Host=host.encode()), target=target))
    assert isinstance(up, Upgrade)
    matched = Router(GUARDED).route(up.host, up.path)
    assert isinstance(matched, RouteConfig) and matched.pool == pool


@pytest.mark.parametrize(
    "path",
    [
        "/admin;x",  # Tomcat reads /admin: it would pass as the open route
        "/public;x",  # a backend that keeps parameters reads a root resource, not /public
        "/public/..;/admin",  # Tomcat reads /admin
        "/..;/admin",
    ],
)


def test_path_parameters_that_change_the_route_are_refused(path: str) -> None:
    verdict = Router(GUARDED).route("h", path)
    assert isinstance(verdict, Rejection) and verdict.status == 400


def test_no_route_is_404() -> None:
    verdict = Router((route("chat", path="/chat"),)).route("h", "/other")
    assert isinstance(verdict, Rejection) and verdict.status == 404


def test_path_ignore_case() -> None:
    routes = (RouteConfig(path="/admin", pool=PoolName("admin"), path_ignore_case=True), route("open"))
    router = Router(routes)
    for path in ("/Admin", "/ADMIN/x", "/admin", "/aDmIn/"):
        assert router.match("h", path) is routes[0], path
    assert router.match("h", "/Administrator") is routes[1]  # still whole segments
    assert path_matches("/Chat", "/chat", ignore_case=True)
    assert not path_matches("/chat", "/chatroom", ignore_case=True)


def test_strip_headers_per_route() -> None:
    from wsproxy.config.schema import AuthConfig, ForwardAuthConfig
    from wsproxy.proto.handshake import DEFAULT_STRIP_HEADERS

    routes = (
        RouteConfig(path="/a", pool=PoolName("a"), auth=AuthConfig(mode="tokens", identity_header="X-User-Id")),
        RouteConfig(
            path="/f",
            pool=PoolName("f"),
            auth=AuthConfig(mode="forward", forward=ForwardAuthConfig(url="http://127.0.0.1:1/", copy_headers=("X-Tenant",))),
        ),
        RouteConfig(path="/raw", pool=PoolName("raw"), strip_headers_default=False, strip_headers=("X_Debug",)),
        route("open"),
    )
    router = Router(routes)
    identity = {b"x-auth-subject", b"x-user-id", b"x-tenant", b"x-forwarded-client-cert"}
    for r in routes:  # every route strips every identity header of the config
        assert identity <= router.strip_headers(r)
    assert DEFAULT_STRIP_HEADERS <= router.strip_headers(routes[3])
    assert b"x-real-ip" in router.strip_headers(routes[0])
    assert router.strip_headers(routes[2]) == identity | {b"x-debug"}
