"""The relay engine: one trio task relays every plain session from its own epoll set (Linux).

Theory of operation
-------------------
Two tasks per session, each parking in trio on every read, cost a scheduler
pass and an ``epoll_ctl`` re-registration per chunk: most of what a relayed
message cost. Here, once both handshakes are done, a session is data: two
non-blocking sockets, a ``RelayMachine`` (``proto.relay``) and two output
backlogs. The engine owns an ``select.epoll`` set with both sockets of every
session it relays, and one trio task waits for that set's fd to be readable
(``trio.lowlevel.wait_readable``). On each wake-up it takes up to
``MAX_EVENTS`` ready sockets and serves each synchronously: one ``recv`` into
the machine, and one ``send`` of everything the machine queued for the other
side (``_relay_chunk`` does just that for the common case, a plain socket
with no backlog either way, and leaves everything else to ``_serve``). So a
relayed message costs two system calls and no trio checkpoint, as in
HAProxy's and nginx's event loops; ``epoll_wait`` is shared by every
session that was ready at the same time.

Registrations are level-triggered and change only when back-pressure does: a
socket is watched for input while its direction wants input and the other
side's backlog is empty; it is watched for output while its own backlog is
not empty. A partial ``send`` keeps the rest as the backlog, stops reading the
source and waits for ``EPOLLOUT``; when the backlog drains, reading resumes.

The engine never waits on a socket it owns through trio, and a failure while
serving one session (a bug included) ends that session, logged, never the
engine. A session handed to the engine has no trio task of its own: ``start``
gives the engine a callback, ``on_end``, which it calls once when it lets the
session go (its counts, its close line, its lease: ``edge.session``), from
whichever task ended it (the engine's loop, its timer, or the control path's
``finish``). ``run`` is the same with a task that waits for the end, for
callers that want one. The engine closes the session's sockets itself when it
lets the session go: that takes them out of the epoll set with no
``epoll_ctl`` (closing the only descriptor of a socket removes it). A socket
is registered with its first wanted events (one ``epoll_ctl`` per socket and
session, plus one per change of back-pressure).

Deadlines: the machine arms a close deadline with the first close frame (once
per session, never moved); the engine keeps them in a heap served by one timer
task, which sleeps in a cancel scope whose deadline is the earliest one and
ends the sessions whose deadline has passed. A session that ended before its
deadline leaves its entry behind (nothing is searched at its end); once such
entries outnumber the live ones, the heap is rebuilt without them, so it stays
within twice the sessions that are closing (plus ``TIMER_SLACK``) and the
timer wakes about once per close timeout under steady churn, not once per
session. Idle timeouts and keepalive pings come from the app's sweeper through
``finish`` and ``keepalive``, which act on the machine and then let the engine
send what it queued (``kick``), from the caller's task: the engine is plain
data between wake-ups.

Handshakes: the one wait of the usual handshake, for the backend's answer to
the upgrade, is the engine's too (``wait_readable``): the backend's socket
joins the set for one event (``EPOLLONESHOT``) and the handshake's deadline
joins the timer heap, so the task parks without a cancel scope and without a
registration in trio's own epoll set. The socket stays in the set, disabled,
and the session built on it re-arms it (``EngineRelay(backend_in_set=True)``)
instead of adding it; a wait that times out or is cancelled takes it out.

Ending: ``end_all`` lets every session go at once (the proxy's shutdown
deadline, or the engine's own end); ``until_empty`` waits until no session is
left (the app's shutdown waits on it, as it waits for its connection tasks).

TLS: a side that speaks TLS (a ``wss://`` client, a pool with ``tls:``)
brings its ``TlsChannel``: the ``ssl.SSLObject`` between two memory BIOs that
did its handshake. The engine then moves ciphertext: a ``recv`` goes into the
incoming BIO and every whole record is decrypted at once (nothing stays inside
OpenSSL where epoll cannot see it); what the machine queues for that side is
encrypted at once into the side's ``wire`` backlog, which is what ``send``
writes and what back-pressure watches. Records OpenSSL writes on its own (a
TLS 1.3 key update answer, an alert) join the same backlog, so records never
interleave. Bytes already read or decrypted during the handshakes are taken
over when the session is added.

Every session on systems without ``select.epoll`` is relayed by
``edge.relay``'s trio pumps with the same machine (``WSPROXY_RELAY=trio``
forces them everywhere).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import select
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..proto.relay import Direction
from .channel import ChannelBroken
from .relay import RelayDriver
from ..log import log_event

if TYPE_CHECKING:
    from .session_log import SessionLog
    from ..proto.frames import FrameScanner
    from ..proto.limits import MessageRate
    from .tls import TlsChannel

log = logging.getLogger("wsproxy.edge.engine")

HAVE_EPOLL = hasattr(select, "epoll")

MAX_EVENTS = 256  # ready sockets served per wake-up before trio runs other tasks
TIMER_BATCH = 1024  # heap entries the timer handles per turn before trio runs other tasks
TIMER_SLACK = 1024  # entries of ended sessions the timer heap may hold beyond as many as live ones
RECV_BYTES = 65536  # what one recv asks for, for a side whose last read was not full
BIG_RECV_BYTES = 262144  # for a side whose last read filled RECV_BYTES: bulk traffic

_IN = select.EPOLLIN if HAVE_EPOLL else 0
_ONESHOT = select.EPOLLONESHOT if HAVE_EPOLL else 0
_OUT = select.EPOLLOUT if HAVE_EPOLL else 0
_ERR = (select.EPOLLERR | select.EPOLLHUP) if HAVE_EPOLL else 0
_GONE = (ConnectionError, TimeoutError)  # reset, aborted, broken pipe, ETIMEDOUT
_UNWATCHED = -2  # EngineRelay.masks: not in the epoll set yet
_REMOVED = -1  # EngineRelay.masks: out of the set for good (forgotten after an error, or closed)


class EngineRelay(RelayDriver):
    """One session relayed by the engine; the control surface is ``RelayDriver``'s."""

    __slots__ = (
        "engine",
        "client",
        "backend",
        "client_fd",
        "backend_fd",
        "masks",
        "tls",
        "wire",
        "read_size",
        "log",
        "on_end",
        "registered",
        "timed",
        "plain",
    )

    def __init__(
        self,
        engine: Engine,
        client: socket.socket,
        backend: socket.socket,
        *,
        up_scanner: FrameScanner,
        down_scanner: FrameScanner,
        close_timeout_s: float,
        backend_failure_code: int,
        message_rate: tuple[MessageRate, MessageRate] | None = None,
        client_tls: TlsChannel | None = None,
        backend_tls: TlsChannel | None = None,
        log: SessionLog | None = None,
        backend_in_set: bool = False,
    ) -> None:
        super().__init__(
            up_scanner=up_scanner,
            down_scanner=down_scanner,
            close_timeout_s=close_timeout_s,
            backend_failure_code=backend_failure_code,
            message_rate=message_rate,
        )
        self.engine = engine
        self.client = client
        self.backend = backend
        self.client_fd = client.fileno()
        self.backend_fd = backend.fileno()
        #: what each fd (client, backend) is registered for; a backend whose answer to the upgrade
        #: was awaited in the engine (``Engine.wait_readable``) is in the set already, disabled
        self.masks = [_UNWATCHED, 0 if backend_in_set else _UNWATCHED]
        #: the TLS channel of each side (client, backend), None for plain TCP
        self.tls: tuple[TlsChannel | None, TlsChannel | None] = (client_tls, backend_tls)
        self.plain = client_tls is None and backend_tls is None  # Engine._relay_chunk may serve it
        #: ciphertext waiting for each TLS side's socket (client, backend); always empty on a plain side
        self.wire = [b"", b""]
        #: what the next recv of each side asks for: RECV_BYTES, or BIG_RECV_BYTES after a full read
        #: (a 64 KiB message then takes one recv and one send each way instead of two or three; small
        #: messages never allocate a 256 KiB buffer)
        self.read_size = [RECV_BYTES, RECV_BYTES]
        self.log = log  # the session's fields for the engine's own lines about it (conn=...)
        self.on_end: Callable[[], None] | None = None  # called once, when the engine lets the session go
        self.registered = False
        self.timed = False  # its close deadline is in the engine's timer heap

    def start(self, from_client: bytes, from_backend: bytes, on_end: Callable[[], None]) -> None:
        """Hand the session to the engine; ``on_end()`` runs when it is over (perhaps before this returns).

        ``from_*``: bytes read past the handshakes. ``on_end`` runs in the
        task that ended the session and must not raise (the engine logs it if
        it does).
        """
        self.on_end = on_end
        self.engine.add(self, from_client, from_backend)

    async def run(self, from_client: bytes = b"", from_backend: bytes = b"") -> None:
        """``start``, then wait until the session is over; cancelled, it ends the session."""
        ended = trio.Event()
        self.start(from_client, from_backend, ended.set)
        try:
            await ended.wait()
        finally:
            self.engine.remove(self)

    def _changed(self) -> None:
        """The control path changed the machine: the engine sends what it queued."""
        self.engine.kick(self)


