"""One downstream connection, from accept to the last byte (trio shell).

    read request (h11, within timeouts.handshake)
      → check_raw_head / check_upgrade            (proto.handshake)
      → route                                     (proto.routing)
      → order backends                            (balance.policy)
      → dial + upstream upgrade                   (edge.upstream)
      → 101 to the client
      → relay                                     (edge.relay)

Every refusal on the way is an HTTP response with the status the verdict
carries and one log line that says why; nothing of a refused request reaches a
backend. The session owns its two sockets and closes both in ``finally``.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import TYPE_CHECKING

import h11
import trio

from ..errors import UpstreamUnavailable
from .channel import ChannelBroken, RawChannel
from ..proto.frames import CLOSE_GOING_AWAY, RSV1, RSV_ALL, FrameScanner
from ..proto.handshake import (
    Rejection,
    Upgrade,
    check_raw_head,
    check_upgrade,
    downstream_101,
    forwarding_headers,
    http_error,
    http_response,
    upstream_request,
)
from .relay import Relay
from .upstream import Refusal, open_upstream
from ..balance.plan import NoBackend, cookie_for, plan_session

if TYPE_CHECKING:
    from ..app import App, Generation
    from ..config.schema import BackendConfig, RouteConfig

log = logging.getLogger("wsproxy.edge.session")

#: How long a closing session may take to finish its close handshakes.
CLOSE_TIMEOUT_S = 5.0


class Session:
    """What the rest of the proxy may know about one downstream connection."""

    __slots__ = (
        "conn_id",
        "peer",
        "generation",
        "route",
        "backend",
        "relay",
        "started",
        "idle_mark",
        "idle_since",
        "sticky",
    )

    def __init__(self, conn_id: str, peer: str, generation: Generation) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.generation = generation
        self.route: RouteConfig | None = None
        self.backend: BackendConfig | None = None
        self.relay: Relay | None = None  # set once both handshakes are done
        self.started = time.monotonic()
        self.idle_mark = -1  # bytes relayed when the idle sweeper last looked
        self.idle_since = 0.0
        self.sticky = "none"  # how stickiness decided the backend, for the log


async def handle_connection(sock: socket.socket, app: App, *, tls: bool = False) -> None:
    """Serve one accepted connection; never raises, always closes both sockets."""
    conn_id = app.next_conn_id()
    client = RawChannel(sock)
    backend: RawChannel | None = None
    try:
        try:
            peer_ip, peer_port = client.peername()
        except OSError:
            return  # reset before we looked
        session = Session(conn_id, f"{peer_ip}:{peer_port}", app.generation)
        try:
            result = await _client_handshake(client, session)
            if result is None:
                return
            up, head_rest = result
            connected = await _connect_upstream(client, session, app, up, peer_ip, peer_port, tls=tls)
            if connected is None:
                return
            backend, from_backend = connected
            await _relay(client, backend, session, head_rest, from_backend, app)
        except Exception:
            log.exception("event=error conn=%s peer=%s", conn_id, session.peer)
    finally:
        if backend is not None:
            backend.close()
        client.close()


async def _refuse(client: RawChannel, session: Session, rejection: Rejection) -> None:
    log.info(
        "event=refused conn=%s peer=%s status=%d reason=%r",
        session.conn_id,
        session.peer,
        rejection.status,
        rejection.reason,
    )
    await _send_and_close(client, http_error(rejection))


async def _send_and_close(client: RawChannel, data: bytes) -> None:
    """Send a final response, half-close, and let the client read it before the socket goes.

    Closing at once with unread request bytes in the kernel buffer would send
    a reset that can destroy the response in flight (RFC 7230 §6.6).
    """
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await client.send(data)
        except ChannelBroken:
            return
        client.send_eof()
        while await client.receive():
            pass


async def _client_handshake(stream: RawChannel, session: Session) -> tuple[Upgrade, bytes] | None:
    """Read and check the downstream request; refuse it, or return it with the bytes after it."""
    config = session.generation.config
    limit = config.limits.max_header_bytes
    buf = bytearray()
    head = b""
    with trio.move_on_after(config.timeouts.handshake_s) as scope:
        while True:
            data = await stream.receive()
            if not data:
                return None  # the client went away before sending a whole request
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(buf[: end + 4])
                break
            if len(buf) > limit:
                await _refuse(stream, session, Rejection(431, f"request head over {limit} bytes"))
                return None
            if buf.count(b"\n") != buf.count(b"\r\n"):
                await _refuse(stream, session, Rejection(400, "bare LF line ending in the request"))
                return None
    if scope.cancelled_caught:
        if buf:
            await _refuse(
                stream, session, Rejection(408, f"request not complete within {config.timeouts.handshake_s:g}s")
            )
        else:
            log.info("event=refused conn=%s peer=%s reason='no request within %gs'",
                     session.conn_id, session.peer, config.timeouts.handshake_s)
        return None
    if len(head) > limit:
        await _refuse(stream, session, Rejection(431, f"request head over {limit} bytes"))
        return None
    rejection = check_raw_head(head)
    if rejection is not None:
        await _refuse(stream, session, rejection)
        return None
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        await _refuse(stream, session, Rejection(exc.error_status_hint, f"malformed request: {exc}"))
        return None
    if not isinstance(event, h11.Request):  # pragma: no cover - h11 has the whole head
        await _refuse(stream, session, Rejection(400, "malformed request"))
        return None
    verdict = check_upgrade(event)
    if isinstance(verdict, Rejection):
        await _refuse(stream, session, verdict)
        return None
    route = session.generation.router.match(verdict.host, verdict.path)
    if route is None:
        await _refuse(stream, session, Rejection(404, f"no route for host={verdict.host} path={verdict.path}"))
        return None
    session.route = route
    return verdict, bytes(buf[len(head) :])


async def _connect_upstream(
    client: RawChannel,
    session: Session,
    app: App,
    up: Upgrade,
    peer_ip: str,
    peer_port: int,
    *,
    tls: bool,
) -> tuple[RawChannel, bytes] | None:
    """Pick backends, dial, complete the upstream handshake and answer the client's upgrade.

    On failure the client gets its answer here and None is returned. On
    success returns the backend channel and the bytes that came after its 101.
    """
    generation = session.generation
    config = generation.config
    route = session.route
    assert route is not None
    pool = config.pools[route.pool]
    plan = plan_session(
        pool,
        app.registry,
        generation.selectors[pool.name],
        trio.current_time(),
        headers=list(up.request.headers),
        target=up.request.target,
        client_ip=peer_ip,
        tls=tls,
    )
    if isinstance(plan, NoBackend):
        extra = [(b"Retry-After", b"%d" % plan.retry_after_s)] if plan.retry_after_s else []
        log.info(
            "event=refused conn=%s peer=%s status=%d reason=%r",
            session.conn_id, session.peer, plan.status, plan.reason,
        )
        body = plan.body.encode()
        await _send_and_close(client, http_response(plan.status, [*extra, _TEXT_PLAIN], body))
        return None
    session.sticky = plan.sticky
    host_header = next((v for n, v in up.request.headers if n == b"host"), b"")
    target, headers = upstream_request(up, forwarding_headers(peer_ip, peer_port, host_header, tls=tls))
    try:
        result = await open_upstream(
            plan.order,
            pool,
            app.registry,
            target,
            headers,
            up,
            timeouts=config.timeouts,
            max_header_bytes=max(config.limits.max_header_bytes, 16384),
            conn_id=session.conn_id,
        )
    except UpstreamUnavailable as exc:
        await _refuse(client, session, Rejection(exc.status, exc.reason))
        return None
    if isinstance(result, Refusal):
        log.info(
            "event=refused conn=%s peer=%s pool=%s status=%d reason='backend refused the upgrade'",
            session.conn_id, session.peer, pool.name, result.status,
        )
        await _send_and_close(client, http_response(result.status, result.headers, result.body))
        return None
    backend = result.backend
    session.backend = backend
    cookie = plan.set_cookie if backend is plan.order[0] else cookie_for(pool, backend, tls=tls)
    accepted = result.accepted
    deflate = "permessage-deflate" in accepted.extensions
    unknown = bool(accepted.extensions - {"permessage-deflate"})
    rsv_allowed = RSV_ALL if unknown else (RSV1 if deflate else 0)
    deflate = deflate and not unknown
    max_message = config.limits.max_message_bytes
    session.relay = Relay(
        client,
        result.channel,
        up_scanner=FrameScanner(
            from_client=True, rsv_allowed=rsv_allowed, deflate=deflate, max_message_bytes=max_message
        ),
        down_scanner=FrameScanner(
            from_client=False, rsv_allowed=rsv_allowed, deflate=deflate, max_message_bytes=max_message
        ),
        close_timeout_s=CLOSE_TIMEOUT_S,
    )
    try:
        await client.send(downstream_101(accepted, [(b"Set-Cookie", cookie)] if cookie else ()))
    except (ChannelBroken, BaseException):
        app.registry.state(backend.address).active -= 1
        result.channel.close()
        session.relay = None
        if isinstance(sys.exc_info()[1], ChannelBroken):
            return None
        raise
    return result.channel, result.trailing


_TEXT_PLAIN = (b"Content-Type", b"text/plain; charset=utf-8")


async def _relay(
    client: RawChannel,
    backend: RawChannel,
    session: Session,
    from_client: bytes,
    from_backend: bytes,
    app: App,
) -> None:
    relay = session.relay
    assert relay is not None and session.route is not None and session.backend is not None
    route, backend_cfg = session.route, session.backend
    app.sessions[session.conn_id] = session
    state = app.registry.state(backend_cfg.address)  # active was counted when it was chosen
    state.total += 1
    log.info(
        "event=open conn=%s peer=%s route=%s%s pool=%s backend=%s sticky=%s",
        session.conn_id,
        session.peer,
        route.host,
        route.path,
        route.pool,
        backend_cfg.address,
        session.sticky,
    )
    if app.stopping:  # established while the proxy was shutting down
        relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "proxy shutting down")
    try:
        await relay.run(from_client, from_backend)
    finally:
        state.active -= 1
        del app.sessions[session.conn_id]
        up, down = relay.up.scanner, relay.down.scanner
        log.info(
            "event=close conn=%s peer=%s pool=%s backend=%s by=%s reason=%r client_code=%s backend_code=%s "
            "dur_s=%.3f up_b=%d down_b=%d up_msgs=%d down_msgs=%d",
            session.conn_id,
            session.peer,
            route.pool,
            backend_cfg.address,
            relay.closed_by or "-",
            relay.outcome or "cancelled",
            up.close_code if up.close_code is not None else "-",
            down.close_code if down.close_code is not None else "-",
            time.monotonic() - session.started,
            relay.bytes_up,
            relay.bytes_down,
            up.messages,
            down.messages,
        )
