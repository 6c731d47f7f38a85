"""How a relayed session moves bytes and how it ends: a sans-I/O machine. No I/O here, no trio.

A driver (the epoll engine in ``edge.engine``, or the per-session trio pumps in
``edge.relay`` for TLS and non-Linux systems) owns the two sockets. It calls
``feed`` with what it read from a side, ``eof`` when a side ended, and
``broken`` when a side could not be written; it sends whatever the machine has
queued in each direction's ``out`` list, in order; it closes both connections
once ``done`` is true, or when ``deadline`` passes. The control path calls
``finish`` (idle timeout, drain, shutdown) and ``keepalive``. Nothing here
allocates or branches per frame beyond the scanner's own work: a relayed chunk
costs one ``FrameScanner.feed`` and one list append.

Theory of operation
-------------------
A session is two ``Direction`` objects: *up* reads the client and writes the
backend, *down* reads the backend and writes the client. Each forwards what its
``FrameScanner`` allows (never a partial header, never an invalid frame), so
the bytes queued towards a destination always end inside a data frame's payload
or at a frame boundary. A frame of the proxy's own (a close frame, a ping) is
queued by the direction that writes its destination, at a boundary of what it
has forwarded: at once when the scanner is at a boundary, otherwise the scanner
is told to stop at the end of the current frame and the frame goes there.

After a close frame of its own, a direction *discards*: it keeps reading its
source only to see that peer's close frame or EOF.

Endings (who gets what)::

    close frame from a side       relayed like any frame; the session ends when
                                  the backend has closed TCP and the client has
                                  answered (or closed), within close_timeout_s
    backend EOF without close     client gets the backend failure code
    client EOF without close      backend gets 1001
    violation by the client       client gets its code (1002/1007/1009), backend 1001
    violation by the backend      backend gets its code, client the failure code
    over the message rate         sender 1008; the other 1001 / the failure code
    keepalive unanswered          the dead side's TCP closes; the other side gets
                                  1001 (to the backend) or the failure code
    finish() (idle, drain, stop)  both sides get the codes given

The backend failure code is the route's ``backend_failure_close_code`` (1014
by default, 1011 for clients that refuse 1014).

A close frame that cannot be placed at a boundary (the peer died, or broke
UTF-8, inside a frame already started on the other stream) is not sent: that
connection is closed without it (RFC 6455 §7.1.7). From the first close frame
on, the session has ``close_timeout_s`` to finish (``deadline``).

Outcomes are values: ``closed_by`` is a ``By`` and ``kind`` an ``Outcome``;
``reason`` is the human sentence for the log only.
"""

from __future__ import annotations

import os
from enum import Enum

from .frames import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    FrameScanner,
    encode_close,
    encode_ping,
)
from .limits import MessageRate


class By(str, Enum):
    """Who started a session's ending."""

    NONE = "-"
    CLIENT = "client"
    BACKEND = "backend"
    PROXY = "proxy"


class Outcome(str, Enum):
    """How a session ended, one word for metrics labels."""

    NORMAL = "normal"
    CLIENT_GONE = "client_gone"
    BACKEND_GONE = "backend_gone"
    PROTOCOL_ERROR = "protocol_error"
    INVALID_DATA = "invalid_data"
    TOO_BIG = "too_big"
    RATE_LIMITED = "rate_limited"
    IDLE = "idle"
    SHUTDOWN = "shutdown"
    DRAIN = "drain"
    KEEPALIVE = "keepalive"
    ADMIN = "admin"  # an operator closed it (the sessions API)
    IDENTITY_LIMIT = "identity_limit"  # closed to make room under limits.max_sessions_per_identity
    ERROR = "error"
    TOKEN_EXPIRED = "token_expired"  # routes[].auth.enforce_expiry, forward.lifetime_from (proto.lifetime)
    REVOKED = "revoked"  # routes[].auth.revoked_file, after a reload
    LIFETIME = "lifetime"  # routes[].max_session_age
    REBALANCE = "rebalance"  # pools.NAME.rebalance


