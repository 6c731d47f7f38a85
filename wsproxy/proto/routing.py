"""Route a request to a pool by Host and path prefix. No I/O here.

Routes are tried in config order and the first match wins (like Caddy's
``handle`` blocks and Envoy's route table). Host patterns: ``*`` matches every
host, ``*.example.com`` matches one or more leading labels (``a.example.com``,
``a.b.example.com``, but not ``example.com``), anything else matches exactly,
case-insensitively. Path prefixes match whole segments: ``/chat`` matches
``/chat`` and ``/chat/room``, not ``/chatroom``; a prefix ending in ``/``
matches everything below it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config.schema import RouteConfig


def host_matches(pattern: str, host: str) -> bool:
    """Does the (lower-case, port-less) ``host`` match the route's host pattern?"""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Does ``path`` lie under ``prefix``, segment by segment?"""
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


class Router:
    """The route table of one config generation."""

    __slots__ = ("routes",)

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)

    def match(self, host: str, path: str) -> RouteConfig | None:
        """The first route matching ``host`` and ``path``, or None (the proxy answers 404)."""
        for route in self.routes:
            if host_matches(route.host, host) and path_matches(route.path, path):
                return route
        return None