class _Waiter:
    """A task parked in ``Engine.wait_readable`` until its socket is readable or its deadline passes."""

    __slots__ = ("task", "fd", "registered", "timed", "result")

    def __init__(self, task: trio.lowlevel.Task, fd: int) -> None:
        self.task = task
        self.fd = fd
        self.registered = True  # still waiting (the timer heap's test, as for a session)
        self.timed = False
        self.result: bool | None = False  # True: readable; False: the deadline passed; None: the engine stopped


class Engine:
    """The epoll set and the task that serves it; one per process."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: fd -> (session, True for the client's socket)
        self._fds: dict[int, tuple[EngineRelay, bool]] = {}
        self.sessions = 0
        self.wakeups = 0  # for metrics and the benchmark: batches served
        self.failures = 0  # sessions ended by an unexpected error while serving them
        #: tasks parked in wait_readable, by the fd they wait for
        self._waiters: dict[int, _Waiter] = {}
        #: close deadlines: (deadline, sequence, session), and the waiters' deadlines;
        #: entries of sessions already gone (waits already over) stay until they come up
        self._timers: list[tuple[float, int, EngineRelay | _Waiter]] = []
        self._sequence = itertools.count()
        self._timed = 0  # sessions in the engine, and waiting tasks, with an entry in _timers
        self._timer_scope: trio.CancelScope | None = None  # the timer task's sleep, until the earliest deadline
        self._empty: trio.Event | None = None  # until_empty's wait

    # -- sessions in and out -------------------------------------------------------------

    def add(self, relay: EngineRelay, from_client: bytes, from_backend: bytes) -> None:
        self._fds[relay.client_fd] = (relay, True)
        self._fds[relay.backend_fd] = (relay, False)
        relay.registered = True  # the sockets join the epoll set in _settle, with what they wait for
        self.sessions += 1
        now = trio.current_time()
        machine = relay.machine
        try:
            for index, tls in enumerate(relay.tls):
                if tls is not None:  # records read with the handshake's last bytes, not yet decrypted
                    data, _ = _decrypt(tls)
                    if index == 0:
                        from_client += data
                    else:
                        from_backend += data
                    relay.wire[index] += tls.take_output()  # held TLS 1.3 tickets first (edge.tls)
            if from_client:
                machine.feed(relay.up, from_client, now)
            if from_backend:
                machine.feed(relay.down, from_backend, now)
            self._settle(relay)
        except Exception:
            self._fail(relay)

    def remove(self, relay: EngineRelay) -> None:
        """Let the session go (idempotent): close its sockets, wake its task.

        Closing takes each socket out of the epoll set (module docstring);
        the channels' own ``close`` afterwards finds them closed.
        """
        if not relay.registered:
            return
        relay.registered = False
        self.sessions -= 1
        fds = self._fds
        fds.pop(relay.client_fd, None)
        fds.pop(relay.backend_fd, None)
        relay.masks[0] = relay.masks[1] = _REMOVED
        if relay.timed:
            self._timed -= 1
        relay.client.close()
        relay.backend.close()
        on_end, relay.on_end = relay.on_end, None
        if on_end is not None:
            try:
                on_end()
            except Exception:
                _log_error(relay, "unexpected error while ending a session")
        if not self.sessions and self._empty is not None:
            self._empty.set()

    def end_all(self) -> None:
        """Let every session go now (a shutdown's deadline, the engine's own end)."""
        for relay in {entry[0] for entry in self._fds.values()}:
            self.remove(relay)

    async def wait_readable(self, sock: socket.socket, deadline: float) -> bool:
        """Park the calling task until ``sock`` is readable (True) or ``deadline`` passes (False).

        For a handshake's wait for its backend's answer, the one wait of the
        usual handshake: the socket joins the engine's set for one event
        (``EPOLLONESHOT``) and the deadline joins the engine's timer heap. No
        cancel scope, no registration in trio's own epoll set, and once the
        answer came the socket stays in the set, disabled: the session the
        engine then relays re-arms it (``EngineRelay(backend_in_set=True)``)
        instead of adding it. A timed-out or cancelled wait takes the socket
        out of the set. Raises ``ChannelBroken`` when the engine stops first.
        """
        fd = sock.fileno()
        waiter = _Waiter(trio.lowlevel.current_task(), fd)
        try:
            self._epoll.register(fd, _IN | _ONESHOT)
        except FileExistsError:  # in the set from an earlier wait, disabled
            self._epoll.modify(fd, _IN | _ONESHOT)
        self._waiters[fd] = waiter
        self._arm(waiter, deadline)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._stop_waiting(waiter, False, resume=False)  # trio raises Cancelled in the task
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if waiter.result is None:
            raise ChannelBroken("the proxy's relay engine stopped")
        return waiter.result

    def _stop_waiting(self, waiter: _Waiter, result: bool | None, *, resume: bool = True) -> None:
        """End ``waiter``'s wait without an event (its deadline, a cancel, the engine's end): out of the set."""
        if self._waiters.get(waiter.fd) is waiter:
            del self._waiters[waiter.fd]
        try:
            self._epoll.unregister(waiter.fd)
        except (OSError, ValueError):  # closed meanwhile: closing took it out of the set
            pass
        self._end_wait(waiter, result, resume)

    def _end_wait(self, waiter: _Waiter, result: bool | None, resume: bool = True) -> None:
        """``waiter`` is done (``result``): out of the timer count, its task resumed unless trio cancels it."""
        waiter.registered = False
        waiter.result = result
        self._timed -= 1  # (every wait is timed: _arm came with its registration)
        if resume:
            trio.lowlevel.reschedule(waiter.task)

    async def until_empty(self) -> None:
        """Return once the engine relays no session."""
        while self.sessions:
            self._empty = trio.Event()
            await self._empty.wait()
        self._empty = None

    def kick(self, relay: EngineRelay) -> None:
        """The control path changed ``relay``'s machine: send what it queued, update the watch."""
        if relay.registered:
            try:
                self._settle(relay)
            except Exception:
                self._fail(relay)

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the epoll set and the close deadlines until cancelled; then let every session go."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers)
                await self._run_epoll()
        finally:
            self.end_all()
            for waiter in list(self._waiters.values()):  # (the app ends its handshakes first)
                self._stop_waiting(waiter, None)
            self._epoll.close()

    async def _run_epoll(self) -> None:
        epoll = self._epoll
        fd = epoll.fileno()
        poll = epoll.poll
        serve, relay_chunk = self._serve, self._relay_chunk
        fds, waiters = self._fds, self._waiters
        while True:
            await trio.lowlevel.wait_readable(fd)
            events = poll(0, MAX_EVENTS)
            if not events:
                continue
            self.wakeups += 1
            now = trio.current_time()
            for event_fd, mask in events:
                entry = fds.get(event_fd)
                if entry is not None:
                    relay, is_client = entry
                    index = 0 if is_client else 1
                    if mask == _IN and relay.plain and relay.masks[index] == _IN:  # the common case
                        relay_chunk(relay, is_client, index, now)
                    else:
                        serve(relay, is_client, mask, now)
                else:
                    waiter = waiters.pop(event_fd, None)
                    if waiter is not None:  # readable; its one-shot registration is disabled now
                        self._end_wait(waiter, True)
            if len(events) == MAX_EVENTS:
                await trio.lowlevel.checkpoint()  # let handshakes and control tasks run

    async def _run_timers(self) -> None:
        """End the sessions whose close deadline has passed; sleep until the next one."""
        timers = self._timers
        while True:
            now = trio.current_time()
            budget = TIMER_BATCH
            while timers and budget:
                deadline, _, item = timers[0]
                if item.registered and deadline > now:
                    break
                heapq.heappop(timers)
                budget -= 1
                if not item.registered:
                    continue
                if isinstance(item, EngineRelay):  # its close handshake did not finish in time
                    self.remove(item)
                else:  # the backend did not answer in time
                    self._stop_waiting(item, False)
            if not budget:
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None

    def _arm(self, item: EngineRelay | _Waiter, deadline: float) -> None:
        item.timed = True
        self._timed += 1
        timers = self._timers
        if len(timers) > 2 * self._timed + TIMER_SLACK:  # mostly sessions gone already: rebuild without them
            timers[:] = [entry for entry in timers if entry[2].registered]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, next(self._sequence), item))
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def _serve(self, relay: EngineRelay, is_client: bool, mask: int, now: float) -> None:
        """One ready socket of ``relay``: flush its backlog and/or read it into the machine."""
        try:
            machine = relay.machine
            reader, writer = (relay.up, relay.down) if is_client else (relay.down, relay.up)
            if mask & _OUT:
                self._flush(relay, writer)
            index = 0 if is_client else 1
            if mask & _IN and relay.masks[index] & _IN and not reader.src_eof:
                sock = relay.client if is_client else relay.backend
                size = relay.read_size[index]
                try:
                    data = sock.recv(size)
                    relay.read_size[index] = BIG_RECV_BYTES if len(data) >= RECV_BYTES else RECV_BYTES
                except BlockingIOError:
                    data = None
                except _GONE:
                    data = b""
                tls = relay.tls[index]
                if tls is not None and data is not None:
                    if data:
                        tls.incoming.write(data)
                    else:
                        tls.incoming.write_eof()
                    data, ended = _decrypt(tls)
                    if tls.outgoing.pending:  # OpenSSL answered something (key update, alert)
                        relay.wire[index] += tls.outgoing.read()
                    if data:
                        machine.feed(reader, data, now)
                    if ended:
                        machine.eof(reader, now)
                elif data:
                    machine.feed(reader, data, now)
                elif data is not None:
                    machine.eof(reader, now)
            if mask & _ERR:
                # Reset, or shut down both ways: nothing more comes from or goes to it,
                # and epoll would report it again and again: take the socket out of the set.
                if not reader.src_eof:
                    machine.eof(reader, now)
                if not writer.dst_gone:
                    machine.broken(writer)
                self._forget_fd(relay, is_client)
            self._settle(relay)
        except Exception:
            self._fail(relay)

    def _relay_chunk(self, relay: EngineRelay, is_client: bool, index: int, now: float) -> None:
        """``_serve``'s common case, in one pass: a plain side, watched for input only, has bytes.

        Its registration says that neither side has a backlog (``_settle``).
        When what the machine makes of the bytes is only frames for the other
        side, and one ``send`` takes them all, nothing else changes: no
        backlog, the same registrations, no deadline, not done. Anything else
        (an EOF, a frame of ours for the reading side, the first close frame,
        the end) takes ``_settle``'s general way from the point reached, which
        is where ``_serve`` would be; after a partial or refused send, what is
        left waits for the socket (``_watch``), as ``_flush`` would leave it.
        """
        try:
            machine = relay.machine
            if is_client:
                reader, other, sock = relay.up, relay.down, relay.client
            else:
                reader, other, sock = relay.down, relay.up, relay.backend
            if reader.src_eof:  # a stale event: _settle will stop watching it
                self._settle(relay)
                return
            try:
                data = sock.recv(relay.read_size[index])
            except BlockingIOError:
                return
            except _GONE:
                data = b""
            if not data:
                machine.eof(reader, now)
                self._settle(relay)
                return
            relay.read_size[index] = BIG_RECV_BYTES if len(data) >= RECV_BYTES else RECV_BYTES
            machine.feed(reader, data, now)
            out = reader.out
            if other.out or machine.done or machine.deadline is not None:
                self._settle(relay)
                return
            if not out:  # a part of a frame: the scanner keeps it
                return
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                sent = (relay.backend if is_client else relay.client).send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                machine.broken(reader)
                self._settle(relay)
                return
            if sent == len(data):
                out.clear()
            else:  # the rest waits for the socket to be writable: _watch, not another send now
                out[:] = [data[sent:]]
                self._watch(relay)
        except Exception:
            self._fail(relay)

    def _forget_fd(self, relay: EngineRelay, is_client: bool) -> None:
        index = 0 if is_client else 1
        mask = relay.masks[index]
        relay.masks[index] = _REMOVED
        if mask >= 0:
            self._epoll.unregister(relay.client_fd if is_client else relay.backend_fd)

    def _settle(self, relay: EngineRelay) -> None:
        """Send what the machine queued, then watch what the session now needs (``_watch``)."""
        up, down = relay.up, relay.down
        wire = relay.wire
        if up.out or wire[1]:
            self._flush(relay, up)
        if down.out or wire[0]:
            self._flush(relay, down)
        self._watch(relay)

    def _watch(self, relay: EngineRelay) -> None:
        """The session's registrations (and its end, and its deadline) for what its queues hold now."""
        machine = relay.machine
        up, down = relay.up, relay.down
        wire = relay.wire
        # what waits for each socket: plain bytes of the machine, or ciphertext
        to_client = down.out or wire[0]
        to_backend = up.out or wire[1]
        if machine.done and not to_client and not to_backend:
            self.remove(relay)
            return
        if machine.deadline is not None and not relay.timed:
            self._arm(relay, machine.deadline)
        # client fd: input for up unless the backend's backlog is full; output for down's backlog
        want_client = (_IN if up.wants_input and not to_backend else 0) | (_OUT if to_client else 0)
        want_backend = (_IN if down.wants_input and not to_client else 0) | (_OUT if to_backend else 0)
        masks = relay.masks
        if masks[0] != want_client and masks[0] != _REMOVED:
            if masks[0] == _UNWATCHED:
                self._epoll.register(relay.client_fd, want_client)
            else:
                self._epoll.modify(relay.client_fd, want_client)
            masks[0] = want_client
        if masks[1] != want_backend and masks[1] != _REMOVED:
            if masks[1] == _UNWATCHED:
                self._epoll.register(relay.backend_fd, want_backend)
            else:
                self._epoll.modify(relay.backend_fd, want_backend)
            masks[1] = want_backend

    def _flush(self, relay: EngineRelay, d: Direction) -> None:
        """One ``send`` of ``d``'s queued bytes to its destination; what is left stays queued.

        Towards a TLS side the machine's bytes are encrypted first (all of
        them: the memory BIO takes any amount) and the ciphertext is what
        waits in ``wire``.
        """
        out = d.out
        index = 1 if d is relay.up else 0
        tls = relay.tls[index]
        if tls is not None:
            self._flush_tls(relay, d, tls, index)
            return
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        sock = relay.backend if d is relay.up else relay.client
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):  # pragma: no cover - BlockingIOError
                sent = 0
            else:
                relay.machine.broken(d)
                return
        if sent == len(data):
            out.clear()
        elif len(out) == 1:
            out[0] = data[sent:]
        else:
            out[:] = [data[sent:]]

    def _flush_tls(self, relay: EngineRelay, d: Direction, tls: TlsChannel, index: int) -> None:
        out = d.out
        if out:
            try:
                for chunk in out:
                    tls.ssl.write(chunk)
            except ssl.SSLError:  # the TLS connection is closed or broken on our side
                out.clear()
                relay.machine.broken(d)
                return
            out.clear()
        if tls.outgoing.pending:
            relay.wire[index] += tls.outgoing.read()
        data = relay.wire[index]
        if not data:
            return
        sock = relay.backend if index else relay.client
        try:
            sent = sock.send(data)
        except BlockingIOError:
            return
        except OSError:
            relay.wire[index] = b""
            relay.machine.broken(d)
            return
        relay.wire[index] = data[sent:] if sent < len(data) else b""

    def _fail(self, relay: EngineRelay) -> None:
        """An unexpected error while serving ``relay``: end that session, keep the engine."""
        self.failures += 1
        _log_error(relay, "unexpected error while relaying; session closed")
        relay.machine.abort("internal error while relaying")
        self.remove(relay)


