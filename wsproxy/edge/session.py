"""One downstream connection, from accept to the last byte (trio shell).

    PROXY header, admission, TLS handshake     (edge.gate, proto.limits, edge.tls)
      → read request (h11)                      (edge.request, proto.handshake)
      → route                                   (proto.routing)
      → Origin, credentials                     (edge.gate, proto.origin, proto.auth)
      → per-identity cap                        (the host: control.session_admin, proto.identity_caps)
      → plan backends                           (balance.plan)
      → dial + upstream upgrade                 (edge.upstream)
      → 101 to the client
      → relay                                   (edge.relay)

Everything up to the request itself happens within ``timeouts.handshake``
from accept. Every refusal on the way is an HTTP response with the status the
verdict carries and one log line that says why; nothing of a refused request
reaches a backend. The session owns its sockets and closes them in
``finally``, and so its backend's ``Lease``; once the relay engine has taken
the session over, the task returns and the engine's ``on_end`` callback does
the same (``_ended``, ``_release``) when it lets the session go.

The process that serves it (the ``App``) is seen only as a ``SessionHost``
(``edge.host``); every line it logs carries its fields from its
``SessionLog`` (``edge.session_log``).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import trio

from ..balance.plan import NoBackend, cookie_for, plan_session
from ..config.schema import hostport
from ..errors import UpstreamUnavailable
from ..proto.forwarded import forwarding
from ..proto.frames import CLOSE_GOING_AWAY, RSV1, RSV_ALL, FrameScanner
from ..proto.limits import MessageRate
from ..proto.relay import Outcome
from ..errors import LocalOverload
from ..proto.handshake import Rejection, Upgrade, downstream_101
from ..proto.upstream_handshake import upstream_request
from .channel import ChannelBroken, RawChannel
from ..proto.identity_caps import IdentityKey
from ..proto.routing import route_label
from .listener import NODELAY_INHERITED
from .gate import Admitted, ProxyHeaderError, check_request, read_proxy_header
from .engine import EngineRelay
from .refusal import Reason, Refused, refuse
from .relay import Relay, RelayDriver
from .request import CLOSE_TIMEOUT_S, Silent, read_request
from ..proto.client_cert import certificate_identity
from ..proto.handshake import offered_subprotocols
from .tls import TlsChannel
from .upstream import Refusal, open_upstream
from .session_log import SessionLog

if TYPE_CHECKING:
    from ..balance.registry import Lease
    from .host import SessionGeneration, SessionHost
    from ..proto.lifetime import Deadline
    from ..config.schema import BackendConfig, ListenerConfig, RouteConfig

log = logging.getLogger("wsproxy.edge.session")


__all__ = ["CLOSE_TIMEOUT_S", "Session", "handle_connection"]


class Session:
    """What the rest of the proxy may know about one downstream connection."""

    __slots__ = (
        "conn_id",
        "client_ip",
        "generation",
        "route",
        "backend",
        "relay",
        "started",
        "idle_mark",
        "idle_since",
        "sticky",
        "identity",
        "cert_identity",
        "draining",
        "cap_key",
        "deadline",
        "revocation_keys",
        "lease",
        "log",
    )

    def __init__(
        self, conn_id: str, peer: str, client_ip: str, generation: SessionGeneration, log: SessionLog | None = None
    ) -> None:
        self.conn_id = conn_id
        self.client_ip = client_ip
        self.generation = generation
        self.route: RouteConfig | None = None
        self.backend: BackendConfig | None = None
        self.relay: RelayDriver | None = None  # the engine's or the trio pumps', set once both handshakes are done
        self.started = time.monotonic()
        self.idle_mark = -1  # bytes relayed when the idle sweeper last looked
        self.idle_since = 0.0
        self.sticky = "none"  # how stickiness decided the backend, for the log
        self.identity = "-"  # who the gate let in (never the credential), for the log
        self.cert_identity: str | None = None  # the verified client certificate's (listener's client_identity)
        self.draining = False  # its close has been ordered by a drain or a shutdown
        self.cap_key: IdentityKey | None = None  # counted under this identity (limits.max_sessions_per_identity)
        self.deadline: Deadline | None = None  # when its token, lifetime or age ends it (control.lifetime)
        self.revocation_keys: tuple[tuple[str, str], ...] = ()  # its jti and subjects, for revoked_file
        self.lease: Lease | None = None  # its count in its backend's active sessions, once the backend accepted
        self.log = log if log is not None else SessionLog(conn_id, peer)  # the fields of its log lines

    @property
    def peer(self) -> str:
        """The client's address (after PROXY protocol), as its log lines give it."""
        return self.log.peer




