"""The admin API's HTTP: one connection's requests, read with h11 and answered (trio shell).

What each request gets is ``control.admin_routes``' (the routes, the token, the answers); here is
only the HTTP around it.

Limits: a request head of at most 16 KiB (431 beyond), a body of at most 64
KiB (413 beyond; read by the close routes, ignored elsewhere), 10 s for a whole request from
its first byte being awaited to the last byte of the answer (an idle
keep-alive connection is closed after that long). A malformed request gets
the status h11 hints (400, 431...) and its connection is closed; the listener
goes on serving.

This module is not the App: what the numbers and the status say, and what
draining does, is the App's (``AdminApp``). Nor is it the listener
(``control.admin``: binding, reloads).
"""

from __future__ import annotations

import logging
import socket

import h11
import trio

from ..config.schema import hostport
from ..edge.channel import ChannelBroken, RawChannel
from ..log import log_event
from .admin_policy import AdminSite
from .admin_routes import (
    METRICS,
    RELOAD,
    UPGRADE,
    AdminState,
    Answer,
    Later,
    respond,
    answer_reload,
    answer_upgrade,
    finish,
    text,
)

# One logger for everything the admin listener does, so an operator follows one name.
log = logging.getLogger("wsproxy.control.admin")

MAX_HEAD_BYTES = 16 * 1024  # request line and headers
MAX_BODY_BYTES = 64 * 1024  # a POST body (read by the close routes, ignored elsewhere)
REQUEST_TIMEOUT_S = 10.0  # one request, from waiting for it to the end of the answer
CLOSE_LINGER_S = 2.0  # after the last answer, for the client to read it before the socket goes


# -- one connection ------------------------------------------------------------------------------


async def serve_connection(sock: socket.socket, server: AdminState, site: AdminSite) -> None:
    """Answer requests on one connection until it closes, errs or idles; never raises."""
    channel = RawChannel(sock)
    peer = _peer(sock)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT_S) as scope:
                again = await _one_request(channel, conn, server, site, peer, scope)
            if scope.cancelled_caught:
                return  # slow, or idle between requests: nothing more to say
            if not again:
                break
            conn.start_next_cycle()
        if conn.their_state is not h11.CLOSED:
            await _close_gently(channel)
    except ChannelBroken:
        pass
    except Exception:
        log_event(log, logging.ERROR, "error", exc_info=True, listener='admin', peer=peer)
    finally:
        channel.close()


async def _one_request(
    channel: RawChannel, conn: h11.Connection, server: AdminState, site: AdminSite, peer: str, scope: trio.CancelScope
) -> bool:
    """Read one request and answer it; True if the connection may carry another."""
    try:
        request = await _read_head(channel, conn)
        if not isinstance(request, h11.Request):
            return False  # closed between requests
        body: list[bytes] = []
        body_bytes = 0
        while True:
            event = await _next_event(channel, conn)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.Data):
                body_bytes += len(event.data)
                body.append(bytes(event.data))
                if body_bytes > MAX_BODY_BYTES:
                    await _send(channel, conn, request, text(413, f"request body over {MAX_BODY_BYTES} bytes"), close=True)
                    return False
            elif isinstance(event, h11.ConnectionClosed):
                return False
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send(channel, conn, None, text(exc.error_status_hint, f"malformed request: {exc}"), close=True)
        return False
    answer = respond(request, server, site, peer, b"".join(body))
    if isinstance(answer, Later):  # a supervisor asking its workers (a few seconds at most)
        scope.deadline = max(scope.deadline, trio.current_time() + REQUEST_TIMEOUT_S)
        answer = await finish(answer, request.method, request.target)
    if answer is METRICS:
        accept = b", ".join(v for n, v in request.headers if n == b"accept").decode("latin-1")
        content_type, exposition = await server.app.render_metrics_off_loop(accept)
        answer = 200, [(b"Content-Type", content_type.encode())], exposition
    if answer is RELOAD:
        # A reload may take up to timeouts.reload: the request's own deadline grows to match.
        scope.deadline = max(scope.deadline, trio.current_time() + server.reload_timeout_s + REQUEST_TIMEOUT_S)
        answer = await answer_reload(server, peer)
    elif answer is UPGRADE:  # workers > 1: waits until the new generation serves (up to a minute)
        scope.deadline = max(scope.deadline, trio.current_time() + 60 + REQUEST_TIMEOUT_S)
        answer = await answer_upgrade(server, peer)
    await _send(channel, conn, request, answer)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_head(channel: RawChannel, conn: h11.Connection) -> h11.Event:
    """The next request (or ConnectionClosed), its head at most ``MAX_HEAD_BYTES``.

    h11's ``max_incomplete_event_size`` only bounds a head still incomplete
    after a receive; one that arrives whole in a single receive is measured here.
    """
    buffered = len(conn.trailing_data[0])  # pipelined bytes left over from the previous request
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)
            if isinstance(event, h11.Request) and buffered - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError(f"request head over {MAX_HEAD_BYTES} bytes", error_status_hint=431)
            return event
        data = await channel.receive()
        buffered += len(data)
        conn.receive_data(data)  # b"" at EOF: h11 makes it ConnectionClosed


async def _next_event(channel: RawChannel, conn: h11.Connection) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert not isinstance(event, type)  # PAUSED: only after EndOfMessage, and we stop there
            return event
        conn.receive_data(await channel.receive())  # b"" at EOF: h11 makes it ConnectionClosed


async def _close_gently(channel: RawChannel) -> None:
    """Half-close, then let the client read the answer before the socket goes (RFC 7230 §6.6)."""
    channel.send_eof()
    with trio.move_on_after(CLOSE_LINGER_S):
        while await channel.receive():
            pass


def _peer(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "-"
    if isinstance(name, tuple):
        return hostport(name[0], name[1])
    return "unix"


async def _send(
    channel: RawChannel, conn: h11.Connection, request: h11.Request | None, answer: Answer, *, close: bool = False
) -> None:
    status, headers, body = answer
    if status != 204:  # RFC 9110 §8.6: no Content-Length on a 204
        headers = [*headers, (b"Content-Length", b"%d" % len(body))]
    headers = [*headers, (b"Cache-Control", b"no-store")]
    if close:
        headers.append((b"Connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if request is None or request.method != b"HEAD":
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await channel.send(data)