def _log_error(relay: EngineRelay, reason: str) -> None:
    """The exception being handled, logged with ``relay``'s session fields when it has them."""
    if relay.log is not None:
        relay.log.conn_event(log, logging.ERROR, "error", exc_info=True, where="engine", reason=reason)
    else:
        log_event(log, logging.ERROR, "error", exc_info=True, where="engine", reason=reason)


def _decrypt(tls: TlsChannel) -> tuple[bytes, bool]:
    """Every whole record the incoming BIO holds, decrypted; and whether the TLS stream has ended.

    Ended: close_notify, EOF under the records, or records that do not decrypt
    (garbage on the wire): the peer is gone either way, as for a TCP EOF.
    """
    ssl_object = tls.ssl
    read, pending, incoming = ssl_object.read, ssl_object.pending, tls.incoming
    chunks = []
    ended = False
    try:
        while True:
            chunk = read(RECV_BYTES)
            if not chunk:  # pragma: no cover - read raises at the end, it does not return b""
                ended = True
                break
            chunks.append(chunk)
            if not incoming.pending and not incoming.eof and not pending():
                break  # nothing left to decrypt: done without the SSLWantReadError a read would raise
    except ssl.SSLWantReadError:
        pass
    except ssl.SSLError:  # SSLZeroReturnError (close_notify), SSLEOFError, a bad record
        ended = True
    if len(chunks) == 1:
        return chunks[0], ended
    return b"".join(chunks), ended