async def handle_connection(
    sock: socket.socket, host: SessionHost, listener: ListenerConfig, address: tuple[Any, ...]
) -> None:
    """Serve one accepted connection; never raises, always closes its sockets.

    ``address``: the peer's, as ``accept`` returned it.
    """
    conn_id = host.next_conn_id()
    generation = host.generation
    config = generation.config
    deadline = trio.current_time() + config.timeouts.handshake_s
    client = RawChannel(sock, nodelay=not NODELAY_INHERITED)  # (accept_loop set it on the listener)
    backend: RawChannel | None = None
    admitted_ip: str | None = None
    session: Session | None = None
    session_log = SessionLog(conn_id, "-")
    handed_over = False  # the engine relays the session: its end gives back what it holds (_release)
    try:
        peer_ip, peer_port = address[0], address[1]
        session_log.set_peer(hostport(peer_ip, peer_port))
        client_ip, client_port = peer_ip, peer_port
        if listener.proxy_protocol != "off":
            try:
                with trio.fail_at(deadline):
                    source = await read_proxy_header(client, listener.proxy_protocol)
            except (ProxyHeaderError, trio.TooSlowError) as exc:
                reason = str(exc) or "PROXY header not complete in time"
                refused = Refused(Reason.PROXY_HEADER, None, reason)
                await refuse(client, refused, session=session_log, counter=host.metrics)
                return
            if source is not None:
                client_ip, client_port = source
                session_log.set_peer(hostport(client_ip, client_port))
        session = Session(conn_id, session_log.peer, client_ip, generation, session_log)
        admission = host.admit_connection(client_ip, trio.current_time(), config.limits)
        if admission is None:
            admitted_ip = client_ip
        if listener.tls is not None:
            client = TlsChannel.wrap_server(client.sock, host.tickets.context_for(listener.name, listener.tls))
            try:
                with trio.fail_at(deadline):
                    await client.handshake()
            except (ssl.SSLError, ChannelBroken, trio.TooSlowError) as exc:
                reason = getattr(exc, "reason", None) or str(exc) or "TLS handshake not complete in time"
                session_log.peer_event(log, logging.INFO, "tls_failed", reason=reason)
                return
            assert isinstance(client, TlsChannel)
            cert = client.ssl.getpeercert()  # {} without a (verified) client certificate
            identity = certificate_identity(cert, listener.tls.client_identity) if cert else None
            if identity is not None:
                session.identity = session.cert_identity = identity
        if admission is not None:
            await _refuse(client, session, host, Refused.of(Reason.LIMIT, admission))
            return
        try:
            backend, from_backend, from_client = await _handshakes(client, session, host, listener, deadline, client_port)
        except _Done:
            return
        handed_over = await _relay(client, backend, session, from_client, from_backend, host, admitted_ip)
    except Exception:
        session_log.conn_event(log, logging.ERROR, "error", exc_info=True)
    finally:
        if not handed_over:
            _release(session, host, admitted_ip, client, backend)


def _release(
    session: Session | None, host: SessionHost, admitted_ip: str | None, client: RawChannel, backend: RawChannel | None
) -> None:
    """What a connection holds, given back once it is over: identity, lease, admission, sockets."""
    if session is not None:
        host.release_identity(session)
        if session.lease is not None:
            session.lease.release()  # at the latest: the relay's end released it already
    if admitted_ip is not None:
        host.connection_closed(admitted_ip)
    if backend is not None:
        backend.close()
    client.close()


