"""The relay: two pumps that move frames between a client and a backend.

Theory of operation
-------------------
After both handshakes a session is two byte streams, each read by one
``Pump``: *up* reads the client and writes the backend, *down* reads the
backend and writes the client. A pump forwards what its ``FrameScanner``
allows (see ``proto.frames``: never a partial header, never an invalid frame)
and it is the only writer of its destination, so a frame of the proxy's own (a
close frame now; pings later) is written by the pump that owns the destination,
at a frame boundary of what it has forwarded.

``Pump.request_close(frame)`` asks for such a frame. When the pump is waiting
for input and its output is at a boundary, a small task writes the frame at
once; when the pump is in the middle of a frame, the scanner stops at the end
of that frame and the pump writes the close there. Either way the pump then
*discards*: it keeps reading its source only to see that peer's close frame or
EOF. Nothing in the hot path pays for this but one attribute test per chunk.

Endings (the side that owns each reaction in brackets)::

    close frame from a side       relayed like any frame; the session ends when
                                  the backend has closed TCP and the client has
                                  answered (or closed), within close_timeout
    backend EOF without close     client gets the backend failure code (down), up discards
    client EOF without close      backend gets 1001 (up), down discards
    violation by the client       client gets its code (1002/1007/1009), the backend 1001
    violation by the backend      backend gets its code, the client the backend failure code
    keepalive unanswered          the dead side's TCP closes; the other gets 1001 (backend)
                                  or the backend failure code (client)
    finish() (idle, shutdown)     both sides get the codes given

The backend failure code is the route's ``backend_failure_close_code``: 1014
(RFC 6455 registry: "Bad Gateway") by default, or 1011 for clients that reject
1014 (wsproto before 1.3 and clients built on it, the Autobahn client).

A violation found inside a frame whose start was already forwarded (invalid
UTF-8 arriving late in a long text frame) leaves the destination inside that
frame: no close frame can be placed there, so that destination's TCP is closed
without one (§7.1.7 again); the offender still gets its close code.

A close frame that cannot be placed at a boundary (the peer died in the middle
of a frame) is not sent: the connection is closed without it, which is what
RFC 6455 §7.1.7 (_Fail the WebSocket Connection_) allows. Once the first close
frame passes in either direction, the whole session has ``close_timeout_s`` to
finish; then both TCP connections are closed regardless.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from .channel import YIELD_EVERY, ChannelBroken, RawChannel
from ..config.schema import RateConfig
from ..proto.frames import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    FrameScanner,
    encode_close,
    encode_ping,
)
from ..proto.limits import MessageRate

if TYPE_CHECKING:
    from collections.abc import Callable



class Pump:
    """One direction of a session: read ``src``, forward to ``dst``."""

    __slots__ = (
        "relay",
        "side",
        "src",
        "dst",
        "scanner",
        "mask_frames",
        "bytes",
        "waiting",
        "pending",
        "writing",
        "discard",
        "src_eof",
        "dst_gone",
        "close_out",
        "rate",
        "counted",
        "pending_close",
        "ping_payload",
        "ping_written_at",
        "ping_mark",
        "last_ping",
        "_written",
    )

    def __init__(
        self, relay: Relay, side: str, src: RawChannel, dst: RawChannel, scanner: FrameScanner
    ) -> None:
        self.relay = relay
        self.side = side  # the side this pump reads: "client" or "backend"
        self.src = src
        self.dst = dst
        self.scanner = scanner
        self.mask_frames = side == "client"  # frames we write towards the backend are masked
        self.bytes = 0  # forwarded
        self.waiting = False  # inside src.receive()
        self.pending: bytes | None = None  # a close frame to write at the next boundary
        self.writing = False  # a close frame is being written by the inject task
        self.discard = False  # forwarding is over; only watch for the peer's close or EOF
        self.src_eof = False
        self.dst_gone = False
        self.close_out = False  # a close frame (relayed or ours) went to dst
        self.rate: MessageRate | None = None  # limits.max_message_rate for this direction
        self.counted = 0  # messages already charged to the rate
        self.pending_close = False  # ``pending`` is a close frame (then discard), not a ping
        # keepalive, towards dst: the outstanding ping's payload, when it went out, the last ping
        self.ping_payload: bytes | None = None
        self.ping_written_at: float | None = None
        self.ping_mark = 0  # bytes forwarded from that side when the ping went out
        self.last_ping = 0.0
        self._written: trio.Event | None = None

    async def run(self, initial: bytes) -> None:
        """Pump until the source ends (EOF, reset, violation while discarding)."""
        if initial:
            await self._feed(initial)
        src = self.src
        streak = 0
        while not self.src_eof:
            if self.pending is not None and self.scanner.remaining == 0:
                await self._write_pending()  # requested while we were not waiting
            self.waiting = True
            data = await src.receive()
            self.waiting = False
            if self.writing:  # the inject task is writing our close: let it finish first
                assert self._written is not None
                await self._written.wait()
            elif self.pending is not None and self.scanner.remaining == 0:
                # Requested while we waited, and we woke before the inject task ran: the
                # close goes first, what we just read is the peer's and is only watched.
                await self._write_pending()
            streak += 1
            if streak == YIELD_EVERY:  # the channel only yields when it has to wait
                streak = 0
                await trio.lowlevel.checkpoint()
            if not data:
                self.src_eof = True
                self.relay.on_eof(self)
                break
            await self._feed(data)

    async def _feed(self, data: bytes) -> None:
        scanner = self.scanner
        if self.discard:
            scanner.feed(data)
            if scanner.violation is not None:
                self.src_eof = True  # nothing sensible can follow: stop reading
                self.relay.on_eof(self)
            elif scanner.close_seen:
                self.relay.check_done()
            return
        out = scanner.feed(data)
        if out and not self.dst_gone:
            try:
                await self.dst.send(out)
            except ChannelBroken:
                self.dst_gone = True
                self.relay.check_done()
        self.bytes += len(out)
        if self.rate is not None and scanner.messages != self.counted and scanner.violation is None:
            # Charged after forwarding: at most one chunk's messages beyond the rate pass; the
            # close frames then go at the next frame boundary, like a drain's.
            allowed = self.rate.allow(trio.current_time(), scanner.messages - self.counted)
            self.counted = scanner.messages
            if not allowed:
                self.relay.on_policy_violation(self, CLOSE_POLICY_VIOLATION, "message rate over the limit")
        if scanner.violation is not None:
            self.relay.on_violation(self)
        elif scanner.close_seen and not self.close_out:
            self.close_out = True
            self.relay.on_close_relayed(self)
        if self.pending is not None and scanner.remaining == 0:
            await self._write_pending()

    def request_close(self, frame: bytes) -> None:
        """Write ``frame`` (a close frame) to ``dst`` at the next frame boundary, then discard."""
        if self.close_out or self.discard or (self.pending is not None and self.pending_close):
            return
        self._request(frame, close=True)

    def request_ping(self, frame: bytes) -> None:
        """Write ``frame`` (the proxy's own ping) to ``dst`` at the next frame boundary."""
        if self.close_out or self.discard or self.pending is not None or self.dst_gone:
            return
        self._request(frame, close=False)

    def _request(self, frame: bytes, *, close: bool) -> None:
        self.pending = frame
        self.pending_close = close
        if self.writing:
            return  # the inject task writes it after the frame it is writing
        if self.src_eof:
            # The loop is over: write it from a task of its own if a boundary allows it.
            if self.scanner.remaining == 0:
                self.relay.spawn(self._inject)
            else:
                self.pending = None
                self.discard = self.discard or close
        elif self.waiting and self.scanner.remaining == 0:
            self.relay.spawn(self._inject)
        else:
            # Running, or inside a frame: the loop writes it at the next boundary.
            self.scanner.stop_at_boundary = True

    async def _inject(self) -> None:
        if self.pending is None or not (self.waiting or self.src_eof):
            return  # the pump woke up first and handled it
        self.writing = True
        self._written = trio.Event()
        try:
            while self.pending is not None and self.scanner.remaining == 0:
                await self._write_pending()
        finally:
            self.writing = False
            self._written.set()

    async def _write_pending(self) -> None:
        frame = self.pending
        assert frame is not None
        closing = self.pending_close
        self.pending = None
        if closing:
            self.discard = True
        if not self.dst_gone:
            try:
                await self.dst.send(frame)
                if closing:
                    self.close_out = True
                else:
                    self.ping_written_at = trio.current_time()
            except ChannelBroken:
                self.dst_gone = True
        scanner = self.scanner
        resume = scanner.stopped or scanner.stop_at_boundary
        if resume:
            scanner.stop_at_boundary = False
            scanner.stopped = False
        if closing:
            self.relay.arm_deadline()
            if resume:
                scanner.feed(b"")  # what followed the boundary may hold the peer's close frame
            self.relay.check_done()
        elif resume:
            await self._feed(b"")  # forward what followed the boundary


class Relay:
    """Both directions of one established session, and how it ends."""

    __slots__ = (
        "up",
        "down",
        "close_timeout_s",
        "backend_failure_code",
        "outcome",
        "closed_by",
        "kind",
        "_nursery",
        "_deadline",
    )

    def __init__(
        self,
        client: RawChannel,
        backend: RawChannel,
        *,
        up_scanner: FrameScanner,
        down_scanner: FrameScanner,
        close_timeout_s: float,
        message_rate: RateConfig | None = None,
        backend_failure_code: int = CLOSE_BAD_GATEWAY,
    ) -> None:
        self.up = Pump(self, "client", client, backend, up_scanner)
        self.down = Pump(self, "backend", backend, client, down_scanner)
        if message_rate is not None:
            self.up.rate = MessageRate(message_rate)
            self.down.rate = MessageRate(message_rate)
        self.close_timeout_s = close_timeout_s
        self.backend_failure_code = backend_failure_code  # to the client when the backend fails
        self.outcome = ""  # why the session ended, for the log
        self.kind = ""  # the same as one word, for metrics
        self.closed_by = ""  # "client", "backend" or "proxy": who started the ending
        self._nursery: trio.Nursery | None = None
        self._deadline: float | None = None  # set by the first close frame

    async def run(self, from_client: bytes = b"", from_backend: bytes = b"") -> None:
        """Relay until the session is over; ``from_*`` arrived with the handshakes."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._deadline is not None:  # finish() came before run()
                nursery.cancel_scope.deadline = self._deadline
            nursery.start_soon(self._run_pump, self.up, from_client)
            await self._run_pump(self.down, from_backend)
        self._nursery = None

    async def _run_pump(self, pump: Pump, initial: bytes) -> None:
        await pump.run(initial)
        self.check_done()

    def spawn(self, fn: Callable[[], object]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn)  # type: ignore[arg-type]

    # -- events from the pumps ------------------------------------------------

    def _start_ending(self, by: str, outcome: str, kind: str) -> None:
        if not self.closed_by:
            self.closed_by = by
            self.outcome = outcome
            self.kind = kind

    def outcome_kind(self) -> str:
        """The ending as one of a few words, for metrics labels."""
        return self.kind or "error"

    def on_close_relayed(self, pump: Pump) -> None:
        """``pump`` forwarded its source's close frame."""
        self._start_ending(pump.side, "close", "normal")
        self.arm_deadline()
        self.check_done()

    def on_eof(self, pump: Pump) -> None:
        """``pump``'s source is gone (EOF, reset, or garbage while discarding)."""
        if not pump.scanner.close_seen and not pump.discard:
            # The peer vanished without a close frame: tell the other side, which is
            # written by this same pump (up writes the backend, down the client).
            if pump is self.up:
                self._start_ending("client", "client vanished", "client_gone")
                frame = encode_close(CLOSE_GOING_AWAY, "client went away", mask=os.urandom(4))
            else:
                self._start_ending("backend", "backend vanished", "backend_gone")
                frame = encode_close(self.backend_failure_code, "backend went away")
            other = self.down if pump is self.up else self.up
            other.discard = True  # its destination is the peer that vanished
            pump.request_close(frame)
            if pump.pending is None and not pump.close_out:
                # It died inside a frame: no close frame can be placed, close TCP now.
                self._cancel()
                return
            self.arm_deadline()
        self.check_done()

    def on_violation(self, pump: Pump) -> None:
        """``pump``'s source broke the protocol: its code to it, 1001 to the other side."""
        violation = pump.scanner.violation
        assert violation is not None
        code = violation.close_code
        kind = "too_big" if code == CLOSE_MESSAGE_TOO_BIG else "invalid_data" if code == CLOSE_INVALID_DATA else "protocol_error"
        self._start_ending("proxy", f"{pump.side} protocol error: {violation.reason}", kind)
        other = self.down if pump is self.up else self.up
        if pump.scanner.remaining:
            # Found inside a frame already started on the other stream: nothing can be
            # placed there, so that destination's TCP closes without a close frame.
            pump.dst_gone = True
            pump.discard = True
        elif pump is self.up:
            # The scanner stopped before the offending frame, so this pump's output is at
            # a boundary: the backend gets 1001 from it (written when its chunk is done)...
            pump.request_close(self._close_frame(pump, CLOSE_GOING_AWAY, "peer protocol error"))
        else:
            pump.request_close(encode_close(self.backend_failure_code, f"backend protocol error: {violation.reason}"))
        # ...and the offender gets its code from the pump that writes to it.
        other.request_close(self._close_frame(other, code, violation.reason))
        self.check_done()

    def on_policy_violation(self, pump: Pump, code: int, reason: str) -> None:
        """``pump``'s source broke a limit (not the protocol): ``code`` to it, 1001 to the other side."""
        if self.closed_by:
            return
        self._start_ending("proxy", f"{pump.side} {reason}", "rate_limited")
        self.arm_deadline()
        other = self.down if pump is self.up else self.up
        if pump is self.up:
            pump.request_close(self._close_frame(pump, CLOSE_GOING_AWAY, "peer policy violation"))
        else:
            pump.request_close(encode_close(self.backend_failure_code, f"backend {reason}"))
        other.request_close(self._close_frame(other, code, reason))

    def keepalive(self, now: float, interval_s: float, timeout_s: float) -> None:
        """Ping both sides every ``interval_s``; a side whose pong is ``timeout_s`` late is dead.

        Called periodically (by the app's sweeper). The ping goes out at a frame
        boundary of the stream towards that side; the timeout runs from when it
        went out, or from the last time bytes came from that side (a peer in the
        middle of a long frame cannot answer yet, but is not dead), and the pong
        is taken out of the stream by the scanner that reads that side, so the
        other side never sees it.
        """
        if self.closed_by:
            return
        for writer, reader, side in ((self.down, self.up, "client"), (self.up, self.down, "backend")):
            if writer.ping_payload is not None:
                if reader.scanner.swallow_pong is None:  # answered
                    writer.ping_payload = None
                    writer.ping_written_at = None
                elif writer.ping_written_at is not None:
                    if reader.bytes != writer.ping_mark:
                        # Bytes keep coming from that side (say, one long frame it cannot put
                        # a pong into): it is alive; its pong may come later.
                        writer.ping_mark = reader.bytes
                        writer.ping_written_at = now
                    elif now - writer.ping_written_at >= timeout_s:
                        self.peer_dead(side, timeout_s)
                        return
                continue
            if not writer.last_ping:
                writer.last_ping = now  # the session's first look: the interval starts now
            elif now - writer.last_ping >= interval_s:
                payload = os.urandom(8)
                writer.ping_payload = payload
                writer.ping_mark = reader.bytes
                writer.last_ping = now
                reader.scanner.swallow_pong = payload
                writer.request_ping(encode_ping(payload, mask=os.urandom(4) if writer.mask_frames else None))

    def peer_dead(self, side: str, timeout_s: float) -> None:
        """``side`` did not answer the keepalive ping: tell the other side, drop the dead one."""
        if side == "backend":
            self._start_ending("proxy", f"backend did not answer a ping within {timeout_s:g}s", "keepalive")
            self.up.dst_gone = True  # nothing more goes to the dead backend...
            self.up.discard = True  # ...and the client's close reply is only watched for
            self.down.request_close(encode_close(self.backend_failure_code, "backend not responding"))
        else:
            self._start_ending("proxy", f"client did not answer a ping within {timeout_s:g}s", "keepalive")
            self.down.dst_gone = True  # nothing more goes to the dead client
            self.down.discard = True
            self.up.request_close(encode_close(CLOSE_GOING_AWAY, "client not responding", mask=os.urandom(4)))
        self.arm_deadline()
        self.check_done()

    def finish(self, client_code: int, backend_code: int, reason: str, kind: str = "") -> None:
        """End the session from the proxy's side (idle timeout, shutdown, drain)."""
        if not kind:
            kind = "idle" if "idle" in reason else "shutdown" if "shutting down" in reason else "drain" if "drain" in reason else "error"
        self._start_ending("proxy", reason, kind)
        self.arm_deadline()
        self.down.request_close(encode_close(client_code, reason))
        self.up.request_close(encode_close(backend_code, reason, mask=os.urandom(4)))

    @staticmethod
    def _close_frame(pump: Pump, code: int, reason: str) -> bytes:
        return encode_close(code, reason, mask=os.urandom(4) if pump.mask_frames else None)

    def arm_deadline(self) -> None:
        """From the first close frame on, the session has close_timeout_s to end."""
        if self._deadline is None:
            self._deadline = trio.current_time() + self.close_timeout_s
            if self._nursery is not None:
                self._nursery.cancel_scope.deadline = self._deadline

    def check_done(self) -> None:
        """End the session once both TCP connections may close.

        The backend's may close when it has closed it (it is the WebSocket
        server: RFC 6455 §7.1.1 lets it close TCP first, and the TIME_WAIT
        stays on its side, not on our ephemeral ports), or when it broke the
        protocol and has had our close frame. The client's may close when it
        has gone, when it has both received and sent a close frame, or when it
        broke the protocol and has had our close frame.
        """
        up, down = self.up, self.down
        backend_done = (
            down.src_eof or up.dst_gone or (down.scanner.violation is not None and up.close_out)
        )
        client_done = (
            up.src_eof
            or down.dst_gone
            or (down.close_out and (up.scanner.close_seen or up.scanner.violation is not None))
        )
        if backend_done and client_done:
            self._cancel()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes
