"""The gate's trio side: what happens to a connection before its request is read,
and the checks between reading it and choosing a backend.

    accept → PROXY protocol header (``read_proxy_header``) → admission (limits)
           → TLS handshake → request → Origin → subprotocol policy → credentials → backend

The decisions live in ``proto.proxy_protocol``, ``proto.limits``,
``proto.origin``, ``proto.handshake`` (subprotocols), ``proto.auth``,
``proto.client_cert`` and ``proto.forwarded``; ``edge.forward_auth``
makes the subrequest of forward auth. This module only reads bytes and keeps
time for them.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import trio

from ..config.schema import RouteConfig
from ..errors import WsproxyError
from ..proto import proxy_protocol
from ..proto.auth import (
    Principal,
    Credential,
    Rewrite,
    find_credential,
    identity_headers,
    missing_credentials,
    verify_tokens,
)
from ..proto.client_cert import xfcc_element
from ..proto.handshake import Rejection, Upgrade, choose_subprotocols, offered_subprotocols, with_subprotocols
from ..proto.jwt import verify_jwt
from ..proto.origin import OriginPolicy, check_origin, compile_origins
from ..proto.routing import DEFAULT_IDENTITY_HEADER
from .channel import RawChannel
from .forward_auth import Allowed, ForwardAuth
from .jwks import JwksFetcher
from .refusal import Reason, Refused

#: The longest PROXY header read (v2: 16 bytes + at most this much of addresses and TLVs).
MAX_PROXY_HEADER_BYTES = 16 + proxy_protocol.MAX_V2_LENGTH


class ProxyHeaderError(WsproxyError):
    """The PROXY protocol header is missing, malformed or truncated: close the connection."""


async def _recv_exact(channel: RawChannel, n: int, *, peek: bool = False) -> bytes:
    """Up to ``n`` bytes, waiting for at least one; never more than ``n`` (nothing beyond the header)."""
    sock = channel.sock
    flags = socket.MSG_PEEK if peek else 0
    while True:
        try:
            data = sock.recv(n, flags)
        except BlockingIOError:
            channel.watched = True  # trio registers the socket: its close must tell trio
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            raise ProxyHeaderError(f"connection failed: {exc.strerror or exc}") from None
        if not data:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        return data


async def read_proxy_header(channel: RawChannel, version: str) -> tuple[str, int] | None:
    """Read exactly the PROXY header (v1 or v2) from the socket; return the client address.

    Only the header's bytes are consumed, so what follows (the request, or a
    TLS ClientHello) is still in the socket for whoever reads next. Returns
    None for "PROXY UNKNOWN" and v2 LOCAL (keep the peer address). Raises
    ``ProxyHeaderError`` for anything else that is not a valid header.
    """
    buf = b""
    while True:
        if version == "v2":
            need = 16 if len(buf) < 16 else 16 + int.from_bytes(buf[14:16], "big")
            if need > MAX_PROXY_HEADER_BYTES:
                raise ProxyHeaderError(f"PROXY v2 header of {need} bytes")
            if len(buf) < need:
                buf += await _recv_exact(channel, need - len(buf))
        else:
            peeked = await _recv_exact(channel, 108 - len(buf), peek=True)
            if buf.endswith(b"\r") and peeked.startswith(b"\n"):
                take = 1  # the CRLF was split between two reads
            else:
                end = peeked.find(b"\r\n")
                take = end + 2 if end >= 0 else len(peeked)
            buf += await _recv_exact(channel, take)
        verdict = proxy_protocol.parse(buf, version)
        if isinstance(verdict, proxy_protocol.Invalid):
            raise ProxyHeaderError(verdict.reason)
        if isinstance(verdict, proxy_protocol.ProxyHeader):
            return verdict.source
        if len(buf) >= MAX_PROXY_HEADER_BYTES:  # pragma: no cover - parse says Invalid first
            raise ProxyHeaderError("PROXY header too long")


@dataclass(slots=True)
class RouteGate:
    """What a route checks, built once per config generation (forward auth keeps a cache)."""

    route: RouteConfig
    origins: OriginPolicy | None
    forward: ForwardAuth | None = None

    @classmethod
    def build(cls, route: RouteConfig) -> RouteGate:
        origins = compile_origins(route.origins) if route.origins is not None else None
        forward = None
        if route.auth is not None and route.auth.forward is not None:
            forward = ForwardAuth(route.auth.forward)
        return cls(route, origins, forward)


@dataclass(slots=True)
class Admitted:
    """The request passed the gate: how the upstream request differs from the client's."""

    rewrite: Rewrite | None = None  # credential and spoofed identity removed (auth routes)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # identity and copied headers to add
    drop: frozenset[bytes] = frozenset()  # lower-case names of client headers the added ones replace
    identity: str | None = None  # for the log
    claims: dict[str, object] | None = None  # the JWT's claims (sticky "claim:NAME" keys)
    lifetime: tuple[float, float] | None = None  # forward auth's lifetime_from: (answered at, trio clock; seconds)


