"""The RFC 6455 opening handshake on the client's hop, as plain functions. No I/O here.

Downstream (client → proxy)::

    check_raw_head(head)        request-smuggling shapes h11 would normalise away,
                                control characters h11 lets through
    h11_reason(exc)             a fixed text for h11's error (its own quotes the line)
    check_upgrade(request)      §4.2.1 validation of the h11.Request → Upgrade | Rejection,
                                with the target and Host normalised (``proto.target``)

Both hops::

    choose_subprotocols(offer, ...)      the route's subprotocol policy: the offer that goes
                                         upstream, or 400 (``with_subprotocols`` writes it)
    downstream_101(accepted)             the bytes of the client's 101, from what the backend
                                         accepted (``proto.upstream_handshake`` checks its 101)

and ``http_error(rejection)`` for every refusal. Each verdict already carries
the reaction (status, reason for the log, extra headers), as h11's
``error_status_hint`` does. A request-side reason never quotes a header value
or the request target (a credential can be in either): it names what was
wrong, not what was sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import h11

from . import target as _target
from .rejection import Rejection as Rejection  # re-exported: most callers import it from here

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: RFC 7230 §6.1 hop-by-hop headers, plus the ones a proxy must not pass on.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Headers the proxy sets itself towards the backend; a client's copies are dropped
#: (trusted_proxies, which would keep them, comes with the gate), and so are
#: look-alikes spelled with underscores, which CGI-style backends read as the same.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

#: Client headers removed on every route unless ``strip_headers_default: false``:
#: claims a backend or its framework may believe about the client or the URL,
#: which only a proxy should make (lower case, "-" spelling; "_" spellings go too).
#: X-Forwarded-For/-Proto/-Host and Forwarded are not here: the proxy always
#: replaces them, or appends to them for ``trusted_proxies`` (``proto.forwarded``).
DEFAULT_STRIP_HEADERS = frozenset(
    {
        # the client's address, as other proxies and CDNs name it
        b"x-real-ip",  # nginx (realip module), read by many frameworks
        b"x-client-ip",  # Apache mod_remoteip setups, request-ip libraries
        b"true-client-ip",  # Akamai, Cloudflare Enterprise
        b"cf-connecting-ip",  # Cloudflare
        b"fastly-client-ip",  # Fastly
        b"x-cluster-client-ip",  # Rackspace and Riverbed balancers
        b"forwarded-for",  # non-standard spelling of X-Forwarded-For some libraries read
        b"x-forwarded",  # non-standard spelling of Forwarded some libraries read
        b"x-original-forwarded-for",  # ingress-nginx keeps the client's X-Forwarded-For there
        # the scheme and port the client used (frameworks decide "secure" and build redirects from them)
        b"x-forwarded-port",
        b"x-forwarded-ssl",  # "on" = https (Rack, Django setups)
        b"x-forwarded-scheme",
        b"front-end-https",  # Microsoft's "on" = https
        b"x-url-scheme",
        # the host, prefix or URL the request "really" had: overrides the path the gate routed on
        b"x-forwarded-prefix",  # Spring, ASP.NET PathBase
        b"x-forwarded-server",  # Apache mod_proxy's host name
        b"x-original-url",  # IIS URL Rewrite, Symfony, Zend
        b"x-rewrite-url",  # IIS ISAPI Rewrite, Symfony, Zend
        b"x-original-uri",  # nginx auth_request convention
        b"x-original-host",  # ASP.NET forwarded-headers middleware
    }
)

#: Headers the handshake needs end to end: a client's Connection header cannot remove them.
ESSENTIAL_PREFIXES = (b"host", b"sec-websocket-")

REASONS = {
    101: b"Switching Protocols",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    426: b"Upgrade Required",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A valid WebSocket upgrade request, ready to be routed."""

    request: h11.Request | RequestHead  # what the client sent (h11's, or the fast path's)
    host: str  # lower case, without the port and a trailing dot (proto.target.normalise_host)
    path: str  # the normalised path (proto.target), without the query; what routing matches
    key: bytes  # Sec-WebSocket-Key as sent
    target: bytes  # the normalised target, query as sent: what goes upstream
    authority: bytes  # the Host header as it goes upstream: the normalised host and the port as sent
    subprotocols: tuple[str, ...] = ()  # offered, in order
    extensions: frozenset[str] = frozenset()  # names of the offered extensions


