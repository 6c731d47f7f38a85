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
import time
from typing import TYPE_CHECKING

import h11
import trio

from ..errors import UpstreamUnavailable
from ..proto.frames import RSV1, RSV_ALL, FrameScanner
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
from .upstream import Refusal, dial, upgrade

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


async def handle_connection(stream: trio.SocketStream, app: App, *, tls: bool = False) -> None:
    """Serve one accepted connection; never raises."""
    conn_id = app.next_conn_id()
    try:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
    except OSError:
        await trio.aclose_forcefully(stream)
        return
    session = Session(conn_id, f"{peer_ip}:{peer_port}", app.generation)
    backend_stream: trio.SocketStream | None = None
    try:
        result = await _client_handshake(stream, session)
        if result is None:
            return
        up, head_rest = result
        connected = await _connect_upstream(stream, session, up, peer_ip, peer_port, tls=tls)
        if connected is None:
            return
        backend_stream, from_backend = connected
        await _relay(stream, backend_stream, session, head_rest, from_backend, app)
    except Exception:
        log.exception("event=error conn=%s peer=%s", conn_id, session.peer)
    finally:
        if backend_stream is not None:
            await trio.aclose_forcefully(backend_stream)
        await trio.aclose_forcefully(stream)


async def _refuse(stream: trio.SocketStream, session: Session, rejection: Rejection) -> None:
    log.info(
        "event=refused conn=%s peer=%s status=%d reason=%r",
        session.conn_id,
        session.peer,
        rejection.status,
        rejection.reason,
    )
    await _send_and_close(stream, http_error(rejection))


async def _send_and_close(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await stream.send_all(data)
            # Half-close and let the client read the response before the socket goes.
            await stream.send_eof()
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _client_handshake(stream: trio.SocketStream, session: Session) -> tuple[Upgrade, bytes] | None:
    """Read and check the downstream request; refuse it, or return it with the bytes after it."""
    config = session.generation.config
    limit = config.limits.max_header_bytes
    buf = bytearray()
    head = b""
    with trio.move_on_after(config.timeouts.handshake_s) as scope:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
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
            if b"\n\n" in buf:
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
    stream: trio.SocketStream,
    session: Session,
    up: Upgrade,
    peer_ip: str,
    peer_port: int,
    *,
    tls: bool,
) -> tuple[trio.SocketStream, bytes] | None:
    """Dial a backend and complete its handshake; on failure answer the client and return None.

    Returns the backend stream and the bytes that came after its 101.
    """
    generation = session.generation
    config = generation.config
    route = session.route
    assert route is not None
    pool = config.pools[route.pool]
    candidates = generation.selectors[pool.name].order(pool.backends)
    host_header = next((v for n, v in up.request.headers if n == b"host"), b"")
    target, headers = upstream_request(up, forwarding_headers(peer_ip, peer_port, host_header, tls=tls))
    request = h11.Request(method=b"GET", target=target, headers=headers)
    backend_stream: trio.SocketStream | None = None
    try:
        backend_stream, backend = await dial(
            candidates, config.timeouts.connect_s, conn_id=session.conn_id
        )
        session.backend = backend
        answer = await upgrade(
            backend_stream,
            request,
            up,
            timeout_s=config.timeouts.upstream_handshake_s,
            max_header_bytes=max(config.limits.max_header_bytes, 16384),
        )
    except UpstreamUnavailable as exc:
        if backend_stream is not None:
            await trio.aclose_forcefully(backend_stream)
        await _refuse(stream, session, Rejection(exc.status, f"pool={pool.name} {exc.reason}"))
        return None
    if isinstance(answer, Refusal):
        await trio.aclose_forcefully(backend_stream)
        log.info(
            "event=refused conn=%s peer=%s pool=%s backend=%s status=%d reason='backend refused the upgrade'",
            session.conn_id,
            session.peer,
            pool.name,
            session.backend.address if session.backend else "-",
            answer.status,
        )
        await _send_and_close(stream, http_response(answer.status, answer.headers, answer.body))
        return None
    accepted, from_backend = answer
    deflate = "permessage-deflate" in accepted.extensions
    unknown = bool(accepted.extensions - {"permessage-deflate"})
    rsv_allowed = RSV_ALL if unknown else (RSV1 if deflate else 0)
    max_message = config.limits.max_message_bytes
    session.relay = Relay(
        stream,
        backend_stream,
        up_scanner=FrameScanner(
            from_client=True, rsv_allowed=rsv_allowed, deflate=deflate and not unknown, max_message_bytes=max_message
        ),
        down_scanner=FrameScanner(
            from_client=False, rsv_allowed=rsv_allowed, deflate=deflate and not unknown, max_message_bytes=max_message
        ),
        close_timeout_s=CLOSE_TIMEOUT_S,
    )
    try:
        await stream.send_all(downstream_101(accepted))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await trio.aclose_forcefully(backend_stream)
        return None
    return backend_stream, from_backend


async def _relay(
    client: trio.SocketStream,
    backend: trio.SocketStream,
    session: Session,
    from_client: bytes,
    from_backend: bytes,
    app: App,
) -> None:
    relay = session.relay
    assert relay is not None and session.route is not None and session.backend is not None
    route, backend_cfg = session.route, session.backend
    app.sessions[session.conn_id] = session
    state = app.registry.state(backend_cfg.address)
    state.active += 1
    log.info(
        "event=open conn=%s peer=%s route=%s%s pool=%s backend=%s",
        session.conn_id,
        session.peer,
        route.host,
        route.path,
        route.pool,
        backend_cfg.address,
    )
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
