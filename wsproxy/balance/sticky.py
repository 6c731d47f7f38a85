"""Session affinity: sticky keys and signed pin cookies. No I/O here.

Two kinds of stickiness, both without state shared between instances:

- A *key* (``header:NAME``, ``query:NAME``, ``ip``, ``claim:NAME``, ``identity``) is read from
  the request by ``sticky_key`` and hashed onto the pool by
  ``policy.rendezvous_order``: the same key lands on the same backend on every
  instance with the same config, and comes back to its backend when that
  backend recovers.
- A *cookie* (``cookie:NAME``) pins a client to the backend named in it. The
  value is opaque: ``base64url(HMAC-SHA256(secret, pool, address))`` truncated
  to 128 bits (22 characters). It does not reveal the backend address; to read
  it, ``pinned_backend`` recomputes the value for each backend of the pool and
  compares in constant time. A forged value, one from another pool or one
  signed with another secret matches nothing and is ignored.

This module only parses and formats; which backend a session goes to is
decided by ``balance.plan``. It does not parse JWTs either: claims come in
already verified, from the auth stage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
from collections.abc import Mapping, Sequence
from urllib.parse import unquote_to_bytes

from ..config.schema import Address, BackendConfig, StickyConfig, StickyCookieConfig

__all__ = ["cookie_value", "pinned_backend", "request_cookie", "set_cookie", "sticky_key"]

#: Bytes of the HMAC kept in the cookie: 128 bits, 22 base64url characters.
COOKIE_MAC_BYTES = 16
#: Domain separation: a MAC made for something else with the same secret never verifies here.
_COOKIE_CONTEXT = b"wsproxy sticky v1\x00"


def cookie_value(secret: bytes, pool: str, address: Address) -> str:
    """The pin cookie value for ``address`` in ``pool``: opaque, signed, the same on every instance."""
    message = _COOKIE_CONTEXT + pool.encode() + b"\x00" + str(address).encode()
    mac = hmac.new(secret, message, hashlib.sha256).digest()[:COOKIE_MAC_BYTES]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def pinned_backend(value: str, secret: bytes, pool: str, backends: Sequence[BackendConfig]) -> BackendConfig | None:
    """The backend of ``pool`` that ``value`` pins to, or None if it pins to none of them.

    Every backend is compared (no early exit), each in constant time, so the
    time taken does not tell a forger how close a guess was.
    """
    given = value.encode("ascii", "replace")
    found: BackendConfig | None = None
    for backend in backends:
        expected = cookie_value(secret, pool, backend.address).encode("ascii")
        if hmac.compare_digest(expected, given) and found is None:
            found = backend
    return found


def set_cookie(name: str, value: str, cookie: StickyCookieConfig, *, secure: bool) -> bytes:
    """A ``Set-Cookie`` header value for the 101 response (RFC 6265 §4.1)."""
    # RFC 6265 §4.1.1: Max-Age is a positive integer here; 0 would delete the cookie.
    max_age_s = max(1, math.ceil(cookie.max_age_s))
    attributes = [f"{name}={value}", "Path=/", f"Max-Age={max_age_s}", "HttpOnly"]
    if secure:
        attributes.append("Secure")
    attributes.append(f"SameSite={cookie.same_site}")
    return "; ".join(attributes).encode("ascii")


def request_cookie(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers, or None.

    ``headers`` have lower-case names, as h11 gives them. RFC 6265 §5.4 puts the
    most specific cookie first, so the first occurrence wins. Double quotes
    around a value are removed (§4.1.1 allows them).
    """
    wanted = name.encode("latin-1", "replace")
    for header, header_value in headers:
        if header != b"cookie":
            continue
        for pair in header_value.split(b";"):
            cookie_name, eq, cookie_value_ = pair.partition(b"=")
            if not eq or cookie_name.strip() != wanted:
                continue
            found = cookie_value_.strip()
            if len(found) >= 2 and found.startswith(b'"') and found.endswith(b'"'):
                found = found[1:-1]
            return found.decode("latin-1")
    return None


def sticky_key(
    sticky: StickyConfig,
    *,
    headers: Sequence[tuple[bytes, bytes]],
    target: bytes,
    client_ip: str,
    claims: Mapping[str, object] | None,
    identity: str | None = None,
) -> bytes | None:
    """The key that ``sticky`` reads from this request, or None when the request has none.

    An empty value counts as absent: hashing it would pin every client that
    lacks the key to one backend. The ``cookie`` source has no key (the cookie
    is a pin, see ``pinned_backend``), so it returns None.
    """
    source = sticky.source
    if source == "header":
        return _header(headers, sticky.name)
    if source == "query":
        return _query_parameter(target, sticky.name)
    if source == "ip":
        return _client_ip(client_ip)
    if source == "claim":
        return _claim(claims, sticky.name)
    if source == "identity":  # the gate's: a token name, a JWT's identity claim, forward auth's, a certificate's
        return identity.encode("utf-8") if identity else None
    return None


def _header(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    """Every field line of ``name``, joined with commas (RFC 9110 §5.3), or None."""
    wanted = name.lower().encode("latin-1", "replace")
    values = [value.strip() for header, value in headers if header == wanted]
    joined = b",".join(values)
    return joined or None


def _query_parameter(target: bytes, name: str) -> bytes | None:
    """The first value of query parameter ``name`` in the request target, percent-decoded.

    Names and values are decoded as ``application/x-www-form-urlencoded``
    (``+`` is a space), as browsers encode query strings; the name is compared
    after decoding, so ``room%5Fid`` matches ``room_id``.
    """
    path, question, query = target.partition(b"?")
    if not question:
        return None
    query = query.partition(b"#")[0]
    wanted = name.encode()
    for field in query.split(b"&"):
        raw_name, _, raw_value = field.partition(b"=")
        if unquote_to_bytes(raw_name.replace(b"+", b" ")) == wanted:
            return unquote_to_bytes(raw_value.replace(b"+", b" ")) or None
    return None


def _client_ip(client_ip: str) -> bytes | None:
    """The client address in canonical form; an IPv4-mapped IPv6 address counts as the IPv4 one."""
    if not client_ip:
        return None
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip.encode()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped).encode()
    return str(address).encode()


def _claim(claims: Mapping[str, object] | None, name: str) -> bytes | None:
    """A string (or integer) claim, or None if it is missing, empty or of another type."""
    if claims is None:
        return None
    value = claims.get(name)
    if isinstance(value, bool):  # bool is an int, but True is no identity
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and value:
        return value.encode()
    return None
