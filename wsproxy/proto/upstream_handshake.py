"""The RFC 6455 opening handshake on the backend's hop, as plain functions. No I/O here.

Upstream (proxy → backend)::

    upstream_request(upgrade, ...)       the request the backend sees (hop-by-hop headers out,
                                         X-Forwarded-* and Forwarded in)
    encode_request(target, headers)      its bytes (the fast path; h11 writes it when the
                                         answer needs h11)
    parse_response_head(head)            the backend's answer head, or None for h11 to read
    check_upstream_response(resp, up)    §4.1 validation of the backend's 101 → Accepted | Rejection

The client's hop (``check_upgrade``), the types both hops share (``Upgrade``,
``Accepted``) and the client's 101 are ``proto.handshake``'s. Compiled with mypyc
beside it (``wsproxy._mypyc``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import h11

from .handshake import (
    ESSENTIAL_PREFIXES,
    FORWARDING_HEADERS,
    FRAMING_HEADERS,
    HEADER_LINE,
    HOP_BY_HOP,
    Accepted,
    Upgrade,
    accept_key,
    extension_names,
    header_tokens,
    raw_tokens,
)
from .rejection import Rejection


def forwarding_headers(
    client_ip: str, client_port: int, host_header: bytes, *, tls: bool
) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For/-Proto/-Host and RFC 7239 Forwarded for the backend."""
    proto = b"https" if tls else b"http"
    ip = client_ip.encode("ascii")
    node = b'"[' + ip + b']"' if b":" in ip else ip
    host = host_header.replace(b'"', b"")
    return [
        (b"X-Forwarded-For", ip),
        (b"X-Forwarded-Proto", proto),
        (b"X-Forwarded-Host", host_header),
        (b"Forwarded", b"for=" + node + b';host="' + host + b'";proto=' + proto),
    ]


#: Client headers named X-Auth-Claim-* never pass (also spelled with "_"): only the gate sets them.
CLAIM_HEADER_PREFIX = b"x-auth-claim-"


def upstream_request(
    upgrade: Upgrade,
    extra_headers: Sequence[tuple[bytes, bytes]],
    *,
    target: bytes | None = None,
    client_headers: Sequence[tuple[bytes, bytes]] | None = None,
    drop: frozenset[bytes] | set[bytes] = frozenset(),
    strip: frozenset[bytes] | set[bytes] = frozenset(),
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The target and headers of the upgrade request for the backend.

    The client's headers pass in their order and spelling, minus hop-by-hop
    ones (and those its Connection header names, except Host and
    Sec-WebSocket-*, which the handshake needs), minus forwarding headers,
    ``X-Auth-Claim-*`` and the names in ``strip`` (lower case with "-";
    each also spelled with "_", which CGI-style backends read as the same
    header), and minus the lower-case names in ``drop``;
    ``extra_headers`` (forwarding and identity headers) follow. The Host
    header carries the normalised host (``upgrade.authority``). The client's
    Sec-WebSocket-Key is kept, so the backend's Sec-WebSocket-Accept is the
    one the client expects. The target is the normalised one
    (``upgrade.target``); ``target`` and ``client_headers`` replace it and
    the request's headers when the gate rewrote them (a credential taken out
    of the query or the headers).
    """
    request = upgrade.request
    named: set[bytes] = set()
    for name, value in request.headers:
        if name == b"connection":
            named.update(t for t in header_tokens(value) if not t.startswith(ESSENTIAL_PREFIXES))
    headers = []
    for raw_name, value in client_headers if client_headers is not None else request.headers.raw_items():
        name = raw_name.lower()
        if name in HOP_BY_HOP or name in named or name in drop:
            continue
        canonical = name.replace(b"_", b"-")
        if canonical in FORWARDING_HEADERS or canonical in strip or canonical.startswith(CLAIM_HEADER_PREFIX):
            continue
        if name == b"host":
            value = upgrade.authority
        headers.append((raw_name, value))
    headers += [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    headers += extra_headers
    return (target if target is not None else upgrade.target), headers


def encode_request(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes of a GET request with ``headers``.

    Every name and value here came through h11's validation of the client's
    request, or is the proxy's own, so they are written as they are.
    """
    lines = [b"GET ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9])(?: [\t -~\x80-\xff]*)?")


