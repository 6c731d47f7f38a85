"""Who may talk to the admin listener: the Host, Origin and path checks (sans-I/O).

A browser is the admin API's most dangerous client, because any page it shows
can make it send requests. Two attacks follow, and one check stops each:

- **Cross-site requests.** A page on ``http://evil.example`` can POST to
  ``http://127.0.0.1:9090/pools/.../drain`` without asking anyone (a "simple"
  request, ``mode: "no-cors"``); it only cannot read the answer. So a
  state-changing request (any method but GET and HEAD) is refused with 403 when
  it carries an ``Origin`` (RFC 6454 §7) other than the listener's own, or a
  ``Sec-Fetch-Site`` (Fetch Metadata) other than ``same-origin`` or ``none``.
  Browsers send at least one of them on every cross-origin POST; curl, scripts
  and Prometheus send neither and are not browsers, so they pass.
- **DNS rebinding.** A page on ``http://rebind.attacker.example:9090`` whose
  name is then pointed at 127.0.0.1 is "same-origin" with itself, and can
  read ``/status`` and ``/metrics``. Its requests carry ``Host:
  rebind.attacker.example:9090``, so every request whose Host (RFC 9110 §7.2)
  does not name this listener is refused with 421 Misdirected Request (RFC 9110
  §15.5.20). The names accepted are the bound address, the name ``bind`` gave
  and ``localhost``, ``127.0.0.1`` and ``[::1]``, each with the bound port;
  on a wildcard bind (``0.0.0.0``, ``::``) any IP literal with the bound port,
  since no page can rebind an IP literal. A unix-socket listener accepts any
  Host or none: no browser can reach a unix socket by itself.

The status page served by the same listener keeps working: its fetches are
same-origin, with the Host and Origin the browser took from the page's address.

Also here: the path of a request target split into percent-decoded segments,
where a control character (RFC 5234 CTL: below 0x20, or 0x7f) is refused with
400, so no decoded value can break a log line or reach the App.

This module decides only: no I/O, no trio, no logging (``control.admin``
answers and logs the verdict). It does not check the token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ..config.schema import hostport

#: Names a loopback listener is always reachable by, with its port.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Methods that read only; every other one changes state and needs a same-origin or non-browser caller.
SAFE_METHODS = (b"GET", b"HEAD")
#: ``Sec-Fetch-Site`` values a state-changing request may carry: the page's own, or typed by the user.
ALLOWED_FETCH_SITES = (b"same-origin", b"none")
HTTP_DEFAULT_PORT = 80  # RFC 9110 §4.2.1: a Host or Origin without a port

Authority = tuple[str, int]  # (host in canonical form, port)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The answer to a request refused here: the status and a short reason (the body and the log)."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSite:
    """The names one admin listener answers to."""

    authorities: frozenset[Authority] = frozenset()  # exact (host, port) pairs
    ports: frozenset[int] = frozenset()  # the bound ports
    any_ip_literal: bool = False  # bound to a wildcard address: any IP literal with a bound port
    unix: bool = False  # a unix socket: any Host, or none

    @classmethod
    def for_unix(cls) -> AdminSite:
        # Only local processes with access to the socket file reach it; a browser
        # never connects to a unix socket by itself, so the Host means nothing here.
        return cls(unix=True)

    @classmethod
    def for_tcp(cls, bound: Iterable[tuple[str, int]], configured_host: str | None = None) -> AdminSite:
        """From each bound socket's (ip, port), and the host name ``bind`` gave."""
        authorities: set[Authority] = set()
        ports: set[int] = set()
        wildcard = False
        for ip, port in bound:
            ports.add(port)
            host = canonical_host(ip)
            if host is None:
                continue
            authorities.add((host, port))
            wildcard = wildcard or ipaddress.ip_address(host).is_unspecified
            for name in (*LOOPBACK_NAMES, *([configured_host] if configured_host else [])):
                named = canonical_host(name)
                if named is not None:
                    authorities.add((named, port))
        return cls(authorities=frozenset(authorities), ports=frozenset(ports), any_ip_literal=wildcard)

    def accepts(self, authority: Authority) -> bool:
        if authority in self.authorities:
            return True
        host, port = authority
        return self.any_ip_literal and port in self.ports and _is_ip(host)

    def describe(self) -> str:
        """The accepted names, for a 421 body: ``127.0.0.1:9090, localhost:9090, [::1]:9090``."""
        if self.unix:
            return "any"
        names = sorted(hostport(host, port) for host, port in self.authorities)
        if self.any_ip_literal:
            names.insert(0, "any IP address with port " + "/".join(str(p) for p in sorted(self.ports)))
        return ", ".join(names)