def _subprotocol_policy(route: RouteConfig, upgrade: Upgrade, rewrite: Rewrite | None) -> Rewrite | None | Rejection:
    """``routes[].subprotocols`` and ``subprotocol_required`` over the offer that would go
    upstream (credential entries already out): the rewritten request, or 400."""
    if route.subprotocols is None and not route.subprotocol_required:
        return rewrite
    headers = rewrite.headers if rewrite is not None else upgrade.request.headers.raw_items()
    chosen = choose_subprotocols(offered_subprotocols(headers), route.subprotocols, required=route.subprotocol_required)
    if isinstance(chosen, Rejection):
        return chosen
    return Rewrite(
        target=rewrite.target if rewrite is not None else upgrade.target,
        headers=with_subprotocols(headers, chosen),
        subprotocol_reply=rewrite.subprotocol_reply if rewrite is not None else None,
    )


async def check_request(
    gate: RouteGate,
    upgrade: Upgrade,
    *,
    client_ip: str,
    host_header: bytes,
    tls: bool,
    jwks: JwksFetcher | None = None,
    client_identity: str | None = None,
    client_cert_der: bytes | None = None,
) -> Admitted | Refused:
    """Origin first (403), then the subprotocol policy (400), then credentials (401/403,
    or the auth service's answer).

    ``client_identity`` is the verified client certificate's identity (the
    listener's ``client_identity``): the session's identity on a route without
    auth, sent upstream in ``X-Auth-Subject``. ``client_cert_der`` is that
    certificate, for the route's ``client_cert_header``.
    """
    route = gate.route
    headers = list(upgrade.request.headers)
    rejection = check_origin(gate.origins, route.allow_missing_origin, headers)  # also: Origin twice → 403
    if rejection is not None:
        return Refused.of(Reason.ORIGIN, rejection)
    auth = route.auth
    credential: Credential | None = None
    rewrite: Rewrite | None = None
    if auth is not None:
        credential, rewrite = find_credential(auth, upgrade)
    policy = _subprotocol_policy(route, upgrade, rewrite)
    if isinstance(policy, Rejection):
        return Refused.of(Reason.SUBPROTOCOL, policy)
    rewrite = policy
    cert_headers = []
    if route.client_cert_header is not None and client_cert_der is not None:
        cert_headers.append((route.client_cert_header.encode("ascii"), xfcc_element(client_cert_der)))
    if auth is None:
        if client_identity is None:
            return Admitted(rewrite=rewrite, headers=cert_headers)
        identity_header = (DEFAULT_IDENTITY_HEADER.encode("ascii"), client_identity.encode("utf-8"))
        return Admitted(rewrite=rewrite, headers=[identity_header, *cert_headers], identity=client_identity)
    if auth.mode == "forward":
        assert gate.forward is not None
        answer = await gate.forward.check(upgrade, client_ip=client_ip, host_header=host_header, tls=tls)
        if isinstance(answer, Allowed):
            # The client's own copies of copy_headers never pass, whatever the service answered.
            drop = frozenset(name.lower().encode("latin-1") for name in auth.forward.copy_headers) if auth.forward else frozenset()
            if answer.identity is None:
                return Admitted(rewrite=rewrite, headers=[*answer.headers, *cert_headers], drop=drop, lifetime=answer.lifetime)
            named = identity_headers(auth, Principal(identity=answer.identity, claims={}))
            return Admitted(
                rewrite=rewrite,
                headers=[*named, *answer.headers, *cert_headers],
                drop=drop,
                identity=answer.identity,
                lifetime=answer.lifetime,
            )
        if isinstance(answer, Rejection):  # the auth service failed: 503
            return Refused.of(Reason.AUTH_UNAVAILABLE, answer)
        return Refused.relayed(Reason.AUTH, answer.status, answer.headers, answer.body, answer.reason)
    if credential is None:
        return Refused.of(Reason.AUTH, missing_credentials())
    verdict: Principal | Rejection
    if auth.mode == "tokens":
        verdict = verify_tokens(auth, credential)
    else:
        if jwks is not None and auth.jwt is not None:  # a kid the keys lack: the provider may have rotated (edge.jwks)
            await jwks.before_verify(auth.jwt.key_material, credential)
        verdict = verify_jwt(auth, credential, time.time())
    if isinstance(verdict, Rejection):
        return Refused.of(Reason.AUTH, verdict)
    return Admitted(
        rewrite=rewrite,
        headers=[*identity_headers(auth, verdict), *cert_headers],
        identity=verdict.identity,
        claims=dict(verdict.claims),
    )
