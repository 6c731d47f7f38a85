"""The relay's trio driver: two pumps per session moving bytes for the relay machine.

Used for TLS sessions (the ``ssl.SSLObject`` channel is driven by trio) and on
systems without ``select.epoll``; plain sessions on Linux are relayed by the
epoll engine (``edge.engine``). Both drivers leave every decision to
``proto.relay.RelayMachine``: this module only reads, writes and waits.

Each pump reads one side and, after feeding the machine, writes what the
machine queued in its own direction before it reads again (back-pressure: a
slow destination stops the reading of its source). Frames the machine queues
in the other direction (a close frame for the offender, a ping) are written by
a short task unless that direction's pump is already writing; one writer per
destination at a time, so bytes never interleave. The session ends when the
machine says ``done`` (after the queued bytes went out) or at its close
deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..proto.relay import Direction, Outcome, RelayMachine
from .channel import YIELD_EVERY, ChannelBroken, RawChannel

if TYPE_CHECKING:
    from ..proto.frames import FrameScanner
    from ..proto.limits import MessageRate


class RelayDriver:
    """What both drivers share: the session's machine and its control surface.

    The control path (sweeper, drains, shutdown) calls ``finish`` and
    ``keepalive``; a driver reacts to what the machine then queued in
    ``_changed`` (the trio pumps start writers, the engine sends at once).
    """

    __slots__ = ("machine", "up", "down")

    def __init__(
        self,
        *,
        up_scanner: FrameScanner,
        down_scanner: FrameScanner,
        close_timeout_s: float,
        backend_failure_code: int,
        message_rate: tuple[MessageRate, MessageRate] | None = None,
    ) -> None:
        self.machine = RelayMachine(
            up_scanner,
            down_scanner,
            close_timeout_s=close_timeout_s,
            backend_failure_code=backend_failure_code,
            message_rate=message_rate[0] if message_rate else None,
            message_rate_down=message_rate[1] if message_rate else None,
        )
        self.up = self.machine.up
        self.down = self.machine.down

    def _changed(self) -> None:
        raise NotImplementedError

    async def run(self, from_client: bytes = b"", from_backend: bytes = b"") -> None:
        """Relay until the session has ended (``from_*``: bytes read past the handshakes)."""
        raise NotImplementedError

    def finish(self, client_code: int, backend_code: int, reason: str, kind: Outcome) -> None:
        """End the session from the proxy's side (idle timeout, drain, shutdown)."""
        self.machine.finish(client_code, backend_code, reason, kind, trio.current_time())
        self._changed()

    def keepalive(self, now: float, interval_s: float, timeout_s: float) -> None:
        self.machine.keepalive(now, interval_s, timeout_s)
        self._changed()

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes


class Relay(RelayDriver):
    """One established session relayed by two trio tasks."""

    __slots__ = ("_channels", "_writing", "_nursery")

    def __init__(
        self,
        client: RawChannel,
        backend: RawChannel,
        *,
        up_scanner: FrameScanner,
        down_scanner: FrameScanner,
        close_timeout_s: float,
        backend_failure_code: int,
        message_rate: tuple[MessageRate, MessageRate] | None = None,
    ) -> None:
        super().__init__(
            up_scanner=up_scanner,
            down_scanner=down_scanner,
            close_timeout_s=close_timeout_s,
            backend_failure_code=backend_failure_code,
            message_rate=message_rate,
        )
        # (source, destination) of each direction
        self._channels = {id(self.up): (client, backend), id(self.down): (backend, client)}
        self._writing: set[int] = set()  # directions whose destination a task is writing
        self._nursery: trio.Nursery | None = None

    async def run(self, from_client: bytes = b"", from_backend: bytes = b"") -> None:
        """Relay until the session is over; ``from_*`` arrived with the handshakes."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._after()  # finish() may have come before run()
            nursery.start_soon(self._pump, self.up, from_client)
            await self._pump(self.down, from_backend)
        self._nursery = None

    async def _pump(self, d: Direction, initial: bytes) -> None:
        machine = self.machine
        src = self._channels[id(d)][0]
        data = initial
        streak = 0
        while True:
            if data:
                machine.feed(d, data, trio.current_time())
                await self._write(d)
                self._after()
            if d.src_eof or machine.done:
                return
            data = await src.receive()
            if not data:
                machine.eof(d, trio.current_time())
                await self._write(d)
                self._after()
                return
            streak += 1
            if streak == YIELD_EVERY:  # the channel only yields when it has to wait
                streak = 0
                await trio.lowlevel.checkpoint()

    async def _write(self, d: Direction) -> None:
        """Send what the machine queued towards ``d``'s destination (one writer at a time)."""
        key = id(d)
        if key in self._writing or not d.out:
            return
        self._writing.add(key)
        dst = self._channels[key][1]
        try:
            while d.out:
                out = d.out
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                try:
                    await dst.send(data)
                except ChannelBroken:
                    self.machine.broken(d)
        finally:
            self._writing.discard(key)

    async def _write_then_after(self, d: Direction) -> None:
        await self._write(d)
        self._after()

    def _after(self) -> None:
        """Act on what the machine decided: writes to start, the deadline, the end."""
        nursery = self._nursery
        if nursery is None:
            return
        machine = self.machine
        for d in (self.up, self.down):
            if d.out and id(d) not in self._writing:
                nursery.start_soon(self._write_then_after, d)
        if machine.deadline is not None:
            nursery.cancel_scope.deadline = machine.deadline
        if machine.done and not self._writing and not self.up.out and not self.down.out:
            nursery.cancel_scope.cancel()

    def _changed(self) -> None:
        self._after()