class Direction:
    """One direction of a session: what is read from ``side`` goes to the other side."""

    __slots__ = (
        "side",
        "scanner",
        "mask_frames",
        "out",
        "bytes",
        "pending",
        "pending_close",
        "discard",
        "src_eof",
        "dst_gone",
        "close_out",
        "own_close_code",
        "rate",
        "counted",
        "ping_payload",
        "ping_written_at",
        "ping_mark",
        "last_ping",
    )

    def __init__(self, side: By, scanner: FrameScanner) -> None:
        self.side = side  # the side this direction reads
        self.scanner = scanner
        self.mask_frames = side is By.CLIENT  # frames of ours towards the backend are masked
        #: bytes queued for the destination, in order; the driver sends and clears them
        self.out: list[bytes] = []
        self.bytes = 0  # forwarded
        self.pending: bytes | None = None  # a frame of ours waiting for the next boundary
        self.pending_close = False  # ``pending`` is a close frame (then discard), not a ping
        self.discard = False  # forwarding is over; only watch for the peer's close or EOF
        self.src_eof = False
        self.dst_gone = False
        self.close_out = False  # a close frame (relayed or ours) went to the destination
        self.own_close_code: int | None = None  # the code of a close frame of ours that went there
        self.rate: MessageRate | None = None  # limits.max_message_rate for this direction
        self.counted = 0  # messages already charged to the rate
        # keepalive, towards the destination: the outstanding ping, when it went out, ...
        self.ping_payload: bytes | None = None
        self.ping_written_at: float | None = None
        self.ping_mark = 0  # ...bytes forwarded from that side when it went out
        self.last_ping = 0.0

    @property
    def wants_input(self) -> bool:
        """Should the driver read this direction's source?"""
        return not self.src_eof