@dataclass(frozen=True, slots=True)
class Accepted:
    """The backend accepted the upgrade; what was negotiated end to end."""

    headers: tuple[tuple[bytes, bytes], ...]  # the backend's end-to-end headers, for the client's 101
    accept: bytes
    subprotocol: str | None = None
    extensions: frozenset[str] = field(default_factory=frozenset)


def accept_key(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def header_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def extension_names(values: list[bytes]) -> frozenset[str]:
    names = set()
    for value in values:
        for offer in value.split(b","):
            name = offer.split(b";", 1)[0].strip().lower()
            if name:
                names.add(name.decode("latin-1"))
    return frozenset(names)


#: Any byte below 0x20 but HTAB, CR and LF, or DEL (CR and LF are checked as line endings).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_TABLE = bytes(0 if _CONTROL.fullmatch(bytes([b])) else 1 for b in range(256))


def check_raw_head(head: bytes) -> Rejection | None:
    """Refuse header blocks whose meaning h11 would quietly normalise.

    ``head`` is the request line and headers up to and including the blank
    line. These shapes are how request smuggling starts (RFC 7230 §3.2.4,
    §3.3.3): obsolete line folding, bare LF line endings, Content-Length twice,
    Content-Length together with Transfer-Encoding. And control characters
    (RFC 9110 §5.5: a field value is VCHAR, obs-text, SP and HTAB): h11 lets
    through every one but NUL, CR, LF, VT and FF, and a backend may cut a
    value at one or log it raw.
    """
    if 0 in head.translate(_CONTROL_TABLE):  # one pass in C; the regex only to say where
        control = _CONTROL.search(head)
        where = "the request line" if control is not None and control.start() < head.find(b"\r\n") else "a header"
        return Rejection(400, f"control character in {where}")
    if b"\r\n " in head or b"\r\n\t" in head:
        return Rejection(400, "obsolete line folding in the request headers")
    if head.count(b"\n") != head.count(b"\r\n"):
        return Rejection(400, "bare LF line ending in the request")
    lower = head.lower()
    content_lengths = lower.count(b"\r\ncontent-length:")
    if content_lengths > 1:
        return Rejection(400, "more than one Content-Length header")
    if b"\r\ntransfer-encoding:" in lower:
        if content_lengths:
            return Rejection(400, "both Content-Length and Transfer-Encoding")
        return Rejection(400, "a body on the upgrade request (Transfer-Encoding)")
    return None


#: h11's messages quote the offending line (and so any credential in it): each
#: known one, by its start, gets a fixed text; the rest "malformed request".
_H11_REASONS = (
    ("illegal request line", "malformed request line"),
    ("no request line", "malformed request line"),
    ("illegal header line", "malformed header line"),
    ("continuation line", "malformed header line"),
    ("illegal header", "malformed header line"),
    ("conflicting content-length", "conflicting Content-Length headers"),
    ("bad content-length", "malformed Content-Length header"),
    ("multiple transfer-encoding", "more than one Transfer-Encoding header"),
    ("only transfer-encoding", "unsupported Transfer-Encoding"),
    ("missing mandatory host", "no Host header"),
    ("found multiple host", "more than one Host header"),
)


def h11_reason(exc: h11.ProtocolError) -> str:
    """A fixed reason for h11's error: never its message, which may quote the request."""
    message = str(exc).lower()
    for start, reason in _H11_REASONS:
        if message.startswith(start):
            return reason
    return "malformed request"


class HeaderList:
    """Request headers as the fast path read them; iterates like h11's ``Headers``.

    Iteration gives (lower-case name, value) pairs, ``raw_items`` the names
    as sent; values have no surrounding whitespace (RFC 9110 §5.5, as h11).
    """

    __slots__ = ("_raw", "_lowered")

    def __init__(self, raw: list[tuple[bytes, bytes]], lowered: list[tuple[bytes, bytes]] | None = None) -> None:
        self._raw = raw
        #: the pairs with lower-case names, made once (the parser has them): every check iterates them
        self._lowered = lowered if lowered is not None else [(name.lower(), value) for name, value in raw]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._lowered)

    def __len__(self) -> int:
        return len(self._raw)

    def raw_items(self) -> list[tuple[bytes, bytes]]:
        return list(self._raw)


class RequestHead:
    """A request head that the fast path parsed: what the checks read of an ``h11.Request``."""

    __slots__ = ("method", "target", "http_version", "headers", "by_name")

    def __init__(
        self,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        lowered: list[tuple[bytes, bytes]] | None = None,
        by_name: dict[bytes, list[bytes]] | None = None,
    ) -> None:
        self.method = b"GET"  # the fast path takes nothing else
        self.target = target
        self.http_version = b"1.1"
        self.headers = HeaderList(headers, lowered)
        #: the values of each lower-case name, in order (``check_upgrade``'s view), when the parser made it
        self.by_name = by_name


#: The only request line the fast path takes: GET, an origin-form target of visible ASCII, HTTP/1.1.
_REQUEST_LINE = re.compile(rb"GET (/[!-~]*) HTTP/1\.1")
#: A header field line (RFC 9112 §5.1) of a request or response head, as the fast parsers read it.
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[!-~\x80-\xff](?:[\t -~\x80-\xff]*[!-~\x80-\xff])?)?)[ \t]*")

#: Headers that frame a message body (RFC 9112 §6): the fast path leaves them to h11, so the two
#: never disagree on a malformed one (found by fuzz/fuzz_handshake.py, h11 as the oracle).
FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding"))


def parse_request_head(head: bytes) -> RequestHead | None:
    """The client's request head, parsed without h11 when it has the one common shape.

    ``head`` has passed ``check_raw_head`` (CRLF only, no folding, no
    control characters). Returns None for anything else (another method or
    version, an unusual target, a header line outside RFC 9110's grammar, no
    or two Host, Content-Length or Transfer-Encoding): h11 then parses it and gives
    the precise verdict. A differential test holds both paths to the same
    verdicts.
    """
    lines = head.split(b"\r\n")
    if len(lines) < 4 or lines[-1] or lines[-2]:
        return None
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return None
    headers = []
    lowered = []
    by_name: dict[bytes, list[bytes]] = {}
    for line in lines[1:-2]:
        header = HEADER_LINE.fullmatch(line)
        if header is None:
            return None
        raw_name, value = header[1], header[2]
        name = raw_name.lower()
        values = by_name.get(name)
        if values is None:
            by_name[name] = [value]
        elif name == b"host":
            return None  # two Host headers: h11 words that refusal
        else:
            values.append(value)
        if name in FRAMING_HEADERS:
            return None  # a body on an upgrade: h11 and check_upgrade say how it is wrong
        headers.append((raw_name, value))
        lowered.append((name, value))
    if b"host" not in by_name:
        return None  # h11 words that refusal
    return RequestHead(match[1], headers, lowered, by_name)


def _headers_by_name(request: h11.Request | RequestHead) -> dict[bytes, list[bytes]]:
    if isinstance(request, RequestHead) and request.by_name is not None:
        return request.by_name  # (read only)
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        by_name.setdefault(name, []).append(value)
    return by_name


def _upgrade_required(reason: str) -> Rejection:
    return Rejection(
        426, reason, ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Version", b"13"))
    )


