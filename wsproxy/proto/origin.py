"""The Origin allow-list of a route: compiled patterns and the 403 verdict. No I/O here.

This module decides whether a WebSocket upgrade's ``Origin`` header (RFC 6455
§4.2.1 item 7, §10.2; RFC 6454 §7) is one a route accepts. It is not a CORS
implementation, it does not look at ``Host`` or ``Referer``, and it knows
nothing about routes: ``session`` passes it the route's compiled policy.

Patterns (``routes[].origins``), compiled once at config load time::

    https://app.example.com        exactly this origin (port 443 implied)
    https://app.example.com:8443   scheme, host and port all count
    https://*.example.com          one or more leading labels: a.example.com,
                                   a.b.example.com, not example.com
    http://[::1]:8080              IP literals, IPv6 in brackets
    null                           the opaque origin (sandboxed iframes, file:)

Comparison follows RFC 6454 §5 on the serialised origin (scheme, host, port):
scheme and host are case-insensitive, and the default port of ``http``/``ws``
(80) and ``https``/``wss`` (443) is the same as no port, so
``https://a.com`` matches ``https://a.com:443``. ``null`` matches only an
explicit ``null`` entry, never a wildcard. Internationalised names must be
written in their ASCII (``xn--``) form, which is what browsers send.

Verdicts (``check_origin``), all 403 and all decided before anything reaches a
backend, with a reason that names what was seen:

* more than one ``Origin`` header: always refused, whatever the policy;
* no ``Origin`` header: refused only when ``allow_missing_origin`` is false,
  even when the route allows any origin (non-browser clients send none);
* ``origins`` absent from the config (policy ``None``): any origin;
* otherwise the origin must match a pattern; a malformed value never does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from .handshake import Rejection

__all__ = ["OriginPolicy", "check_origin", "check_origin_pattern", "compile_origins"]

#: The schemes whose default port is implied (WHATWG URL "special schemes"; RFC 6455 §3 for ws/wss).
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")  # RFC 3986 §3.1, after lower-casing
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # RFC 1123 §2.1, plus "_"
_PORT = re.compile(r"[1-9][0-9]{0,4}")  # no leading zeros: browsers never send them

#: (scheme, host, port): host lower case, IPv6 as "[compressed]", port None when default.
_Origin: TypeAlias = tuple[str, str, int | None]


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """The compiled ``origins`` list of one route (see the module docstring)."""

    patterns: tuple[str, ...]  # as written in the config, for messages
    exact: frozenset[_Origin]
    wildcards: frozenset[_Origin]  # host is the suffix after "*", starting with "."
    allow_null: bool

    def allows(self, value: str) -> bool:
        """Does the ``Origin`` header value ``value`` match one of the patterns?

        A malformed value matches nothing.
        """
        if value == "null":  # RFC 6454 §7.1: the serialisation of an opaque origin
            return self.allow_null
        try:
            scheme, host, port = _parse(value)
        except ValueError:
            return False
        if (scheme, host, port) in self.exact:
            return True
        if not self.wildcards or host.startswith("[") or _looks_numeric(host):
            return False
        # Try every proper suffix that starts at a label boundary: O(labels), not O(patterns).
        dot = host.find(".")
        while dot > 0:
            if (scheme, host[dot:], port) in self.wildcards:
                return True
            dot = host.find(".", dot + 1)
        return False


def check_origin_pattern(p: str) -> None:
    """Raise ValueError, with a message that says what is wrong, unless ``p`` is a valid pattern.

    For the config loader, which adds the file position to the message.
    """
    _compile_one(p)


def compile_origins(patterns: Sequence[str]) -> OriginPolicy:
    """Compile a route's ``origins`` list; ValueError names the first bad pattern.

    An empty list is valid and allows no origin at all (only a missing Origin,
    when ``allow_missing_origin`` is true).
    """
    exact: set[_Origin] = set()
    wildcards: set[_Origin] = set()
    allow_null = False
    for p in patterns:
        compiled = _compile_one(p)
        if compiled is None:
            allow_null = True
        elif compiled[1].startswith("."):
            wildcards.add(compiled)
        else:
            exact.add(compiled)
    return OriginPolicy(tuple(patterns), frozenset(exact), frozenset(wildcards), allow_null)


def check_origin(
    policy: OriginPolicy | None, allow_missing: bool, headers: Sequence[tuple[bytes, bytes]]
) -> Rejection | None:
    """The route's Origin verdict: None to go on, or a 403 ``Rejection``.

    ``headers`` are the request's headers as h11 gives them (lower-case
    names); ``policy`` is None when the route has no ``origins`` key.
    """
    values = [value for name, value in headers if name == b"origin"]
    if len(values) > 1:
        # RFC 6454 §7.3: a user agent sends at most one; two are a forgery or a broken proxy.
        return Rejection(403, "more than one Origin header: " + ", ".join(_show(v) for v in values))
    if not values:
        if allow_missing:
            return None
        return Rejection(403, "missing Origin header (allow_missing_origin is false)")
    if policy is None:
        return None
    value = values[0].decode("latin-1")
    if policy.allows(value):
        return None
    if value != "null":
        try:
            _parse(value)
        except ValueError:
            return Rejection(403, f"invalid Origin header: {_show(values[0])}")
    return Rejection(403, f"Origin not allowed: {_show(values[0])}")


def _compile_one(p: str) -> _Origin | None:
    """One pattern → (scheme, host, port), host ".suffix" for wildcards; None for "null"."""
    if p == "null":
        return None
    if p == "*":
        raise ValueError('"*" is not an origin pattern; leave "origins" out to allow any origin')
    if not p.isascii():
        raise ValueError(f"origin pattern {p!r} is not ASCII; write internationalised names as xn--")
    wildcard = False
    rest = p
    if "://*." in p:
        wildcard = True
        rest = p.replace("://*.", "://", 1)
    if "*" in rest:
        raise ValueError(
            f"origin pattern {p!r} has a wildcard elsewhere than as the leading labels of the host "
            '(like "https://*.example.com")'
        )
    try:
        scheme, host, port = _parse(rest)
    except ValueError as exc:
        raise ValueError(f"origin pattern {p!r}: {exc}") from None
    if wildcard:
        if host.startswith("[") or _looks_numeric(host):
            raise ValueError(f"origin pattern {p!r}: a wildcard needs a host name after \"*.\", not an IP address")
        host = "." + host
    return scheme, host, port


def _parse(text: str) -> _Origin:
    """Parse a serialised origin ``scheme://host[:port]`` (RFC 6454 §6.2), case-insensitively.

    ValueError says what is wrong, for pattern messages; header values only
    need to know that it is wrong.
    """
    scheme, sep, authority = text.partition("://")
    if not sep:
        raise ValueError('expected "scheme://host[:port]" or "null"')
    scheme = scheme.lower()
    if not _SCHEME.fullmatch(scheme):
        raise ValueError(f"invalid scheme {scheme!r}")
    for char in "/?#":
        if char in authority:
            raise ValueError(f'an origin has no path, query or fragment (found "{char}")')
    if "@" in authority:
        raise ValueError("an origin has no user information (found \"@\")")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError('IPv6 address without its closing "]"')
        literal, after = authority[1:end], authority[end + 1 :]
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected {after!r} after the IPv6 address")
        has_port, port_text = bool(after), after[1:]
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {literal!r}") from None
        if address.scope_id is not None:
            raise ValueError(f"an origin has no IPv6 zone ({literal!r})")
        host = f"[{address.compressed}]"
    else:
        host, colon, port_text = authority.partition(":")
        has_port = bool(colon)
        host = host.lower()
        _check_host(host)
    port: int | None = None
    if has_port:
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise ValueError(f"invalid port {port_text!r} (1..65535, no leading zeros)")
        port = int(port_text)
    if port is not None and DEFAULT_PORTS.get(scheme) == port:
        port = None  # RFC 6454 §6.2: the default port is not part of the serialisation
    return scheme, host, port


def _check_host(host: str) -> None:
    """A DNS name (RFC 1123 labels, "_" allowed) or a dotted-quad IPv4 address, lower case."""
    if not host:
        raise ValueError("empty host")
    if _looks_numeric(host):
        if not _is_ipv4(host):
            raise ValueError(f"invalid IPv4 address {host!r}")
        return
    if len(host) > 253:
        raise ValueError("host name longer than 253 characters")
    for label in host.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid host name {host!r}")


def _looks_numeric(host: str) -> bool:
    """The URL standard treats a host whose last label is a number as an IPv4 address."""
    return host.rsplit(".", 1)[-1].isdigit()


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)  # rejects leading zeros (octal look-alikes)
    except ValueError:
        return False
    return True


def _show(value: bytes, limit: int = 200) -> str:
    """A header value for a log line: non-ASCII bytes escaped, long values cut."""
    text = value.decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "..."
