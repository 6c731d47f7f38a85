"""Dial a backend and complete the upstream half of the handshake (trio shell).

``open_upstream`` tries the planned backends in order, each at most once,
within ``timeouts.connect`` each, and records failures for passive health.
``upgrade`` sends the request built by
``proto.upstream_handshake.upstream_request`` with h11 and reads the backend's answer
with h11 within ``timeouts.upstream_handshake``. The decisions are in
``proto.handshake``; this module only moves bytes and keeps time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import h11
import trio

from ..config.schema import BackendConfig, PoolConfig, TimeoutsConfig
from ..balance.registry import Lease, Registry
from ..errors import LocalOverload, UpstreamUnavailable
from .channel import ChannelBroken, RawChannel, connect
from .overload import RateLimitedWarning
from .contexts import pool_context
from .tls import TlsChannel, TlsHandshakeFailed, backend_server_name, start_client_tls
from ..proto.handshake import HOP_BY_HOP, Accepted, Rejection, Upgrade
from ..proto.upstream_handshake import check_upstream_response, encode_request, parse_response_head
from ..log import log_event
from .session_log import SessionLog

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("wsproxy.edge.upstream")
_overloaded = RateLimitedWarning(log)  # one WARNING a second at most while the proxy is out of fds

#: Largest error response body relayed from a backend that refused an upgrade.
MAX_ERROR_BODY_BYTES = 65536


class UpstreamTimings(Protocol):
    """Where the set-up times of a session's upstream are observed (``control.metrics.Metrics``)."""

    def upstream_connected(self, pool: str, backend: str, seconds: float) -> None: ...

    def upstream_upgraded(self, pool: str, backend: str, seconds: float) -> None: ...


