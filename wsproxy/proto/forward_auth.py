"""Forward authentication's settings, checked without I/O: the auth service's URL and header names.

``parse_url`` splits ``forward.url`` into host, port and request target;
``host_header`` is the subrequest's Host for them; ``check_header_names``
refuses ``send_headers``, ``copy_headers``, ``identity_from`` and
``lifetime_from`` that are not header names or that name headers the proxy
sets itself. The config loader calls them to report a bad value at its
position (``config.gate``), and ``edge.forward_auth`` to set up a route's
checks; both raise ``ValueError`` with a message that says what was wrong.

What this is not: the subrequest, the verdicts and the cache (``edge.forward_auth``).
No trio, no I/O here.
"""

from __future__ import annotations

import ipaddress
import re

from ..config.schema import ForwardAuthConfig
from .handshake import FORWARDING_HEADERS, HOP_BY_HOP

__all__ = ["check_header_names", "host_header", "parse_url"]


#: Headers the subrequest sets itself: ``send_headers`` may not name them.
_OWN_SUBREQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"x-forwarded-method", b"x-forwarded-uri"}
) | FORWARDING_HEADERS | HOP_BY_HOP

#: Headers the upstream handshake owns: ``copy_headers`` may not name them.
_OWN_UPSTREAM_HEADERS = frozenset({b"host", b"content-length"}) | FORWARDING_HEADERS | HOP_BY_HOP

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 7230 §3.2.6
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_url(url: str) -> tuple[str, int, bytes]:
    """Split the auth service's URL into host, port and request target.

    ``http://auth.internal:9100/check?scope=ws`` → ``("auth.internal", 9100,
    b"/check?scope=ws")``. The host is an IP literal (IPv6 in brackets, returned
    without them) or a DNS name, lower case; the port defaults to 80; the target
    defaults to ``/``. Only ``http://`` is accepted: ``https://`` to the auth
    service is a later addition.

    Raises ``ValueError`` with a message that says what was wrong, for the
    config loader to report with the file position.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f'expected an "http://host[:port]/path" URL, got {url!r}')
    if scheme.lower() == "https":
        raise ValueError(f"https:// auth services are not supported yet (only http://), got {url!r}")
    if scheme.lower() != "http":
        raise ValueError(f"unsupported URL scheme {scheme!r} (only http://), got {url!r}")
    if "#" in rest:
        raise ValueError(f"a URL fragment is never sent to a server; remove it from {url!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    if "@" in authority:
        raise ValueError(f"credentials in the URL are not supported (use send_headers), got {url!r}")
    host, port = _split_authority(authority, url)
    if not target or target.startswith("?"):
        target = "/" + target
    for char in target:
        if not "!" <= char <= "~":
            raise ValueError(f"character {char!r} is not allowed in the URL's path or query (percent-encode it), got {url!r}")
    return host, port, target.encode("ascii")


def _split_authority(authority: str, url: str) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f'unclosed "[" in the URL\'s host, got {url!r}')
        host, port_part = authority[1:end], authority[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r} in the URL {url!r}") from None
        if port_part and not port_part.startswith(":"):
            raise ValueError(f'expected ":port" after "]" in the URL, got {url!r}')
        port_text = port_part[1:] if port_part else None
    else:
        if authority.count(":") > 1:
            raise ValueError(f"an IPv6 address in a URL needs brackets, as in http://[::1]:9100/, got {url!r}")
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
        if not host:
            raise ValueError(f"no host in the URL {url!r}")
        name = host[:-1] if host.endswith(".") else host
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
            raise ValueError(f"invalid host name {host!r} in the URL {url!r}")
        host = name
    port = 80
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"invalid port {port_text!r} in the URL {url!r}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535 in the URL {url!r}")
    return host.lower(), port


def host_header(host: str, port: int) -> bytes:
    """The Host header for ``host:port`` (RFC 7230 §5.4; the port only when not 80)."""
    name = f"[{host}]" if ":" in host else host
    return (name if port == 80 else f"{name}:{port}").encode("ascii")


def check_header_names(config: ForwardAuthConfig) -> None:
    """Refuse ``send_headers`` and ``copy_headers`` that are not header names or
    that name headers the proxy sets itself (Host, Connection, X-Forwarded-*, ...).

    Copying ``Sec-WebSocket-*`` from the auth service would break the
    upstream handshake, so those are refused too. Raises ``ValueError``.
    """
    if config.identity_from is not None and not _TOKEN.fullmatch(config.identity_from):
        raise ValueError(f"identity_from: {config.identity_from!r} is not a header name")
    for field_name, names, reserved in (
        ("send_headers", config.send_headers, _OWN_SUBREQUEST_HEADERS),
        ("copy_headers", config.copy_headers, _OWN_UPSTREAM_HEADERS),
    ):
        for name in names:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{field_name}: {name!r} is not a header name")
            lower = name.lower().encode("ascii")
            if lower in reserved or lower.replace(b"_", b"-") in reserved:
                raise ValueError(f"{field_name}: {name} is set by the proxy and cannot be forwarded")
            if field_name == "copy_headers" and lower.startswith(b"sec-websocket-"):
                raise ValueError(f"{field_name}: {name} belongs to the WebSocket handshake")
    if config.lifetime_from is not None and not _TOKEN.fullmatch(config.lifetime_from):
        raise ValueError(f"lifetime_from: {config.lifetime_from!r} is not a header name")
