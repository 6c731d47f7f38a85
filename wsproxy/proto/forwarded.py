"""X-Forwarded-* and Forwarded towards the backend, with ``trusted_proxies``. No I/O here.

A backend learns who its client is from headers the proxy adds: the de facto
``X-Forwarded-For``, ``-Proto`` and ``-Host``, and RFC 7239 ``Forwarded``.
Anyone can send those headers, so a client's own copies are believed only
when the client is a proxy the operator listed in ``trusted_proxies``:

* trusted: the chain is kept and extended. ``X-Forwarded-For`` becomes
  "<theirs>, <client_ip>" (several incoming headers are joined in order, RFC
  9110 §5.3), ``X-Forwarded-Proto`` and ``-Host`` are passed on as received
  (ours only when they sent none), and ``Forwarded`` gets our element
  appended: "<theirs>, for=...;host=...;proto=..." (RFC 7239 §4, §7.1);
* not trusted: all four are replaced by what wsproxy saw, exactly as
  ``upstream_handshake.forwarding_headers`` builds them.

Which address is checked: ``client_ip``, the address wsproxy attributes the
request to, that is the sender of the HTTP request. Without PROXY protocol
that is the TCP peer; with it, it is the source the PROXY header carried (the
L4 balancer only relays bytes and adds no HTTP headers, so trusting the
balancer's own address would mean believing whatever its clients send). The
same address is the one appended to the chain. ``peer_ip``, the TCP peer, is
accepted so call sites can state both, and is deliberately not consulted.
An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is checked as its IPv4 form.

This module builds header lists; it does not parse the chain to find the
"real" client (that needs a policy about how many hops to believe), and it
does not validate what a trusted proxy sent beyond h11's header grammar.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TypeAlias

from .handshake import FORWARDING_HEADERS
from .upstream_handshake import forwarding_headers

__all__ = ["Network", "forwarding", "is_trusted", "parse_trusted"]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What the client's header list loses in both cases: the four, and their
#: underscore spellings, which CGI-style backends read as the same header.
DROPPED_HEADERS = frozenset(FORWARDING_HEADERS | {name.replace(b"-", b"_") for name in FORWARDING_HEADERS})


def parse_trusted(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` from the config: CIDRs ("10.0.0.0/8") or single addresses.

    ValueError names the entry and what is wrong with it.
    """
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError as exc:
            if "has host bits set" in str(exc):
                loose = ipaddress.ip_network(cidr, strict=False)
                raise ValueError(f'trusted proxy network {cidr!r} has host bits set; did you mean "{loose}"?') from None
            raise ValueError(
                f'expected an IP address or network like "10.0.0.0/8" or "2001:db8::/32", got {cidr!r}'
            ) from None
    return tuple(networks)


def is_trusted(ip: str, trusted: Sequence[Network]) -> bool:
    """Is the address ``ip`` inside one of the ``trusted`` networks? Not an IP address: no."""
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def forwarding(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    peer_ip: str | None = None,
    client_ip: str,
    client_port: int,
    host_header: bytes,
    tls: bool,
    trusted: Sequence[Network],
) -> tuple[list[tuple[bytes, bytes]], set[bytes]]:
    """The forwarding headers for the backend, and the client header names to drop.

    ``headers`` are the client's request headers as h11 gives them (lower-case
    names); ``host_header`` its Host value; ``tls`` whether it came over TLS.
    Returns ``(add, drop)``: ``drop`` holds lower-case names to remove from the
    client's headers (always all forwarding headers, since ``add`` carries the
    ones kept), ``add`` the headers to append, in the order
    X-Forwarded-For, -Proto, -Host, Forwarded. See the module docstring for
    which address is checked against ``trusted``.
    """
    del peer_ip  # see the module docstring: the trust check is on client_ip
    ours = forwarding_headers(client_ip, client_port, host_header, tls=tls)
    drop = set(DROPPED_HEADERS)
    if not is_trusted(client_ip, trusted):
        return ours, drop
    ours_by_name = {name.lower(): value for name, value in ours}
    theirs: dict[bytes, list[bytes]] = {name: [] for name in FORWARDING_HEADERS}
    for name, value in headers:
        if name in theirs:
            theirs[name].append(value)
    add: list[tuple[bytes, bytes]] = []
    chain = [v.strip() for v in theirs[b"x-forwarded-for"] if v.strip()]
    add.append((b"X-Forwarded-For", b", ".join([*chain, ours_by_name[b"x-forwarded-for"]])))
    for name, spelled in ((b"x-forwarded-proto", b"X-Forwarded-Proto"), (b"x-forwarded-host", b"X-Forwarded-Host")):
        kept = theirs[name] or [ours_by_name[name]]
        add.extend((spelled, value) for value in kept)
    elements = [v.strip() for v in theirs[b"forwarded"] if v.strip()]
    add.append((b"Forwarded", b", ".join([*elements, ours_by_name[b"forwarded"]])))
    return add, drop