def check_upgrade(request: h11.Request | RequestHead) -> Upgrade | Rejection:
    """RFC 6455 §4.2.1: is this a WebSocket upgrade we may pass on?

    A plain HTTP request (no ``Upgrade: websocket``) gets 426; a broken
    upgrade gets 400; a version other than 13 gets 426 with
    ``Sec-WebSocket-Version: 13`` (§4.4). The target and the Host are
    normalised (``proto.target``); one that cannot be is 400.
    """
    headers = _headers_by_name(request)
    upgrade = headers.get(b"upgrade", [])
    if not any(b"websocket" in header_tokens(v) for v in upgrade):
        return _upgrade_required(f"not a WebSocket upgrade (Upgrade: {'other than websocket' if upgrade else 'none'})")
    if request.method != b"GET":
        method = request.method.decode("latin-1") if request.method in _METHODS else "other"
        return Rejection(400, f"WebSocket upgrade with method {method}")
    if request.http_version != b"1.1":
        return Rejection(400, f"WebSocket upgrade over HTTP/{request.http_version.decode('latin-1')}")
    if b"transfer-encoding" in headers:
        return Rejection(400, "a body on the upgrade request (Transfer-Encoding)")
    for value in headers.get(b"content-length", []):
        if value.strip() != b"0":
            return Rejection(400, "a body on the upgrade request (Content-Length)")
    hosts = headers.get(b"host", [])
    if len(hosts) != 1 or not hosts[0]:
        return Rejection(400, f"expected one Host header, got {len(hosts)}")
    authority = _authority(hosts[0])
    if authority is None:
        return Rejection(400, "invalid Host header")
    host, authority_bytes = authority
    if not any(b"upgrade" in header_tokens(v) for v in headers.get(b"connection", [])):
        return Rejection(400, "Connection header does not contain \"upgrade\"")
    versions = headers.get(b"sec-websocket-version", [])
    if versions != [b"13"]:
        if len(versions) == 1 and versions[0].isdigit() and len(versions[0]) <= 3:
            shown = versions[0].decode("ascii")  # a version number is no secret; anything else is not shown
        else:
            shown = "none" if not versions else ("not a number" if len(versions) == 1 else f"{len(versions)} headers")
        return _upgrade_required(f"unsupported Sec-WebSocket-Version: {shown}")
    keys = headers.get(b"sec-websocket-key", [])
    if len(keys) != 1:
        return Rejection(400, f"expected one Sec-WebSocket-Key header, got {len(keys)}")
    key = keys[0].strip()
    try:
        raw = binascii.a2b_base64(key, strict_mode=True)  # base64.b64decode(validate=True)'s verdicts, without its regex
    except binascii.Error:
        raw = b""
    if len(raw) != 16:
        return Rejection(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    if not request.target.startswith(b"/"):
        form = "an absolute URI" if b"://" in request.target else "another form"
        return Rejection(400, f"request target must be a path (origin-form), got {form}")
    target = _target.normalise_target(request.target)
    if isinstance(target, Rejection):
        return target
    path = target.split(b"?", 1)[0].decode("ascii")  # normal form is ASCII
    subprotocols = tuple(
        t.decode("latin-1") for v in headers.get(b"sec-websocket-protocol", []) for t in raw_tokens(v)
    )
    return Upgrade(
        request=request,
        host=host,
        path=path,
        key=key,
        target=target,
        authority=authority_bytes,
        subprotocols=subprotocols,
        extensions=extension_names(headers.get(b"sec-websocket-extensions", [])),
    )


#: Methods a refusal may name; any other token is "other" (it came from the client).
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH", b"PRI"})


def raw_tokens(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.split(b",") if t.strip()]


#: A Host header already in normal form: lower-case name (no empty label, no trailing dot), optional port.
_PLAIN_HOST = re.compile(rb"([a-z0-9\-_~]+(?:\.[a-z0-9\-_~]+)*)(?::[0-9]+)?")


def _authority(value: bytes) -> tuple[str, bytes] | None:
    """The normalised host of a Host header, and the header as it goes upstream; None when malformed.

    The host is lower case without one trailing dot (``proto.target.normalise_host``);
    the port, when there is one, stays as sent.
    """
    plain = _PLAIN_HOST.fullmatch(value)
    if plain is not None:  # the common case: already lower case, no trailing dot
        return plain[1].decode("ascii"), value
    # Only HTTP's own whitespace (RFC 9110 §5.6.3: SP, HTAB) is optional around a value;
    # str.strip() would also take NBSP (0xA0) and other Latin-1 spaces away (found by fuzzing).
    text = value.strip(b" \t").decode("latin-1")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end].lower(), text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        shown = f"[{host}]"
    else:
        name, sep, port = text.partition(":")
        rest = sep + port
        normal = _target.normalise_host(name)
        if normal is None:
            return None
        host = shown = normal
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    return host, (shown + rest).encode("ascii")