@dataclass(slots=True)
class Refusal:
    """The backend answered the upgrade with a normal HTTP response: pass it on, then close."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class Connected:
    """A backend accepted the upgrade."""

    channel: RawChannel
    backend: BackendConfig
    accepted: Accepted
    trailing: bytes  # bytes that came after its 101
    lease: Lease  # the session's count in the backend's ``active``: the session releases it when it ends


async def open_upstream(
    order: Sequence[BackendConfig],
    pool: PoolConfig,
    registry: Registry,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    up: Upgrade,
    *,
    timeouts: TimeoutsConfig,
    max_header_bytes: int,
    log: SessionLog,
    timings: UpstreamTimings | None = None,
    engine: Engine | None = None,
) -> Connected | Refusal:
    """Try the backends of ``order`` in turn until one accepts the upgrade.

    A refused or timed-out connect, a silent backend and an invalid answer
    move on to the next backend (each is tried once; the plan already holds
    1 + retries of them) and count against the backend's passive health. A
    backend that answers with a plain HTTP response is not retried: the
    response is returned for the client (a 5xx also counts as a failure).
    While a backend is being tried it counts as one more active session, so
    that concurrent handshakes see each other in balancing and max_connections:
    a ``Lease`` taken for each attempt, released when the attempt fails and
    handed to the caller in ``Connected`` when it succeeds (the caller releases it).

    Raises ``UpstreamUnavailable``: 504 when a backend accepted the connection
    but never answered the upgrade, 502 otherwise; ``LocalOverload`` (503 with
    ``Retry-After``) at once when the proxy cannot create or connect a socket
    of its own (``edge.overload``), without counting it against the backend.

    ``timings`` gets the duration of every successful connect (TLS included)
    and of the accepted upgrade: two clock reads and two calls per attempt.
    """
    status = 502
    errors = []
    for backend in order:
        address = backend.address
        lease = registry.lease(address)
        connected = False
        started = trio.current_time()
        try:
            try:
                if backend.tls:
                    with trio.fail_after(timeouts.connect_s):  # TCP and TLS within the one timeout
                        channel = await connect(address.host, address.port)
                        channel = await start_client_tls(
                            channel, pool_context(pool), backend_server_name(pool, address)
                        )
                else:
                    channel = await connect(address.host, address.port, timeout_s=timeouts.connect_s)
            except LocalOverload as exc:
                # The proxy's own sockets ran out: not this backend's failure (no passive-health
                # record), and the next backend would fail the same way (no retry).
                _overloaded.warning("local_overload", log.conn_fields, pool=pool.name, backend=address, reason=exc.reason)
                raise
            except trio.TooSlowError:
                reason = f"connect timed out after {timeouts.connect_s:g}s"
            except OSError as exc:
                reason = f"connect failed: {exc.strerror or exc}"
            except TlsHandshakeFailed as exc:
                reason = str(exc)
            else:
                sent = trio.current_time()
                if timings is not None:
                    timings.upstream_connected(pool.name, str(address), sent - started)
                try:
                    answer = await upgrade(
                        channel,
                        target,
                        headers,
                        up,
                        timeout_s=timeouts.upstream_handshake_s,
                        max_header_bytes=max_header_bytes,
                        engine=engine,
                    )
                except UpstreamUnavailable as exc:
                    channel.close()
                    reason = exc.reason
                    if exc.status == 504:
                        status = 504
                except BaseException:
                    channel.close()
                    raise
                else:
                    if isinstance(answer, Refusal):
                        channel.close()
                        if answer.status >= 500:
                            _failed(registry, pool, backend, f"answered {answer.status} to the upgrade", log)
                        return answer
                    connected = True
                    now = trio.current_time()
                    if timings is not None:
                        timings.upstream_upgraded(pool.name, str(address), now - sent)
                    registry.record_success(pool.name, address, now)
                    return Connected(channel, backend, *answer, lease)
            errors.append(f"{address}: {reason}")
            _failed(registry, pool, backend, reason, log)
        finally:
            if not connected:
                lease.release()
    raise UpstreamUnavailable(status, f"pool {pool.name}: " + "; ".join(errors))


def _failed(registry: Registry, pool: PoolConfig, backend: BackendConfig, reason: str, session: SessionLog) -> None:
    session.conn_event(log, logging.WARNING, "upstream_failed", pool=pool.name, backend=backend.address, reason=reason)
    if pool.passive is not None:
        ejected = registry.record_failure(pool.name, backend.address, pool.backends, trio.current_time(), pool.passive)
        if ejected:
            log_event(
                log,
                logging.WARNING,
                "ejected",
                pool=pool.name,
                backend=backend.address,
                reason=ejected,
            )


async def upgrade(
    stream: RawChannel,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    up: Upgrade,
    *,
    timeout_s: float,
    max_header_bytes: int,
    engine: Engine | None = None,
) -> tuple[Accepted, bytes] | Refusal:
    """Send the upgrade request; return what was negotiated and the bytes after the 101.

    The 101 is parsed by ``parse_response_head`` (the fast path); any other
    answer, or a 101 it does not accept, is handed to h11, which either finds
    it valid after all, returns a ``Refusal`` to relay to the client, or says
    why it is not HTTP. Raises ``UpstreamUnavailable``: 504 when the backend
    stays silent, 502 when its answer is not a valid 101 or not HTTP.

    With the relay ``engine`` and a plain backend whose socket took the whole
    request at once (the usual case), the wait for the answer is the
    engine's (``Engine.wait_readable``: no cancel scope, and the socket is in
    the engine's set already when it relays the session); the rest, an answer
    in several pieces or anything but a 101, continues under a cancel scope.
    """
    deadline = trio.current_time() + timeout_s
    request = encode_request(target, headers)
    buf = bytearray()
    fast = engine is not None and type(stream) is RawChannel
    try:
        if fast:
            request = request[stream.send_ready(request) :]  # usually all of it
            fast = not request
        if fast:
            assert engine is not None
            if not await engine.wait_readable(stream.sock, deadline):
                raise UpstreamUnavailable(504, _silent(timeout_s))
            stream.in_engine = True  # (disabled in the set: the session's relay re-arms it)
            data = stream.receive_ready()
            if data == b"":
                raise UpstreamUnavailable(502, _closed_reason(stream))
            if data:
                buf += data
                accepted = _fast_101(buf, up)
                if accepted is not None:
                    return accepted
        with trio.CancelScope(deadline=deadline):
            if request:
                await stream.send(request)
            while True:
                if b"\r\n\r\n" in buf or b"\n\n" in buf:  # a bare-LF head goes to h11 below
                    break
                if len(buf) > max_header_bytes:
                    raise UpstreamUnavailable(502, f"backend's response head is over {max_header_bytes} bytes")
                data = await stream.receive()
                if not data:
                    raise UpstreamUnavailable(502, _closed_reason(stream))
                buf += data
            accepted = _fast_101(buf, up)
            if accepted is not None:
                return accepted
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
            conn.send(h11.Request(method=b"GET", target=target, headers=headers))
            conn.send(h11.EndOfMessage())
            conn.receive_data(bytes(buf))
            response = await _next_response(stream, conn)
            if isinstance(response, h11.InformationalResponse):
                return _accepted(check_upstream_response(response, up), bytes(conn.trailing_data[0]))
            return await _read_refusal(stream, conn, response)
        raise UpstreamUnavailable(504, _silent(timeout_s))  # scope cancelled
    except h11.ProtocolError as exc:
        raise UpstreamUnavailable(502, f"backend sent invalid HTTP: {exc}") from None
    except ChannelBroken as exc:
        if isinstance(stream, TlsChannel) and stream.pending_error() is not None:
            raise UpstreamUnavailable(502, _closed_reason(stream)) from None
        raise UpstreamUnavailable(502, f"backend connection failed during the upgrade: {exc}") from None


def _silent(timeout_s: float) -> str:
    return f"backend did not answer the upgrade within {timeout_s:g}s"


def _fast_101(buf: bytearray, up: Upgrade) -> tuple[Accepted, bytes] | None:
    """What a 101 in ``buf`` negotiated, and the bytes after it, when the fast parser reads a whole 101 there.

    None for an incomplete head or any other answer (h11's to read). Raises
    ``UpstreamUnavailable`` (502) for a 101 that does not complete the upgrade.
    """
    end = buf.find(b"\r\n\r\n")
    head = parse_response_head(bytes(buf[: end + 4])) if end >= 0 else None
    if head is None or head.status_code != 101:
        return None
    return _accepted(check_upstream_response(head, up), bytes(buf[end + 4 :]))


def _closed_reason(stream: RawChannel) -> str:
    """Why the backend's answer never came: a TLS alert when there was one.

    With TLS 1.3 a client's handshake completes before the server has checked
    the client's certificate, so a backend that requires one the pool lacks
    answers with an alert on the first read (certificate_required, RFC 8446
    §6.2), not during the handshake.
    """
    tls_error = stream.tls_error if isinstance(stream, TlsChannel) else None
    if not tls_error:
        return "backend closed the connection without answering the upgrade"
    reason = f"TLS error from the backend before its answer to the upgrade: {tls_error}"
    if "CERTIFICATE_REQUIRED" in tls_error:
        reason += " (the backend requires a client certificate: set the pool's tls cert and key)"
    return reason


def _accepted(verdict: Accepted | Rejection, trailing: bytes) -> tuple[Accepted, bytes]:
    if isinstance(verdict, Rejection):
        raise UpstreamUnavailable(502, verdict.reason)
    return verdict, trailing


async def _next_response(
    stream: RawChannel, conn: h11.Connection
) -> h11.InformationalResponse | h11.Response:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive()
            if not data:
                raise UpstreamUnavailable(502, _closed_reason(stream))
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event
            continue  # 100 Continue and the like: keep waiting for the answer
        if isinstance(event, h11.Response):
            return event
        raise UpstreamUnavailable(502, f"unexpected answer from the backend: {type(event).__name__}")


async def _read_refusal(stream: RawChannel, conn: h11.Connection, response: h11.Response) -> Refusal:
    """Read a refusing response's body (bounded) so it can be relayed as it was."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive()
            conn.receive_data(data)  # b"" marks EOF, which ends a close-delimited body
            continue
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_ERROR_BODY_BYTES:
                del body[MAX_ERROR_BODY_BYTES:]
                break
            continue
        break  # EndOfMessage or ConnectionClosed
    headers = [
        (name, value)
        for name, value in response.headers.raw_items()
        if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length"
    ]
    return Refusal(response.status_code, headers, bytes(body))