#: channel types whose sessions the engine can relay (it drives their sockets and TLS objects itself)
_ENGINE_CHANNELS = (RawChannel, TlsChannel)


class _Done(Exception):
    """The connection was answered and is over (refused, or the client left)."""


async def _refuse(client: RawChannel, session: Session, host: SessionHost, refused: Refused) -> None:
    """``edge.refusal.refuse`` with the session's fields (route ``-`` until one matched)."""
    await refuse(client, refused, session=session.log, counter=host.metrics)


async def _handshakes(
    client: RawChannel, session: Session, host: SessionHost, listener: ListenerConfig, deadline: float, client_port: int
) -> tuple[RawChannel, bytes, bytes]:
    """Both handshakes: returns the backend channel and the bytes that came with the two heads."""
    config = session.generation.config
    tls = listener.tls is not None
    result = await read_request(
        client,
        deadline=deadline,
        handshake_s=config.timeouts.handshake_s,
        limit=config.limits.max_header_bytes,
    )
    if result is None:
        raise _Done
    if isinstance(result, Silent):
        await _refuse(client, session, host, Refused(Reason.TIMEOUT, None, result.reason))
        raise _Done
    if isinstance(result, Rejection):
        await _refuse(client, session, host, Refused.of(Reason.TIMEOUT if result.status == 408 else Reason.UPGRADE, result))
        raise _Done
    up, from_client = result
    route = session.generation.router.route(up.host, up.path, up.subprotocols)  # the normalised host and path
    if isinstance(route, Rejection):
        reason = Reason.NO_ROUTE if route.status == 404 else Reason.UPGRADE  # 400: a path that would route elsewhere
        await _refuse(client, session, host, Refused.of(reason, route))
        raise _Done
    session.route = route
    session.log.routed(route_label(route))
    host_header = up.authority  # the Host as normalised, for the auth service and X-Forwarded-Host
    der = None
    if route.client_cert_header is not None and isinstance(client, TlsChannel):
        der = client.ssl.getpeercert(binary_form=True)
    verdict = await check_request(
        session.generation.gates[id(route)],
        up,
        client_ip=session.client_ip,
        host_header=host_header,
        tls=tls,
        jwks=host.jwks,
        client_identity=session.cert_identity,
        client_cert_der=der,
    )
    if isinstance(verdict, Refused):
        await _refuse(client, session, host, verdict)
        raise _Done
    if verdict.identity is not None:
        session.identity = verdict.identity
    revoked = host.admit_lifetime(session, route, verdict)
    if revoked is not None:
        await _refuse(client, session, host, revoked)
        raise _Done
    rejection = host.admit_identity(session, config.pools[route.pool], up, verdict.claims, config.limits)
    if rejection is not None:
        await _refuse(client, session, host, Refused.of(Reason.IDENTITY_LIMIT, rejection))
        raise _Done
    backend, from_backend = await _connect_upstream(client, session, host, up, verdict, host_header, client_port, tls=tls)
    return backend, from_backend, from_client


