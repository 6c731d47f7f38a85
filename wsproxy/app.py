"""The root of the task tree: listeners, sessions and the control tasks.

::

    App.serve
    ├── connections : one task per downstream connection (edge.session.handle_connection)
    └── control     : the accept loops, the idle sweeper, one health checker per pool
    main            : App.serve + the signal loop (SIGTERM/SIGINT → App.shutdown)

``App`` owns everything a running proxy shares: the current ``Generation``
(the config and what is built from it), the backend ``Registry`` and the table
of established sessions. Nothing of this is global, so several ``App``s can
run in one process (the tests do).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from .balance.policy import Selector, make_selector
from .config.schema import Config, ListenerConfig, PoolName
from .control.health import HealthChecker
from .control.registry import Registry
from .edge.gate import RouteGate
from .edge.listener import accept_loop, open_listener
from .edge.session import CLOSE_TIMEOUT_S, Session, handle_connection
from .proto.frames import CLOSE_GOING_AWAY
from .proto.limits import ClientTable
from .proto.routing import Router

log = logging.getLogger("wsproxy.app")


@dataclass(slots=True)
class Generation:
    """One loaded config and what is derived from it; sessions keep the one they started with."""

    config: Config
    number: int
    router: Router = field(init=False)
    selectors: dict[PoolName, Selector] = field(init=False)
    gates: dict[int, RouteGate] = field(init=False)  # by id() of a route of this config

    def __post_init__(self) -> None:
        self.router = Router(self.config.routes)
        self.selectors = {name: make_selector(pool) for name, pool in self.config.pools.items()}
        self.gates = {id(route): RouteGate.build(route) for route in self.config.routes}


class App:
    def __init__(self, config: Config) -> None:
        self.generation = Generation(config, 1)
        self.registry = Registry()
        self.sessions: dict[str, Session] = {}
        self.addresses: dict[str, list[tuple[str, int]]] = {}  # listener name → bound addresses
        self.health_checkers: dict[PoolName, HealthChecker] = {}
        self.clients = ClientTable()  # per client address: live connections, handshake rate
        self.connection_count = 0  # downstream connections being served
        self._conn_ids = itertools.count(1)
        self._conn_prefix = os.urandom(2).hex()
        self._control: trio.CancelScope | None = None
        self._connections: trio.Nursery | None = None
        self.stopping = False

    def next_conn_id(self) -> str:
        return f"{self._conn_prefix}{next(self._conn_ids):x}"

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve until ``shutdown``, then wait for the sessions to end."""
        listeners: list[tuple[ListenerConfig, socket.socket]] = []
        try:
            for spec in self.generation.config.listeners:
                opened = open_listener(spec)
                listeners += [(spec, sock) for sock in opened]
                self.addresses[spec.name] = [sock.getsockname()[:2] for sock in opened]
                for host, port in self.addresses[spec.name]:
                    log.info("event=listening listener=%s address=%s", spec.name, _fmt(host, port))
            async with trio.open_nursery() as connections:
                self._connections = connections
                async with trio.open_nursery() as control:
                    self._control = control.cancel_scope
                    control.start_soon(self._idle_sweeper)
                    for pool in self.generation.config.pools.values():
                        checker = HealthChecker(pool, self.registry)
                        self.health_checkers[pool.name] = checker
                        await control.start(checker.run)
                    for spec, sock in listeners:
                        handler = partial(handle_connection, app=self, listener=spec)
                        control.start_soon(accept_loop, sock, handler, connections)
                    task_status.started(self.addresses)
                for _spec, sock in listeners:  # stop accepting: new attempts are refused from now on
                    sock.close()
        finally:
            for _spec, sock in listeners:
                sock.close()
        log.info("event=stopped")

    def shutdown(self, timeout_s: float = CLOSE_TIMEOUT_S + 1.0) -> None:
        """Stop accepting, close every session with 1001, and give them ``timeout_s`` to finish."""
        if self.stopping:
            return
        self.stopping = True
        log.info("event=shutdown sessions=%d", len(self.sessions))
        if self._control is not None:
            self._control.cancel()
        for session in list(self.sessions.values()):
            if session.relay is not None:
                session.relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "proxy shutting down")
        if self._connections is not None:
            self._connections.cancel_scope.deadline = trio.current_time() + timeout_s

    def abort(self) -> None:
        """Close everything now."""
        if self._control is not None:
            self._control.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    async def _idle_sweeper(self) -> None:
        """Close sessions that relayed nothing for ``timeouts.idle``, without per-chunk timers."""
        while True:
            idle_s = self.generation.config.timeouts.idle_s
            await trio.sleep(min(max(idle_s / 8, 0.02), 5.0))
            now = trio.current_time()
            for session in list(self.sessions.values()):
                relay = session.relay
                if relay is None:
                    continue
                mark = relay.bytes_up + relay.bytes_down
                if mark != session.idle_mark:
                    session.idle_mark = mark
                    session.idle_since = now
                elif now - session.idle_since >= session.generation.config.timeouts.idle_s:
                    relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "idle timeout")


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def main(config: Config) -> None:
    """Run the proxy until SIGTERM or SIGINT; a second signal exits at once."""
    app = App(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def watch_signals() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if app.stopping:
                    log.warning("event=signal signal=%s action=exit_now", name)
                    app.abort()
                    return
                log.info("event=signal signal=%s action=shutdown", name)
                app.shutdown()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            await app.serve()  # returns once accepting has stopped and every session has ended
            nursery.cancel_scope.cancel()