#: The log reason of a 101 that carries message framing (RFC 9112 §6.1/§6.2, RFC 9110 §8.6).
FRAMING_IN_101 = "backend answered 101 with Transfer-Encoding/Content-Length"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A backend's status line and headers, as ``parse_response_head`` found them."""

    status_code: int
    raw_headers: tuple[tuple[bytes, bytes], ...]


def parse_response_head(head: bytes) -> ResponseHead | None:
    """Parse a response head (up to and including the blank line), strictly.

    This is the fast path for the one answer that matters, the 101: RFC 7230
    §3 grammar, HTTP/1.1 only, CRLF line endings, no obsolete line folding.
    Returns None for anything it does not accept; the caller then lets h11
    parse the response (to relay a refusal as it was, or to report why it is
    not HTTP).
    """
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        return None
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        return None
    headers = []
    for line in lines[1:-2]:
        header = HEADER_LINE.fullmatch(line)
        if header is None:
            return None
        if header[1].lower() in FRAMING_HEADERS:
            return None  # message framing is h11's to judge (a 101 with it is refused either way)
        headers.append((header[1], header[2]))
    return ResponseHead(int(match[1]), tuple(headers))




def check_upstream_response(
    response: h11.InformationalResponse | ResponseHead, upgrade: Upgrade
) -> Accepted | Rejection:
    """RFC 6455 §4.1: does the backend's 101 complete the client's handshake?

    Success needs ``Upgrade: websocket``, ``Connection: upgrade``, the right
    Sec-WebSocket-Accept, a subprotocol the client offered (or none) and only
    extensions the client offered, and no message framing: RFC 9110 §8.6 and
    RFC 9112 §6.1/§6.2 forbid ``Content-Length`` and ``Transfer-Encoding`` in a
    1xx response (h11 refuses the conflicting or non-chunked shapes; this check
    refuses them all, so the fast path and h11 agree and none reaches the
    client). Anything else is the backend's fault: 502.
    """
    if response.status_code != 101:
        return Rejection(502, f"backend answered {response.status_code} where 101 was expected")
    by_name: dict[bytes, list[bytes]] = {}
    passed: list[tuple[bytes, bytes]] = []
    items = response.raw_headers if isinstance(response, ResponseHead) else response.headers.raw_items()
    for raw_name, value in items:
        name = raw_name.lower()
        by_name.setdefault(name, []).append(value)
        if name not in HOP_BY_HOP and name != b"sec-websocket-accept":
            passed.append((raw_name, value))
    if b"transfer-encoding" in by_name or b"content-length" in by_name:
        return Rejection(502, FRAMING_IN_101)
    if not any(b"websocket" in header_tokens(v) for v in by_name.get(b"upgrade", [])):
        return Rejection(502, "backend's 101 lacks \"Upgrade: websocket\"")
    if not any(b"upgrade" in header_tokens(v) for v in by_name.get(b"connection", [])):
        return Rejection(502, "backend's 101 lacks \"Connection: upgrade\"")
    expected = accept_key(upgrade.key)
    accepts = by_name.get(b"sec-websocket-accept", [])
    if accepts != [expected]:
        seen = b", ".join(accepts).decode("latin-1") or "none"
        return Rejection(502, f"backend's Sec-WebSocket-Accept is wrong: {seen}")
    protocols = [t.decode("latin-1") for v in by_name.get(b"sec-websocket-protocol", []) for t in raw_tokens(v)]
    if len(protocols) > 1 or (protocols and protocols[0] not in upgrade.subprotocols):
        return Rejection(502, f"backend chose a subprotocol the client did not offer: {', '.join(protocols)}")
    extensions = extension_names(by_name.get(b"sec-websocket-extensions", []))
    if not extensions <= upgrade.extensions:
        unknown = ", ".join(sorted(extensions - upgrade.extensions))
        return Rejection(502, f"backend chose extensions the client did not offer: {unknown}")
    return Accepted(
        headers=tuple(passed),
        accept=expected,
        subprotocol=protocols[0] if protocols else None,
        extensions=extensions,
    )