async def _connect_upstream(
    client: RawChannel,
    session: Session,
    host: SessionHost,
    up: Upgrade,
    admitted: Admitted,
    host_header: bytes,
    client_port: int,
    *,
    tls: bool,
) -> tuple[RawChannel, bytes]:
    """Pick backends, dial, complete the upstream handshake and answer the client's upgrade."""
    generation = session.generation
    config = generation.config
    route = session.route
    assert route is not None
    pool = config.pools[route.pool]
    request_headers = list(up.request.headers)  # (lower-case names)
    plan = plan_session(
        pool,
        host.registry,
        generation.selectors[pool.name],
        trio.current_time(),
        headers=request_headers,
        target=up.target,
        client_ip=session.client_ip,
        claims=admitted.claims,
        tls=tls,
        identity=admitted.identity if admitted.identity is not None else session.cert_identity,  # as logged
    )
    if isinstance(plan, NoBackend):
        extra = [(b"Retry-After", b"%d" % plan.retry_after_s)] if plan.retry_after_s else []
        await _refuse(client, session, host, Refused.plain(Reason.NO_BACKEND, plan.status, plan.reason, plan.body, extra))
        raise _Done
    session.sticky = plan.sticky
    added, dropped = forwarding(
        request_headers,
        peer_ip=session.client_ip,
        client_ip=session.client_ip,
        client_port=client_port,
        host_header=host_header,
        tls=tls,
        trusted=config.trusted_proxies,
    )
    rewrite = admitted.rewrite
    target, headers = upstream_request(
        up,
        [*added, *admitted.headers],
        target=rewrite.target if rewrite else None,
        client_headers=rewrite.headers if rewrite else None,
        drop=set(dropped) | admitted.drop,
        strip=generation.router.strip_headers(route),
    )
    forwarded = offered_subprotocols(headers)
    if forwarded != up.subprotocols:  # the backend must choose from what it was offered (else 502)
        up = dataclasses.replace(up, subprotocols=forwarded)
    try:
        result = await open_upstream(
            plan.order,
            pool,
            host.registry,
            target,
            headers,
            up,
            timeouts=config.timeouts,
            max_header_bytes=max(config.limits.max_header_bytes, 16384),
            log=session.log,
            timings=host.metrics,
            engine=host.engine,
        )
    except UpstreamUnavailable as exc:
        reason = (
            Reason.OVERLOAD if isinstance(exc, LocalOverload)
            else Reason.UPSTREAM_TIMEOUT if exc.status == 504
            else Reason.UPSTREAM_FAILED
        )  # fmt: skip
        await _refuse(client, session, host, Refused.of(reason, Rejection(exc.status, exc.reason, exc.headers)))
        raise _Done from None
    if isinstance(result, Refusal):
        refused = Refused.relayed(
            Reason.BACKEND_REFUSED, result.status, result.headers, result.body, "backend refused the upgrade",
            fields=(("pool", pool.name),),
        )
        await _refuse(client, session, host, refused)
        raise _Done
    session.lease = result.lease  # released by whatever ends the session (handle_connection's finally at the latest)
    backend = result.backend
    session.backend = backend
    session.log.served(pool.name, str(backend.address))
    extra_101 = []
    cookie = plan.set_cookie if backend is plan.order[0] else cookie_for(pool, backend, tls=tls)
    if cookie:
        extra_101.append((b"Set-Cookie", cookie))
    accepted = result.accepted
    if rewrite is not None and rewrite.subprotocol_reply and accepted.subprotocol is None:
        extra_101.append((b"Sec-WebSocket-Protocol", rewrite.subprotocol_reply.encode("latin-1")))
    deflate = "permessage-deflate" in accepted.extensions
    unknown = bool(accepted.extensions - {"permessage-deflate"})
    rsv_allowed = RSV_ALL if unknown else (RSV1 if deflate else 0)
    deflate = deflate and not unknown
    limits = config.limits
    up_scanner = FrameScanner(
        from_client=True,
        rsv_allowed=rsv_allowed,
        deflate=deflate,
        max_message_bytes=limits.max_message_bytes,
        validate_utf8=route.validate_utf8,
    )
    down_scanner = FrameScanner(
        from_client=False,
        rsv_allowed=rsv_allowed,
        deflate=deflate,
        max_message_bytes=limits.max_message_bytes,
        validate_utf8=route.validate_utf8,
    )
    rate = limits.max_message_rate
    rates = (MessageRate(rate), MessageRate(rate)) if rate is not None else None
    backend_channel = result.channel
    if host.engine is not None and type(client) in _ENGINE_CHANNELS and type(backend_channel) in _ENGINE_CHANNELS:
        # The epoll engine relays it, plain or TLS on either side (it takes over the TLS objects).
        session.relay = EngineRelay(
            host.engine,
            client.sock,
            backend_channel.sock,
            up_scanner=up_scanner,
            down_scanner=down_scanner,
            close_timeout_s=pool.drain.close_timeout_s,
            backend_failure_code=route.backend_failure_close_code,
            message_rate=rates,
            client_tls=client if isinstance(client, TlsChannel) else None,
            backend_tls=backend_channel if isinstance(backend_channel, TlsChannel) else None,
            log=session.log,
            backend_in_set=backend_channel.in_engine,
        )
    else:
        session.relay = Relay(
            client,
            backend_channel,
            up_scanner=up_scanner,
            down_scanner=down_scanner,
            close_timeout_s=pool.drain.close_timeout_s,
            backend_failure_code=route.backend_failure_close_code,
            message_rate=rates,
        )
    try:
        await client.send(downstream_101(accepted, extra_101))
    except BaseException as exc:  # the lease goes with the session (handle_connection's finally)
        result.channel.close()
        session.relay = None
        if isinstance(exc, ChannelBroken):
            raise _Done from None
        raise
    return result.channel, result.trailing


