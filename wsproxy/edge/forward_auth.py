"""Forward authentication: ask an HTTP auth service whether a client may connect.

This is nginx's ``auth_request`` and Traefik's ``forwardAuth`` for WebSocket
upgrades. For each upgrade, wsproxy sends a subrequest to the auth service::

    GET /auth HTTP/1.1
    Host: 127.0.0.1:9100
    X-Forwarded-Method: GET
    X-Forwarded-Uri: /chat?room=1           (the normalised target, query as sent)
    X-Forwarded-For: 203.0.113.9
    X-Forwarded-Proto: https
    X-Forwarded-Host: chat.example.com
    Cookie: ...                             (the ``send_headers``, only those)
    Connection: close

and acts on the answer:

    2xx            allow; the ``copy_headers`` of the answer go into the upstream request;
                   with ``identity_from``, that header of the answer is the identity (one
                   value, a clean header value in UTF-8; a 2xx without it is a 503: the
                   service broke its contract, and a backend must never get an anonymous
                   session where it expects a named one)
    401, 403       deny; status, WWW-Authenticate, Content-Type and the body (at most
                   ``MAX_DENIAL_BODY_BYTES``) of the answer are passed to the client
    anything else  Rejection(503), and so are a timeout, a refused connection and
                   an answer that is not HTTP

The whole exchange, connect (and name resolution) included, runs within
``timeout_s``. With ``lifetime_from``, that header of a 2xx answer bounds the
session (decimal seconds from the answer; see ``with_lifetime``). One connection per subrequest: no keep-alive, no pipelining.

Allow answers are cached for ``cache_s`` (0 = off), keyed by a SHA-256 over the
forwarded credentials (the values of ``send_headers``; the raw values are
never stored), in an LRU bounded to ``max_cache_entries``. The cache assumes
that the auth service's verdict depends on the credentials only: when it also
depends on the target, the host or the client address, leave ``cache_s`` at 0.
Give each route its own ``ForwardAuth``, so that an allow on one route never
answers for another. Denials and errors are never cached.

The module has two halves:

- a pure half, no trio and no I/O (``subrequest_headers``,
  ``credentials_key``, ``decide``, ``AllowCache``): the decisions, testable
  without an event loop, as ``proto/`` modules are; the URL and the header
  names are checked by ``proto.forward_auth`` (the config loader checks them
  with it too);
- a trio shell, ``ForwardAuth.check``: cache lookup → connect → send → read
  → ``decide`` → cache, a few lines that move bytes and keep time.

What it is not: only ``http://`` auth services are supported; ``https://``
(TLS to the auth service) is a later addition. Concurrent checks with the
same credentials are not coalesced (each cache miss makes its own
subrequest), and a failed subrequest is not retried.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h11
import trio

from ..config.schema import ForwardAuthConfig
from ..proto.forward_auth import check_header_names, host_header, parse_url
from ..proto.handshake import Rejection, Upgrade
from ..proto.lifetime import parse_lifetime
from .channel import ChannelBroken, RawChannel, connect

__all__ = [
    "MAX_DENIAL_BODY_BYTES",
    "MAX_RESPONSE_HEAD_BYTES",
    "AllowCache",
    "Allowed",
    "Denied",
    "ForwardAuth",
    "credentials_key",
    "decide",
    "subrequest_headers",
]

#: Largest body of a 401/403 passed on to the client; the rest is cut off.
MAX_DENIAL_BODY_BYTES = 16384

#: Largest status line + headers accepted from the auth service (h11's limit).
MAX_RESPONSE_HEAD_BYTES = 16384


# --- verdicts -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allowed:
    """The auth service allowed the request."""

    headers: list[tuple[bytes, bytes]]  # copy_headers from its answer: names as configured, values as answered
    identity: str | None = None  # the identity_from header of its answer (cached with the verdict)
    lifetime: tuple[float, float] | None = None  # lifetime_from: (answered at, trio clock; seconds), cached with it


@dataclass(frozen=True, slots=True)
class Denied:
    """The auth service answered 401 or 403: pass its answer to the client."""

    status: int  # 401 or 403
    headers: list[tuple[bytes, bytes]]  # WWW-Authenticate and Content-Type of the answer
    body: bytes  # at most MAX_DENIAL_BODY_BYTES of its body
    reason: str  # for the log, not for the client


# --- the pure half: no trio, no I/O ----------------------------------------------


def _values(headers: Iterable[tuple[bytes, bytes]], lower_name: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == lower_name]


def credentials_key(upgrade: Upgrade, send_headers: Sequence[bytes]) -> bytes:
    """SHA-256 over the values of ``send_headers`` in the client's request.

    Each header contributes its name, its number of occurrences and each value,
    all length-prefixed, so that no two different sets of credentials share an
    encoding. A client without any of them has a key too (the empty set).
    """
    digest = hashlib.sha256(b"wsproxy forward auth v1\0")
    for name in send_headers:
        lower = name.lower()
        values = _values(upgrade.request.headers, lower)
        digest.update(len(lower).to_bytes(4, "big") + lower + len(values).to_bytes(4, "big"))
        for value in values:
            digest.update(len(value).to_bytes(4, "big") + value)
    return digest.digest()


def subrequest_headers(
    upgrade: Upgrade,
    send_headers: Sequence[bytes],
    *,
    service_host: bytes,
    client_ip: str,
    host_header: bytes,
    tls: bool,
) -> list[tuple[bytes, bytes]]:
    """The headers of the subrequest to the auth service.

    ``service_host`` is the auth service's Host; ``client_ip``, ``host_header``
    and ``tls`` describe the downstream connection. Of the client's headers only
    ``send_headers`` pass, with the configured spelling, every occurrence in order.
    """
    request = upgrade.request
    headers = [
        (b"Host", service_host),
        (b"X-Forwarded-Method", request.method),
        (b"X-Forwarded-Uri", upgrade.target),  # normalised: the target the backend will get
        (b"X-Forwarded-For", client_ip.encode("ascii")),
        (b"X-Forwarded-Proto", b"https" if tls else b"http"),
        (b"X-Forwarded-Host", host_header),
    ]
    for name in send_headers:
        headers += [(name, value) for value in _values(request.headers, name.lower())]
    headers.append((b"Connection", b"close"))
    return headers


def decide(
    response: h11.Response,
    body: bytes,
    copy_headers: Sequence[bytes],
    *,
    service: str,
    identity_from: bytes | None = None,
) -> Allowed | Denied | Rejection:
    """The verdict for the auth service's answer (``service`` names it in reasons).

    2xx allows and carries ``copy_headers`` (configured spelling, every value the
    answer has, in order) and, with ``identity_from``, the identity that header
    names; 401 and 403 deny with the answer's WWW-Authenticate, Content-Type
    and ``body``; anything else is the auth service failing: 503, and so is a
    2xx whose identity header is missing, repeated, empty, not UTF-8 or padded
    with whitespace (the reason never quotes the value).
    """
    status = response.status_code
    if 200 <= status < 300:
        copied = [(name, value) for name in copy_headers for value in _values(response.headers, name.lower())]
        if identity_from is None:
            return Allowed(copied)
        found = _values(response.headers, identity_from.lower())
        name = identity_from.decode("ascii")
        if len(found) != 1:
            return Rejection(503, f"auth service {service} allowed without exactly one {name} header (got {len(found)})")
        try:
            identity = found[0].decode("utf-8")
        except UnicodeDecodeError:
            return Rejection(503, f"auth service {service} allowed with a {name} header that is not UTF-8")
        if not identity or identity != identity.strip(" \t"):
            return Rejection(503, f"auth service {service} allowed with an empty or padded {name} header")
        return Allowed(copied, identity)
    if status in (401, 403):
        passed = [(b"WWW-Authenticate", v) for v in _values(response.headers, b"www-authenticate")]
        passed += [(b"Content-Type", v) for v in _values(response.headers, b"content-type")]
        return Denied(status, passed, body, f"auth service {service} answered {status}")
    return Rejection(503, f"auth service {service} answered {status}")


@dataclass(slots=True)
class _Entry:
    verdict: Allowed
    expires_at: float


def with_lifetime(
    verdict: Allowed | Denied | Rejection, response: h11.Response, lifetime_from: bytes | None, now: float, *, service: str
) -> Allowed | Denied | Rejection:
    """``lifetime_from``: the allow carries the seconds its answer gives the session (``proto.lifetime``).

    No such header: the session is not bounded. More than one, or a value that
    is not decimal seconds (at most ten years): the service broke its contract,
    503 like any other broken answer (the reason never quotes the value).
    """
    if lifetime_from is None or not isinstance(verdict, Allowed):
        return verdict
    found = _values(response.headers, lifetime_from.lower())
    name = lifetime_from.decode("ascii")
    if not found:
        return verdict
    if len(found) > 1:
        return Rejection(503, f"auth service {service} allowed with {len(found)} {name} headers")
    try:
        seconds = parse_lifetime(found[0])
    except ValueError as exc:
        return Rejection(503, f"auth service {service} allowed with a {name} header that is {exc}")
    return dataclasses.replace(verdict, lifetime=(now, seconds))


class AllowCache:
    """Allow verdicts by credentials key: LRU, bounded, each entry expiring.

    Time is passed in (``now``, in seconds of any monotonic clock), so the
    cache has no clock of its own. Disabled (nothing stored) when ``ttl_s`` or
    ``max_entries`` is 0.
    """

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be 0 or more, got {max_entries}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Allowed | None:
        """The cached verdict for ``key``, or None when there is none or it expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.verdict

    def put(self, key: bytes, verdict: Allowed, now: float) -> None:
        """Remember ``verdict`` until ``now + ttl_s``, evicting the least recently used."""
        if not self.enabled:
            return
        self._entries[key] = _Entry(verdict, now + self.ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# --- the trio shell -------------------------------------------------------------


class _NoAnswer(Exception):
    """The auth service closed the connection before its answer was complete."""


class ForwardAuth:
    """Forward authentication for one route (see the module docstring).

    Only ``http://`` auth services; ``https://`` is a later addition.
    Raises ``ValueError`` for a URL ``parse_url`` refuses or header names
    ``check_header_names`` refuses.
    """

    def __init__(self, config: ForwardAuthConfig, *, max_cache_entries: int = 10000) -> None:
        self.host, self.port, self.target = parse_url(config.url)
        check_header_names(config)
        self.config = config
        self.service_host = host_header(self.host, self.port)
        self.send_headers = tuple(name.encode("ascii") for name in config.send_headers)
        self.copy_headers = tuple(name.encode("ascii") for name in config.copy_headers)
        self.identity_from = config.identity_from.encode("ascii") if config.identity_from is not None else None
        self.cache = AllowCache(max_cache_entries, config.cache_s)
        self.lifetime_from = config.lifetime_from.encode("ascii") if config.lifetime_from is not None else None
        self.cache_hits = 0  # checks answered from the cache
        self.cache_misses = 0  # checks that asked the auth service

    async def check(
        self, upgrade: Upgrade, *, client_ip: str, host_header: bytes, tls: bool
    ) -> Allowed | Denied | Rejection:
        """Ask the auth service (or the cache) about ``upgrade``.

        ``client_ip``, ``host_header`` (the client's Host) and ``tls`` become
        X-Forwarded-For, -Host and -Proto. Never raises for the auth service's
        failures: those are ``Rejection(503, reason)``.
        """
        key = credentials_key(upgrade, self.send_headers) if self.cache.enabled else None
        if key is not None:
            cached = self.cache.get(key, trio.current_time())
            if cached is not None:
                self.cache_hits += 1
                return cached
        self.cache_misses += 1
        headers = subrequest_headers(
            upgrade, self.send_headers, service_host=self.service_host,
            client_ip=client_ip, host_header=host_header, tls=tls,
        )
        verdict = await self._ask(headers)
        if key is not None and isinstance(verdict, Allowed):
            self.cache.put(key, verdict, trio.current_time())
        return verdict

    async def _ask(self, headers: list[tuple[bytes, bytes]]) -> Allowed | Denied | Rejection:
        """One subrequest, connect included, within ``timeout_s``."""
        service = self.config.url
        timeout_s = self.config.timeout_s
        channel: RawChannel | None = None
        try:
            with trio.fail_after(timeout_s):
                channel = await connect(self.host, self.port)
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
                request = h11.Request(method=b"GET", target=self.target, headers=headers)
                await channel.send((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                response = await _read_response(channel, conn)
                body = b""
                if response.status_code in (401, 403):
                    body = await _read_body(channel, conn, MAX_DENIAL_BODY_BYTES)
        except trio.TooSlowError:
            return Rejection(503, f"auth service {service} did not answer within {timeout_s:g}s")
        except OSError as exc:  # refused, unreachable, name not found
            return Rejection(503, f"auth service {service}: connect failed: {exc.strerror or exc}")
        except ChannelBroken as exc:
            return Rejection(503, f"auth service {service}: connection broken: {exc}")
        except _NoAnswer:
            return Rejection(503, f"auth service {service} closed the connection without answering")
        except h11.ProtocolError as exc:
            return Rejection(503, f"auth service {service} sent invalid HTTP: {exc}")
        finally:
            if channel is not None:
                channel.close()
        verdict = decide(response, body, self.copy_headers, service=service, identity_from=self.identity_from)
        return with_lifetime(verdict, response, self.lifetime_from, trio.current_time(), service=service)


async def _next_event(channel: RawChannel, conn: h11.Connection, *, eof_is_error: bool) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED cannot happen to a client
            return event
        data = await channel.receive()
        if not data and eof_is_error:
            raise _NoAnswer
        conn.receive_data(data)  # b"" marks EOF, which ends a close-delimited body


async def _read_response(channel: RawChannel, conn: h11.Connection) -> h11.Response:
    while True:
        event = await _next_event(channel, conn, eof_is_error=True)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue and the like: the answer follows
        raise _NoAnswer


async def _read_body(channel: RawChannel, conn: h11.Connection, max_bytes: int) -> bytes:
    """The response body, cut off after ``max_bytes`` (the rest is not read)."""
    body = bytearray()
    while len(body) < max_bytes:
        event = await _next_event(channel, conn, eof_is_error=False)
        if not isinstance(event, h11.Data):
            break  # EndOfMessage, or ConnectionClosed ending a close-delimited body
        body += event.data
    return bytes(body[:max_bytes])
