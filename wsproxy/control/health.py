"""Active health checks: one task per backend of a pool (trio shell).

This module only probes backends and feeds the results to the ``Registry``
(``HealthState.record_check``, per pool and address); what a result means for traffic (UNKNOWN,
UP after ``rise`` passes, DOWN after ``fall`` failures, availability) is
decided there. It is not passive health (the session code counts failed
connects, ``Registry.record_failure``) and it never touches a session.

::

    HealthChecker.run          one per pool with ``health:``, in the app's control nursery
    └── nursery
        ├── _watch(backend 1)  check → record → log a change → sleep interval ±10% → check …
        └── _watch(backend 2)  …

Each backend has its own loop, so a slow or black-holed backend delays only
its own checks; nothing here blocks accepting or relaying. A check opens a
new connection every time, and everything of one check, connect included, runs
within ``timeout_s``:

- ``tcp``: connect, then close. A backend that accepts but never answers
  passes: the kernel accepts on behalf of a hung process. Use ``http`` or
  ``websocket`` to catch that.
- ``http``: ``GET path`` with h11 (``Host: <address>``, ``Connection: close``,
  ``User-Agent: wsproxy-health``); passes if the status is in
  ``expect_status``. The body is not read.
- ``websocket``: the RFC 6455 §4.1 upgrade on ``path``, one ping, and its pong
  (§5.5.3: the pong carries the ping's payload), then a polite close (§7.1.1)
  within what is left of the budget. A backend that sends a message or a ping
  of its own first is fine. The protocol is wsproto's sans-I/O state machine,
  the one trio-websocket runs on, driven directly so that each phase is known:
  trio-websocket's client waits for the whole timeout when a backend closes
  during the upgrade or before the pong, and cannot tell a connect timeout
  from a silent backend.

Reasons are short and say what was seen: ``connect refused``, ``connect timed
out``, ``connect failed: No route to host``, ``timed out after 2s``, ``status
503``, ``upgrade refused: status 404``, ``no pong within 2s``, ``connection
closed``, ``connection closed with 1001``, ``invalid response: ...``.

Timing: the first check of a backend runs at once; the next one starts
``interval_s × uniform(0.9, 1.1)`` after a check ends. A backend whose port
is closed (refused at once) leaves rotation about ``fall`` intervals after it
died (between ``fall - 1`` and ``fall``, plus jitter); a black-holed one after
about ``fall × (timeout_s + interval_s)``.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..config.schema import Address, HealthConfig, PoolConfig
from ..edge.channel import ChannelBroken, RawChannel, connect
from ..edge.overload import RateLimitedWarning
from ..errors import LocalOverload
from ..edge.contexts import pool_context
from ..edge.tls import TlsHandshakeFailed, backend_server_name, start_client_tls
from ..balance.registry import Health, Registry
from ..log import log_event

log = logging.getLogger("wsproxy.control.health")
_overloaded = RateLimitedWarning(log)  # checks skipped because the proxy is out of fds

USER_AGENT = "wsproxy-health"
USER_AGENT_B = USER_AGENT.encode()
#: Jitter of the interval between two checks of one backend (±10%).
JITTER = 0.1
#: What a check reads at most per receive; health answers are small.
RECEIVE_BYTES = 16384

#: (passed, why, rtt_s); passed is None when the result is unknown: the proxy itself
#: could not open a socket (``edge.overload``), which says nothing about the backend.
Result = tuple[bool | None, str, float | None]


#: What a check of a wss:// backend needs: the pool's client SSLContext and the name to verify.
TlsTarget = tuple[ssl.SSLContext, str]


@dataclass(slots=True)
class _Progress:
    """How far one check got: the timeout's reason depends on it."""

    phase: str = "connect"  # connect | response | upgrade | pong | close
    rtt_s: float | None = None


async def check_backend(
    address: Address, health: HealthConfig, *, tls: TlsTarget | None = None
) -> Result:
    """Probe ``address`` once; return ``(passed, "ok" or why not, rtt_s)``.

    ``passed`` is None (unknown) when the proxy could not create or connect a
    socket of its own (out of file descriptors, buffers, memory or local
    ports): that is not recorded, so the proxy's own overload never marks a
    backend down.

    ``rtt_s`` is the connect time (tcp), request sent → status line (http), or
    ping → pong (websocket); None when the check failed. Never raises for
    anything the backend does; returns within ``health.timeout_s`` (plus a
    scheduler tick).
    """
    progress = _Progress()
    timeout = f"{health.timeout_s:g}s"
    result: Result | None = None
    with trio.move_on_after(health.timeout_s):
        result = await _check(address, health, progress, tls)
    if result is not None:
        return result
    if progress.phase == "connect":
        return False, "connect timed out", None
    if progress.phase == "pong":
        return False, f"no pong within {timeout}", None
    if progress.phase == "close":  # the pong came back; only the goodbye was slow
        return True, "ok", progress.rtt_s
    return False, f"timed out after {timeout}", None


async def _check(address: Address, health: HealthConfig, progress: _Progress, tls: TlsTarget | None) -> Result:
    started = trio.current_time()
    try:
        channel = await connect(address.host, address.port)
    except LocalOverload as exc:
        return None, exc.reason, None
    except ConnectionRefusedError:
        return False, "connect refused", None
    except OSError as exc:
        return False, f"connect failed: {exc.strerror or exc}", None
    if tls is not None:  # a wss:// backend: the check speaks TLS and verifies it, like sessions do
        try:
            channel = await start_client_tls(channel, *tls)
        except TlsHandshakeFailed as exc:
            return False, str(exc), None
    try:
        if health.type == "tcp":
            return True, "ok", trio.current_time() - started
        if health.type == "http":
            return await _check_http(channel, address, health, progress)
        if health.type == "websocket":
            return await _check_websocket(channel, address, health, progress)
        raise ValueError(f"unknown health check type: {health.type!r}")
    except ChannelBroken:
        return False, "connection closed", None
    except OSError as exc:  # pragma: no cover - RawChannel turns the usual ones into EOF
        return False, f"{progress.phase} failed: {exc.strerror or exc}", None
    finally:
        channel.close()


async def _check_http(channel: RawChannel, address: Address, health: HealthConfig, progress: _Progress) -> Result:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=health.path,
        headers=[("Host", str(address)), ("Connection", "close"), ("User-Agent", USER_AGENT)],
    )
    data = conn.send(request)
    assert data is not None
    end = conn.send(h11.EndOfMessage())
    progress.phase = "response"
    sent_at = trio.current_time()
    await channel.send(data + (end or b""))
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return False, f"invalid response: {exc}", None
        if event is h11.NEED_DATA:
            received = await channel.receive(RECEIVE_BYTES)
            if not received:
                return False, "connection closed", None
            conn.receive_data(received)
        elif isinstance(event, h11.Response):
            if event.status_code in health.expect_status:
                return True, "ok", trio.current_time() - sent_at
            return False, f"status {event.status_code}", None
        elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - EOF is caught above
            return False, "connection closed", None
        # InformationalResponse (1xx): the real answer follows


class _WsPeer:
    """wsproto events from one channel, one at a time; None once the peer is gone."""

    __slots__ = ("channel", "conn", "pending")

    def __init__(self, channel: RawChannel, conn: WSConnection) -> None:
        self.channel = channel
        self.conn = conn
        self.pending: deque[Event] = deque()

    async def send(self, event: Event) -> None:
        await self.channel.send(self.conn.send(event))

    async def next_event(self) -> Event | None:
        """The next event, or None once the peer has closed the connection."""
        while not self.pending:
            data = await self.channel.receive(RECEIVE_BYTES)
            if not data:
                return None
            self.conn.receive_data(data)
            self.pending.extend(self.conn.events())
        return self.pending.popleft()


async def _check_websocket(
    channel: RawChannel, address: Address, health: HealthConfig, progress: _Progress
) -> Result:
    peer = _WsPeer(channel, WSConnection(ConnectionType.CLIENT))
    progress.phase = "upgrade"
    try:
        headers = [(b"User-Agent", USER_AGENT_B)]
        await peer.send(Request(host=str(address), target=health.path, extra_headers=headers))
        while not isinstance(event := await peer.next_event(), AcceptConnection):
            if event is None:
                return False, "connection closed", None
            if isinstance(event, RejectConnection):
                return False, f"upgrade refused: status {event.status_code}", None
    except RemoteProtocolError as exc:
        return False, f"invalid upgrade response: {exc}", None
    payload = os.urandom(8)
    progress.phase = "pong"
    sent_at = trio.current_time()
    try:
        if peer.conn.state is ConnectionState.OPEN:  # else a close came with the 101; it is next in line
            await peer.send(Ping(payload=payload))
        while True:
            event = await peer.next_event()
            if event is None:
                return False, "connection closed", None
            if isinstance(event, Pong) and event.payload == payload:
                break
            if isinstance(event, Ping) and peer.conn.state is ConnectionState.OPEN:
                # RFC 6455 §5.5.2: answer it, then keep waiting for ours
                await peer.send(event.response())
            elif isinstance(event, CloseConnection):
                return False, f"connection closed with {event.code}", None
            # messages and unsolicited pongs (§5.5.3) are not the answer
    except RemoteProtocolError as exc:
        return False, f"protocol error: {exc}", None
    progress.rtt_s = trio.current_time() - sent_at
    progress.phase = "close"
    try:  # RFC 6455 §7.1.1: the client waits for the server to close the TCP connection
        await peer.send(CloseConnection(code=1000))
        while (event := await peer.next_event()) is not None and not isinstance(event, CloseConnection):
            pass
    except (LocalProtocolError, RemoteProtocolError, ChannelBroken):
        pass  # the answer is in; how the backend says goodbye does not change it
    return True, "ok", progress.rtt_s


class HealthChecker:
    """One task per backend of one pool; started and stopped by the app.

    ``run`` owns a nursery with one ``_watch`` loop per backend; ``update``
    starts and stops loops when a reload changes the pool. Health lives in the
    ``Registry`` (keyed by pool name and address), so a backend that a reload
    keeps keeps its state and its loop, and another pool listing the same
    address is not affected by this pool's verdicts.
    """

    def __init__(
        self,
        pool: PoolConfig,
        registry: Registry,
        *,
        rng: random.Random | None = None,
        on_change: Callable[[PoolConfig, Address, Health], None] | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.on_change = on_change  # told of every health change (the app drains on DOWN if asked to)
        self.rng = rng if rng is not None else random.Random()
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._nursery: trio.Nursery | None = None
        self._loops: dict[Address, trio.CancelScope] = {}
        self._finished = False  # run() returned: update() can no longer start loops

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every backend until cancelled; ``started()`` once every loop runs.

        Without ``health`` in the pool there is nothing to check: every backend
        is marked UP and ``run`` returns right after ``started()``.
        """
        self._finished = False
        if self.pool.health is None:
            self._mark_all_up("no active checks")
            self._finished = True
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # re-read the pool each time: an update() may come while a loop starts
                while self.pool.health is not None and (
                    todo := [b.address for b in self.pool.backends if b.address not in self._loops]
                ):
                    await nursery.start(self._watch, todo[0], self._new_loop(todo[0]))
                task_status.started()
                await trio.sleep_forever()  # keeps the nursery open for update()
        finally:
            self._nursery = None
            self._loops.clear()
            self._finished = True

    @property
    def can_update(self) -> bool:
        """False once ``run`` has returned (the pool had no checks): checks added later need a new checker."""
        return not self._finished

    def update(self, pool: PoolConfig) -> None:
        """Apply a reloaded ``pool``: new backends get a loop, removed ones lose theirs, the rest keep running.

        A changed ``health`` applies to each kept loop from its next check on.
        Losing ``health`` stops every loop and marks the backends UP; gaining
        it starts them. Before ``run`` this only replaces the pool. After
        ``run`` has returned (the pool had no checks), a pool that now has
        checks needs a new ``run``: this raises ``RuntimeError``.
        """
        self.pool = pool
        if pool.health is None:
            for scope in self._loops.values():
                scope.cancel()
            self._loops.clear()
            if self._finished or self._nursery is not None:
                self._mark_all_up("no active checks")
            return
        if self._nursery is None:
            if self._finished:
                raise RuntimeError(f"pool {pool.name}: health checks added after HealthChecker.run returned")
            return  # run() will start the loops
        wanted = {backend.address for backend in pool.backends}
        for address in [a for a in self._loops if a not in wanted]:
            self._loops.pop(address).cancel()
        for address in wanted:
            if address not in self._loops:
                self._nursery.start_soon(self._watch, address, self._new_loop(address))

    def stop(self) -> None:
        """The pool is gone: stop every loop (run() then returns)."""
        for scope in self._loops.values():
            scope.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _new_loop(self, address: Address) -> trio.CancelScope:
        """Register the loop of ``address`` (so update() can stop it before it runs)."""
        health = self.pool.health
        assert health is not None
        state = self.registry.health(self.pool.name, address)
        if health.start_healthy and state.health is Health.UNKNOWN:
            self._mark_up(address, "start_healthy")
        scope = self._loops[address] = trio.CancelScope()
        return scope

    def _tls_target(self, address: Address) -> TlsTarget | None:
        pool = self.pool
        backend = next((b for b in pool.backends if b.address == address), None)
        if backend is None or not backend.tls:
            return None
        return pool_context(pool), backend_server_name(pool, address)

    async def _watch(
        self,
        address: Address,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Check ``address`` forever: at once, then every interval ±10%."""
        with scope:
            task_status.started()
            while (health := self.pool.health) is not None:
                ok, reason, rtt_s = await check_backend(address, health, tls=self._tls_target(address))
                if ok is None:  # the proxy's own overload: says nothing about the backend
                    _overloaded.warning("check_skipped", pool=self.pool.name, backend=address, reason=reason)
                else:
                    self._record(address, health, ok, reason, rtt_s)
                await trio.sleep(health.interval_s * self.rng.uniform(1 - JITTER, 1 + JITTER))
        if self._loops.get(address) is scope:  # not replaced by a newer loop for the same address
            del self._loops[address]

    def _record(self, address: Address, health: HealthConfig, ok: bool, reason: str, rtt_s: float | None) -> None:
        state = self.registry.health(self.pool.name, address)
        before = state.health
        change = state.record_check(ok, reason, trio.current_time(), rise=health.rise, fall=health.fall)
        if ok:
            state.rtt_s = rtt_s
        if self.debug:
            log_event(
                log,
                logging.DEBUG,
                "check",
                pool=self.pool.name,
                backend=address,
                type=health.type,
                ok=ok,
                reason=reason,
                rtt_ms=round(rtt_s * 1000, 1) if rtt_s is not None else None,
            )
        if change is not None:
            # record_check says "<before> -> <after>: <why>"; the line carries the states as keys
            why = change.partition(": ")[2] or change
            self._log_change(address, state.health, before, why)

    def _mark_all_up(self, reason: str) -> None:
        for backend in self.pool.backends:
            self._mark_up(backend.address, reason)

    def _mark_up(self, address: Address, reason: str) -> None:
        state = self.registry.health(self.pool.name, address)
        before = state.health
        state.mark_up(trio.current_time())
        if before is not Health.UP:
            self._log_change(address, Health.UP, before, reason)

    def _log_change(self, address: Address, after: Health, before: Health, reason: str) -> None:
        if self.on_change is not None:
            self.on_change(self.pool, address, after)
        log_event(
            log,
            logging.WARNING if after is Health.DOWN else logging.INFO,  # a backend going down is news
            "health",
            pool=self.pool.name,
            backend=address,
            state=after.value,
            reason=reason,
            was=before.value,
        )