async def _relay(
    client: RawChannel,
    backend: RawChannel,
    session: Session,
    from_client: bytes,
    from_backend: bytes,
    host: SessionHost,
    admitted_ip: str | None,
) -> bool:
    """Relay the established session; True when the engine took it over (no task waits for its end).

    Its end (``_ended``, then ``_release``) runs when the engine lets it go,
    or here once the trio pumps return.
    """
    relay, lease = session.relay, session.lease
    assert relay is not None and lease is not None
    host.session_established(session)
    lease.state.total += 1  # active was counted when the backend was chosen
    host.metrics.handshake_done(time.monotonic() - session.started)
    if session.generation.config.log.sessions == "both":
        session.log.backend_event(log, logging.INFO, "open", sticky=session.sticky, identity=session.identity)
    if host.stopping:  # established while the proxy was shutting down
        relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "proxy shutting down", Outcome.SHUTDOWN)
    if isinstance(relay, EngineRelay):

        def over() -> None:
            try:
                _ended(session, host)
            finally:
                _release(session, host, admitted_ip, client, backend)

        relay.start(from_client, from_backend, over)
        return True
    try:
        await relay.run(from_client, from_backend)
    finally:
        _ended(session, host)
    return False


def _ended(session: Session, host: SessionHost) -> None:
    """The relay is over: the lease, the session's counts and metrics, its close line."""
    relay, lease, route, session_log = session.relay, session.lease, session.route, session.log
    assert relay is not None and lease is not None and route is not None
    lease.release()
    host.session_ended(session)
    state = lease.state
    up, down = relay.up.scanner, relay.down.scanner
    state.bytes_up += relay.bytes_up
    state.bytes_down += relay.bytes_down
    state.messages_up += up.messages
    state.messages_down += down.messages
    host.metrics.session_closed(
        session_log.route,
        route.pool,
        session_log.backend,
        outcome=relay.machine.kind.value,
        duration_s=time.monotonic() - session.started,
        client_code=up.close_code,
        backend_code=down.close_code,
        proxy_to_client=relay.down.own_close_code,
        proxy_to_backend=relay.up.own_close_code,
    )
    if session.generation.config.log.sessions != "none":
        session_log.backend_event(
            log,
            logging.INFO,
            "close",
            identity=session.identity,
            by=relay.machine.closed_by.value,
            reason=relay.machine.reason or "cancelled",
            client_code=up.close_code,  # null: no close frame
            backend_code=down.close_code,
            dur_s=round(time.monotonic() - session.started, 3),
            up_b=relay.bytes_up,
            down_b=relay.bytes_down,
            up_msgs=up.messages,
            down_msgs=down.messages,
        )