def check_request(site: AdminSite, method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
    """None if the request may go on to the token check and the route; else why not.

    ``headers`` are h11's: names in lower case, values stripped.
    """
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        return Refusal(400, "several Host headers")  # RFC 9112 §3.2
    if not site.unix:
        if not hosts:
            return Refusal(421, f"misdirected request: no Host header; this admin listener answers to {site.describe()}")
        authority = parse_authority(hosts[0])
        if authority is None:
            return Refusal(400, "invalid Host header")
        if not site.accepts(authority):
            return Refusal(421, f"misdirected request: the Host is not this admin listener ({site.describe()})")
    if method in SAFE_METHODS:
        return None
    origins = [value for name, value in headers if name == b"origin"]
    if len(origins) > 1:
        return Refusal(403, "cross-origin request refused: several Origin headers")
    if origins and not _own_origin(site, origins[0], hosts[0] if hosts else None):
        return Refusal(403, "cross-origin request refused: the Origin is not this admin listener")
    fetch_sites = [value.lower() for name, value in headers if name == b"sec-fetch-site"]
    if any(value not in ALLOWED_FETCH_SITES for value in fetch_sites):
        return Refusal(403, "cross-origin request refused: Sec-Fetch-Site is not same-origin")
    return None


def _own_origin(site: AdminSite, origin: bytes, host: bytes | None) -> bool:
    """RFC 6454 §7: ``scheme://host[:port]``, or ``null`` (never ours)."""
    scheme, sep, rest = origin.partition(b"://")
    if not sep or b"/" in rest:
        return False
    authority = parse_authority(rest)
    if authority is None:
        return False
    if site.unix:
        # Behind whatever forwards to the socket, the page's origin is the Host it was asked by.
        own = parse_authority(host) if host is not None else None
        return scheme in (b"http", b"https") and own is not None and authority[0] == own[0]
    return scheme == b"http" and site.accepts(authority)  # the admin listener does no TLS


def parse_authority(value: bytes) -> Authority | None:
    """``host[:port]`` of a Host header or an origin → (canonical host, port), or None if malformed.

    The host is lower-cased; an IP literal is in its canonical form (``[::1]``
    and ``[0:0::1]`` are the same); no port (or an empty one) is port 80.
    """
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
            return None
        port = int(port_text)
    else:
        port = HTTP_DEFAULT_PORT
    canonical = canonical_host(host)
    return None if canonical is None else (canonical, port)


def canonical_host(host: str) -> str | None:
    """An IP literal in canonical form (IPv6 with or without brackets), a name in lower case; None if neither."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if bare is not host or not bare or not all(c.isascii() and (c.isalnum() or c in "-.") for c in bare):
        return None  # brackets around something that is not IPv6, or not a host name (RFC 3986 reg-name, simplified)
    return bare.lower()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def path_segments(target: bytes) -> list[str] | Refusal:
    """The path's segments, each percent-decoded (an encoded "/" stays inside its segment).

    400 for a segment that is not UTF-8 or holds a control character once
    decoded (``%0A``, ``%00``, ``%7F``): no admin name contains one, and a
    decoded value must never be able to break a log line.
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    segments: list[str] = []
    for part in path.split(b"/"):
        if not part:
            continue
        try:
            segment = unquote_to_bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            return Refusal(400, "invalid percent-encoding in the request target")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            return Refusal(400, "control character in the request path")
        segments.append(segment)
    return segments