def offered_subprotocols(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """The entries of every ``Sec-WebSocket-Protocol`` header of ``headers``, in order.

    RFC 6455 §4.1: the header is a comma-separated list of tokens and may
    appear more than once; names compare case-sensitively (§11.3.4).
    """
    return tuple(
        t.decode("latin-1") for name, value in headers if name.lower() == b"sec-websocket-protocol" for t in raw_tokens(value)
    )


def choose_subprotocols(
    offer: Sequence[str], allowed: Sequence[str] | None, *, required: bool
) -> tuple[str, ...] | Rejection:
    """The route's subprotocol policy over the client's ``offer``: what goes upstream, or 400.

    ``allowed`` (``routes[].subprotocols``; None = any) filters the offer,
    the client's order of preference kept (RFC 6455 §4.1: "ordered by
    preference"). An offer of at least one subprotocol of which none is
    allowed is refused, as is an empty offer when ``required``: the backend
    could only answer without a subprotocol, which the client would fail
    (§4.1, "if the response includes a |Sec-WebSocket-Protocol| header field
    and this header field indicates the use of a subprotocol that was not
    present in the client's handshake") or not understand. The reasons name
    the allowed list (config) and never an offered value, which may be a
    credential that was not configured as one.
    """
    kept = tuple(offer) if allowed is None else tuple(entry for entry in offer if entry in allowed)
    listed = f" (allowed: {', '.join(allowed) or 'none'})" if allowed is not None else ""
    if offer and not kept:
        return Rejection(400, f"none of the {len(offer)} offered subprotocol(s) is allowed on this route{listed}")
    if required and not kept:
        return Rejection(400, f"no subprotocol offered; the route requires one{listed}")
    return kept


def with_subprotocols(headers: Sequence[tuple[bytes, bytes]], offer: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """``headers`` with their Sec-WebSocket-Protocol headers replaced by one that lists ``offer``.

    The one header takes the place (and the spelling) of the first; an empty
    ``offer`` removes them all.
    """
    result: list[tuple[bytes, bytes]] = []
    placed = False
    for name, value in headers:
        if name.lower() != b"sec-websocket-protocol":
            result.append((name, value))
        elif not placed:
            placed = True
            if offer:
                result.append((name, ", ".join(offer).encode("latin-1")))
    return result


def downstream_101(accepted: Accepted, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The client's 101: the backend's end-to-end headers, the upgrade headers and
    the proxy's own (``extra_headers``, e.g. a sticky cookie)."""
    lines = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"]
    lines += (b"Sec-WebSocket-Accept: ", accepted.accept, b"\r\n")
    for name, value in (*accepted.headers, *extra_headers):
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


#: The Content-Type of the proxy's own short response bodies.
TEXT_PLAIN = (b"Content-Type", b"text/plain; charset=utf-8")


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length body that closes the connection."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error"))]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


def http_error(rejection: Rejection) -> bytes:
    """The response for a refused request; it closes the connection.

    The body is the status line's reason phrase only: which check failed is
    for the log, not for the client.
    """
    body = REASONS.get(rejection.status, b"Error") + b"\n"
    headers = [*rejection.headers, TEXT_PLAIN]
    return http_response(rejection.status, headers, body)
