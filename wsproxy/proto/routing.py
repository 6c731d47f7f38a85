"""Route a request to a pool by Host and path prefix, and what each route strips. No I/O here.

Routes are tried in config order and the first match wins (like Caddy's
``handle`` blocks and Envoy's route table). A route with ``subprotocol``
matches only requests whose Sec-WebSocket-Protocol offer names it (exactly:
RFC 6455 §11.3.4 subprotocol names are case-sensitive), so two versions of an
application protocol on one path can go to different pools. Host patterns: ``*`` matches every
host, ``*.example.com`` matches one or more leading labels (``a.example.com``,
``a.b.example.com``, but not ``example.com``), anything else matches exactly,
case-insensitively. Path prefixes match whole segments: ``/chat`` matches
``/chat`` and ``/chat/room``, not ``/chatroom``; a prefix ending in ``/``
matches everything below it. Paths are case-sensitive unless the route says
``path_ignore_case`` (ASCII letters only).

What is matched is the normalised request (``proto.target``: the host lower
case without a trailing dot, the path percent-decoded where that is safe, dot
segments resolved, slashes merged), never the raw bytes, and the normalised
target is what goes upstream. Path parameters (``;``) stay in their segment,
so ``/admin;x`` is not under ``/admin``; because servlet containers drop them
(``/admin;x`` and ``/public/..;/admin`` mean ``/admin`` there), ``route``
refuses with 400 a path that would pick another route without its parameters.

``Router.strip_headers(route)`` is the set of client headers that never reach
that route's backend: every identity header any route of the config sets
(``identity_header``, forward auth's ``copy_headers``, ``X-Auth-Subject``,
``client_cert_header`` and ``X-Forwarded-Client-Cert``),
so an open route cannot be used to impersonate a user towards a backend that
also serves an authenticated one; ``handshake.DEFAULT_STRIP_HEADERS`` unless
``strip_headers_default: false``; and the route's ``strip_headers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config.schema import RouteConfig
from .handshake import DEFAULT_STRIP_HEADERS, Rejection
from .target import without_path_parameters

#: The identity header of auth's default, stripped even when no route uses it.
DEFAULT_IDENTITY_HEADER = "X-Auth-Subject"

#: Envoy's client certificate header (``routes[].client_cert_header``), stripped on every route.
XFCC_HEADER = "X-Forwarded-Client-Cert"

#: The ``route`` of a log line or metric label before a route matched (a refusal, a shed connection).
NO_ROUTE = "-"


def route_label(route: RouteConfig) -> str:
    """How logs and metric labels name a route: host pattern and path prefix (``*/chat``)."""
    return f"{route.host}{route.path}"


def host_matches(pattern: str, host: str) -> bool:
    """Does the (lower-case, port-less) ``host`` match the route's host pattern?"""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def path_matches(prefix: str, path: str, *, ignore_case: bool = False) -> bool:
    """Does ``path`` lie under ``prefix``, segment by segment?"""
    if ignore_case:
        prefix, path = prefix.lower(), path.lower()
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


def header_names(names: Iterable[str]) -> frozenset[bytes]:
    """Header names as ``upstream_request`` compares them: lower case, "_" read as "-"."""
    return frozenset(name.lower().replace("_", "-").encode("latin-1") for name in names)


class Router:
    """The route table of one config generation."""

    __slots__ = ("routes", "_strip")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)
        identity = {DEFAULT_IDENTITY_HEADER, XFCC_HEADER}
        for route in self.routes:
            if route.client_cert_header is not None:
                identity.add(route.client_cert_header)
            if route.auth is not None:
                identity.add(route.auth.identity_header)
                if route.auth.forward is not None:
                    identity.update(route.auth.forward.copy_headers)
        identity_names = header_names(identity)
        self._strip = {
            id(route): identity_names
            | (DEFAULT_STRIP_HEADERS if route.strip_headers_default else frozenset())
            | header_names(route.strip_headers)
            for route in self.routes
        }

    def match(self, host: str, path: str, subprotocols: Sequence[str] = ()) -> RouteConfig | None:
        """The first route matching ``host``, ``path`` and the offered ``subprotocols``,
        or None (the proxy answers 404)."""
        for route in self.routes:
            if (
                host_matches(route.host, host)
                and path_matches(route.path, path, ignore_case=route.path_ignore_case)
                and (route.subprotocol is None or route.subprotocol in subprotocols)
            ):
                return route
        return None

    def route(self, host: str, path: str, subprotocols: Sequence[str] = ()) -> RouteConfig | Rejection:
        """The route for a normalised host and path and the client's subprotocol offer,
        404 when none matches, or 400 when the path's ``;`` parameters decide the
        route (see the module docstring)."""
        route = self.match(host, path, subprotocols)
        if ";" in path:
            bare = without_path_parameters(path)
            if bare is None or self.match(host, bare, subprotocols) is not route:
                return Rejection(400, "path parameters (;) would change the route")
        if route is None:
            return Rejection(404, f"no route for host={host} path={path}")
        return route

    def strip_headers(self, route: RouteConfig) -> frozenset[bytes]:
        """The client headers ``route`` never passes upstream (``upstream_request``'s ``strip``)."""
        return self._strip[id(route)]
