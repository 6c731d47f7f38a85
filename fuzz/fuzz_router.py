"""Fuzz target: the router (wsproxy/proto/routing.py) and the request-target normaliser.

Input layout::

    count        1..6 routes (count % 6 + 1), then per route two bytes choosing a
                 host pattern and a path prefix from the tables below
    [len, host]  the Host as check_upgrade reports it (lower case, no port)
    target       the request target (origin-form)

Router invariants: ``Router.match`` returns the first route that a reference
matcher written here accepts (host: ``*``, ``*.suffix`` with at least one more
label, or exact; path: prefix on whole segments, written over split segments
rather than string offsets), or None when none does.

Normaliser (``wsproxy.proto.target``, when that module exists; this part is
skipped without it): an accepted target starts with ``/``, is a fixed point
(normalising it again changes nothing), its path has no empty segment and no
``.``/``..`` segment, also once percent-decoded, and its query is the input's
byte for byte; a refusal is a 400. The security property of issue 15: a
backend that percent-decodes the path it receives (as ASGI servers do) must
land on the same route as the one the proxy chose on the normalised target,
so the route that authorised a request is the route the backend serves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from fuzz._harness import Reader, finding, fuzz_main, instrumented

with instrumented("wsproxy"):
    from wsproxy.config.schema import PoolName, RouteConfig
    from wsproxy.proto.handshake import Rejection
    from wsproxy.proto.routing import Router

    try:
        from wsproxy.proto import target as target_module
    except ImportError:  # being written on another branch; the lead wires it in
        target_module = None

HOSTS = ("*", "example.com", "*.example.com", "secure.example.com", "a.b.example.com", "*.b.example.com")
PATHS = ("/", "/admin", "/admin/", "/chat", "/chat/room", "/a/b/", "/Admin", "/admin;x")


def _normaliser() -> Callable[[bytes], object] | None:
    """The normaliser of ``wsproxy.proto.target``, under whichever name it was given."""
    if target_module is None:
        return None
    for name in ("normalise_target", "normalize_target", "normalise", "normalize"):
        function = getattr(target_module, name, None)
        if callable(function):
            return function  # type: ignore[no-any-return]
    return None


NORMALISE = _normaliser()


def _segments_under(prefix: str, path: str) -> bool:
    """Reference: is ``path`` at or below ``prefix``, comparing whole segments?"""
    want = prefix.split("/")
    have = path.split("/")
    if prefix.endswith("/"):  # "/a/" = every path whose segments start with "", "a", and one more
        return len(have) >= len(want) and have[: len(want) - 1] == want[:-1]
    return have[: len(want)] == want


def _host_ok(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        labels, suffix = host.split("."), pattern[2:].split(".")
        return len(labels) > len(suffix) and labels[-len(suffix) :] == suffix and bool(".".join(labels[: -len(suffix)]))
    return host == pattern


def _reference(routes: list[RouteConfig], host: str, path: str) -> RouteConfig | None:
    for route in routes:
        if _host_ok(route.host, host) and _segments_under(route.path, path):
            return route
    return None


def _check_route(router: Router, routes: list[RouteConfig], host: str, path: str) -> RouteConfig | None:
    got = router.match(host, path)
    want = _reference(routes, host, path)
    if got is not want:
        finding("router-match", f"{host!r} {path!r}: router picked {got!r}, reference {want!r}")
    return got


def _as_bytes(value: object) -> bytes | None:
    for attr in ("target", "value"):
        value = getattr(value, attr, value)
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, bytes):
        return value
    return None


def _check_normaliser(normalise: Callable[[bytes], object], router: Router, routes: list[RouteConfig],
                      host: str, raw: bytes) -> None:
    result = normalise(raw)
    if isinstance(result, Rejection):
        if result.status != 400:
            finding("target-status", f"{raw!r} refused with {result.status}")
        return
    normal = _as_bytes(result)
    if normal is None:
        finding("target-api", f"wsproxy.proto.target returned {type(result).__name__}; update fuzz_router._as_bytes")
        return
    path, _, query = normal.partition(b"?")
    if not path.startswith(b"/"):
        finding("target-form", f"{raw!r} normalised to {normal!r}")
    if raw.partition(b"?")[1] and query != raw.partition(b"?")[2]:
        finding("target-query", f"the query of {raw!r} changed: {normal!r}")
    again = _as_bytes(normalise(normal))
    if again != normal:
        finding("target-idempotent", f"{raw!r} → {normal!r} → {again!r}")
    decoded = unquote_to_bytes(path)
    for form, what in ((path, "normalised"), (decoded, "decoded")):
        segments = form.split(b"/")[1:]
        if any(s in (b".", b"..") for s in segments) or b"" in segments[:-1]:
            finding("target-segments", f"{raw!r} → {what} path {form!r} keeps a dot or empty segment")
    chosen = _check_route(router, routes, host, path.decode("latin-1"))
    served = _check_route(router, routes, host, decoded.decode("latin-1"))
    if chosen is not served:
        finding("target-route", f"{raw!r}: the proxy routes {path!r} to {chosen!r}, "
                                f"a decoding backend serves {decoded!r} as {served!r}")


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    routes = [
        RouteConfig(pool=PoolName(f"p{i}"), host=HOSTS[r.byte() % len(HOSTS)], path=PATHS[r.byte() % len(PATHS)])
        for i in range(r.byte() % 6 + 1)
    ]
    host = r.blob().decode("latin-1").lower()
    raw = r.rest()
    router = Router(routes)
    if raw.startswith(b"/"):
        _check_route(router, routes, host, raw.split(b"?", 1)[0].decode("latin-1"))
        if NORMALISE is not None:
            _check_normaliser(NORMALISE, router, routes, host, raw)


def main() -> None:
    fuzz_main(test_one_input)


if __name__ == "__main__":
    sys.exit(main())