class RelayMachine:
    """Both directions of one established session, and how it ends."""

    __slots__ = (
        "up",
        "down",
        "close_timeout_s",
        "backend_failure_code",
        "closed_by",
        "kind",
        "reason",
        "deadline",
        "done",
        "now",
    )

    def __init__(
        self,
        up_scanner: FrameScanner,
        down_scanner: FrameScanner,
        *,
        close_timeout_s: float,
        backend_failure_code: int = CLOSE_BAD_GATEWAY,
        message_rate: MessageRate | None = None,
        message_rate_down: MessageRate | None = None,
    ) -> None:
        self.up = Direction(By.CLIENT, up_scanner)
        self.down = Direction(By.BACKEND, down_scanner)
        self.up.rate = message_rate
        self.down.rate = message_rate_down
        self.close_timeout_s = close_timeout_s
        self.backend_failure_code = backend_failure_code  # to the client when the backend fails
        self.closed_by = By.NONE  # who started the ending
        self.kind = Outcome.ERROR  # how, once closed_by is set
        self.reason = ""  # the same for the log
        #: set by the first close frame: the session must be over by then
        self.deadline: float | None = None
        #: both connections may close now
        self.done = False
        self.now = 0.0  # the driver's clock at the last call

    # -- input from the driver --------------------------------------------------------

    def feed(self, d: Direction, data: bytes, now: float) -> None:
        """``data`` was read from ``d``'s source."""
        self.now = now
        scanner = d.scanner
        if d.discard:
            scanner.feed(data)
            if scanner.violation is not None:
                d.src_eof = True  # nothing sensible can follow: stop reading
                self._on_eof(d)
            elif scanner.close_seen:
                self._check_done()
            return
        out = scanner.feed(data)
        if out:
            if not d.dst_gone:
                d.out.append(out)
            d.bytes += len(out)
        if d.rate is not None and scanner.messages != d.counted and scanner.violation is None:
            # Charged after forwarding: at most one chunk's messages beyond the rate pass;
            # the close frames then go at the next frame boundary, like a drain's.
            allowed = d.rate.allow(now, scanner.messages - d.counted)
            d.counted = scanner.messages
            if not allowed:
                self._policy_violation(d, CLOSE_POLICY_VIOLATION, d.rate.reason)
        if scanner.violation is not None:
            self._violation(d)
        elif scanner.close_seen and not d.close_out:
            d.close_out = True
            self._start_ending(d.side, Outcome.NORMAL, "close")
            self._arm_deadline()
            self._check_done()
        if d.pending is not None and scanner.remaining == 0:
            self._write_pending(d)

    def eof(self, d: Direction, now: float) -> None:
        """``d``'s source is gone (EOF or reset)."""
        self.now = now
        if not d.src_eof:
            d.src_eof = True
            self._on_eof(d)

    def broken(self, d: Direction) -> None:
        """``d``'s destination cannot be written any more."""
        d.dst_gone = True
        d.out.clear()
        self._check_done()

    def finish(self, client_code: int, backend_code: int, reason: str, kind: Outcome, now: float) -> None:
        """End the session from the proxy's side (idle timeout, drain, shutdown)."""
        self.now = now
        self._start_ending(By.PROXY, kind, reason)
        self._arm_deadline()
        self._request(self.down, encode_close(client_code, reason), close=True)
        self._request(self.up, encode_close(backend_code, reason, mask=os.urandom(4)), close=True)

    def keepalive(self, now: float, interval_s: float, timeout_s: float) -> None:
        """Ping both sides every ``interval_s``; a side whose pong is ``timeout_s`` late is dead.

        The ping goes out at a frame boundary of the stream towards that side;
        the timeout runs from when it went out, or from the last time bytes came
        from that side (a peer in the middle of a long frame cannot answer yet,
        but is not dead). The pong is taken out of the stream by the scanner
        that reads that side, so the other side never sees it.
        """
        self.now = now
        if self.closed_by is not By.NONE:
            return
        for writer, reader in ((self.down, self.up), (self.up, self.down)):
            if writer.ping_payload is not None:
                if reader.scanner.swallow_pong is None:  # answered
                    writer.ping_payload = None
                    writer.ping_written_at = None
                elif writer.ping_written_at is not None:
                    if reader.bytes != writer.ping_mark:
                        writer.ping_mark = reader.bytes  # bytes keep coming: alive
                        writer.ping_written_at = now
                    elif now - writer.ping_written_at >= timeout_s:
                        self._peer_dead(reader.side, timeout_s)
                        return
                continue
            if not writer.last_ping:
                writer.last_ping = now  # the session's first look: the interval starts now
            elif now - writer.last_ping >= interval_s:
                if writer.close_out or writer.discard or writer.pending is not None or writer.dst_gone:
                    continue
                payload = os.urandom(8)
                writer.ping_payload = payload
                writer.ping_mark = reader.bytes
                writer.last_ping = now
                reader.scanner.swallow_pong = payload
                self._request(writer, encode_ping(payload, mask=os.urandom(4) if writer.mask_frames else None), close=False)

    def expired(self, now: float) -> bool:
        """Has the close deadline passed? (Then the driver closes both connections.)"""
        return self.deadline is not None and now >= self.deadline

    # -- the rules -----------------------------------------------------------------

    def _start_ending(self, by: By, kind: Outcome, reason: str) -> None:
        if self.closed_by is By.NONE:
            self.closed_by = by
            self.kind = kind
            self.reason = reason

    def _arm_deadline(self) -> None:
        if self.deadline is None:
            self.deadline = self.now + self.close_timeout_s

    def _request(self, d: Direction, frame: bytes, *, close: bool) -> None:
        """Queue ``frame`` towards ``d``'s destination at the next boundary of what ``d`` forwards."""
        if d.close_out or d.discard or (d.pending is not None and (d.pending_close or not close)):
            return
        d.pending = frame
        d.pending_close = close
        scanner = d.scanner
        if scanner.remaining == 0:
            self._write_pending(d)
        elif d.src_eof:
            # Its source died inside a frame: nothing can be placed on that stream.
            d.pending = None
            d.discard = d.discard or close
        else:
            scanner.stop_at_boundary = True  # the next feed stops at the frame's end

    def _write_pending(self, d: Direction) -> None:
        frame = d.pending
        assert frame is not None
        closing = d.pending_close
        d.pending = None
        if closing:
            d.discard = True
        if not d.dst_gone:
            d.out.append(frame)
            if closing:
                d.close_out = True
                d.own_close_code = close_code_of(frame)
            else:
                d.ping_written_at = self.now
        scanner = d.scanner
        resume = scanner.stopped or scanner.stop_at_boundary
        if resume:
            scanner.stop_at_boundary = False
            scanner.stopped = False
        if closing:
            self._arm_deadline()
            if resume:
                scanner.feed(b"")  # what followed the boundary may hold the peer's close frame
            self._check_done()
        elif resume:
            self.feed(d, b"", self.now)  # forward what followed the boundary

    def _other(self, d: Direction) -> Direction:
        return self.down if d is self.up else self.up

    def _close_to(self, d: Direction, code: int, reason: str) -> bytes:
        """A close frame for ``d``'s destination (masked towards the backend)."""
        return encode_close(code, reason, mask=os.urandom(4) if d.mask_frames else None)

    def _on_eof(self, d: Direction) -> None:
        if not d.scanner.close_seen and not d.discard:
            # The peer vanished without a close frame: tell the other side, which is
            # written by this same direction (up writes the backend, down the client).
            if d is self.up:
                self._start_ending(By.CLIENT, Outcome.CLIENT_GONE, "client vanished")
                frame = self._close_to(d, CLOSE_GOING_AWAY, "client went away")
            else:
                self._start_ending(By.BACKEND, Outcome.BACKEND_GONE, "backend vanished")
                frame = self._close_to(d, self.backend_failure_code, "backend went away")
            self._other(d).discard = True  # its destination is the peer that vanished
            self._request(d, frame, close=True)
            if d.pending is None and not d.close_out:
                self._end()  # it died inside a frame: no close can be placed, close TCP now
                return
            self._arm_deadline()
        self._check_done()

    def _violation(self, d: Direction) -> None:
        """``d``'s source broke the protocol: its code to it; 1001 or the failure code to the other side."""
        violation = d.scanner.violation
        assert violation is not None
        code = violation.close_code
        kind = (
            Outcome.TOO_BIG if code == CLOSE_MESSAGE_TOO_BIG
            else Outcome.INVALID_DATA if code == CLOSE_INVALID_DATA
            else Outcome.PROTOCOL_ERROR
        )  # fmt: skip
        # A message over the size limit breaks a limit, not the protocol: said so in the
        # log and to the other side (the codes are the same: 1009 to it, 1001 or the failure code).
        too_big = kind is Outcome.TOO_BIG
        fault = f"sent a {violation.reason}" if too_big else f"protocol error: {violation.reason}"
        self._start_ending(By.PROXY, kind, f"{d.side.value} {fault}")
        self._arm_deadline()
        other = self._other(d)
        if d.scanner.remaining:
            # Found inside a frame already started on the other stream: nothing can be
            # placed there, so that destination's TCP closes without a close frame.
            d.dst_gone = True
            d.discard = True
            d.out.clear()
        elif d is self.up:
            # The scanner stopped before the offending frame: d's output is at a boundary.
            peer = "peer sent a message too big" if too_big else "peer protocol error"
            self._request(d, self._close_to(d, CLOSE_GOING_AWAY, peer), close=True)
        else:
            self._request(d, self._close_to(d, self.backend_failure_code, f"backend {fault}"), close=True)
        # The offender gets its code from the direction that writes to it.
        self._request(other, self._close_to(other, code, violation.reason), close=True)
        self._check_done()

    def _policy_violation(self, d: Direction, code: int, reason: str) -> None:
        """``d``'s source broke a limit (not the protocol): ``code`` to it, 1001 or the failure code to the other."""
        if self.closed_by is not By.NONE:
            return
        self._start_ending(By.PROXY, Outcome.RATE_LIMITED, f"{d.side.value} {reason}")
        self._arm_deadline()
        if d is self.up:
            self._request(d, self._close_to(d, CLOSE_GOING_AWAY, "peer policy violation"), close=True)
        else:
            self._request(d, self._close_to(d, self.backend_failure_code, f"backend {reason}"), close=True)
        other = self._other(d)
        self._request(other, self._close_to(other, code, reason), close=True)

    def _peer_dead(self, side: By, timeout_s: float) -> None:
        """``side`` did not answer the keepalive ping: tell the other side, drop the dead one."""
        self._start_ending(By.PROXY, Outcome.KEEPALIVE, f"{side.value} did not answer a ping within {timeout_s:g}s")
        if side is By.BACKEND:
            self.up.dst_gone = True  # nothing more goes to the dead backend...
            self.up.discard = True  # ...and the client's close reply is only watched for
            self.up.out.clear()
            self._request(self.down, encode_close(self.backend_failure_code, "backend not responding"), close=True)
        else:
            self.down.dst_gone = True  # nothing more goes to the dead client
            self.down.discard = True
            self.down.out.clear()
            self._request(self.up, encode_close(CLOSE_GOING_AWAY, "client not responding", mask=os.urandom(4)), close=True)
        self._arm_deadline()
        self._check_done()

    def _check_done(self) -> None:
        """Both TCP connections may close.

        The backend's may close when it has closed it (it is the WebSocket
        server: RFC 6455 §7.1.1 lets it close TCP first, and the TIME_WAIT
        stays on its side, not on our ephemeral ports), or when it broke the
        protocol and has had our close frame. The client's may close when it
        has gone, when it has both received and sent a close frame, or when it
        broke the protocol and has had our close frame.
        """
        up, down = self.up, self.down
        backend_done = down.src_eof or up.dst_gone or (down.scanner.violation is not None and up.close_out)
        client_done = (
            up.src_eof
            or down.dst_gone
            or (down.close_out and (up.scanner.close_seen or up.scanner.violation is not None))
        )
        if backend_done and client_done:
            self._end()

    def _end(self) -> None:
        """Both connections may close once what is queued has gone out (bounded by the deadline)."""
        self.done = True
        self._arm_deadline()

    def abort(self, reason: str) -> None:
        """The driver failed while serving this session: it ends now, as an error."""
        self._start_ending(By.PROXY, Outcome.ERROR, reason)
        self.done = True

    # -- counters, read at scrape time -------------------------------------------------

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes


def close_code_of(frame: bytes) -> int | None:
    """The status code of a close frame made by ``encode_close`` (RFC 6455 §5.5.1: payload under 126 bytes).

    Read once per close frame of the proxy's own, for the metrics' ``sent_by="proxy"``;
    never per relayed frame.
    """
    if len(frame) >= 8 and frame[1] & 0x80:  # masked (towards a backend): 4 mask bytes first
        return ((frame[6] ^ frame[2]) << 8) | (frame[7] ^ frame[3])
    if len(frame) >= 4 and not frame[1] & 0x80:
        return (frame[2] << 8) | frame[3]
    return None
