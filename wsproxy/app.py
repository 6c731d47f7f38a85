"""The root of the task tree: listeners, sessions and the control tasks.

::

    App.serve
    ├── engine      : the relay engine's loop and timer (edge.engine), which relay every
    │                 established session that has no task of its own
    ├── connections : one task per downstream connection until its handshakes are done
    │                 (edge.session.handle_connection; to its end where trio pumps relay it),
    │                 the spread closes of a shutdown, and one task that holds the nursery
    │                 open for the engine's sessions once shutdown began
    └── control     : one accept loop per listening socket (each in its own cancel scope),
                      the idle sweeper, one health checker per pool, drains, the admin server,
                      the systemd watchdog
    run.main        : App.serve + the signal loop (SIGHUP → reload, SIGTERM/SIGINT → shutdown),
                      systemd notify, the admin listener

``App`` owns everything a running proxy shares: the current ``Generation``
(the config and what is built from it), the backend ``Registry``, the table of
established sessions, the per-client table and the metrics. Nothing of this is
global, so several ``App``s can run in one process (the tests do).

Where the control path lives
----------------------------
``App`` holds the state and does what touches sockets and tasks (opening and
swapping listeners, starting checkers). The decisions are elsewhere:
``config.diff`` (what a new config changes), ``control.reload`` (the SIGHUP flow),
``control.drain`` (drains by admin order, health verdict and reload removal,
and the spread closes that shutdown uses too), ``control.sweeper`` (idle
timeouts and keepalive ticks), ``control.lifetime`` (token expiry,
revocation, ``max_session_age``), ``control.rebalance`` (closing the oldest
sessions of over-loaded backends).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .balance.discovery import carry_discovered
from .balance.policy import Selector, make_selector
from .config.diff import CheckerAction, addresses_in_use, plan_checkers, plan_listeners, removed_backends
from .config.schema import Config, ListenerConfig, PoolConfig, PoolName, hostport
from .control.discovery import Discovery, DiscoveryCollector
from .control.drain import Drainer, close_spread
from .control.health import HealthChecker
from .control import lifetime
from .control.lifetime import revoke_open
from .control.exposition import collector_registry, render, render_off_loop
from .control.metrics import NO_ROUTE, Metrics, measure_loop_lag
from .control.rebalance import Rebalancer
from .balance.registry import Registry
from .control.session_admin import SessionControl, identity_of
from .control.reload import ReloadError, Reloader
from .control.status import snapshot
from .control.sweeper import idle_sweeper
from .edge.jwks import JwksFetcher, JwksStartupError
from .edge.gate import RouteGate
from .edge.engine import HAVE_EPOLL, Engine
from .edge.listener import accept_loop, open_listener
from .edge.overload import OVERLOAD_RESPONSE
from .edge.session import Session, handle_connection
from .edge.tickets import SessionTickets
from .errors import WsproxyError
from .proto.frames import CLOSE_GOING_AWAY
from .proto.limits import ClientTable, fd_budget
from .proto.relay import Outcome
from .proto.routing import Router
from .log import log_event

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .config.schema import LimitsConfig, RouteConfig
    from .edge.gate import Admitted
    from .edge.host import SessionHost
    from .edge.refusal import Refused
    from .proto.handshake import Rejection, Upgrade

log = logging.getLogger("wsproxy.app")

#: An unlimited (or huge) RLIMIT_NOFILE counts as this many descriptors.
MAX_NOFILE = 10_000_000
#: While stopping: how often the holder of the engine's sessions looks whether handshakes are still running.
HOLD_POLL_S = 0.01



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


@dataclass(slots=True)
class ListenerSlot:
    """A listener's sockets and the settings new connections on them get (swapped by reloads)."""

    spec: ListenerConfig
    sockets: list[socket.socket]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def close(self) -> None:
        self.scope.cancel()
        for sock in self.sockets:
            sock.close()


def with_fd_budget(config: Config, previous: Config | None = None) -> Config:
    """``config`` with ``limits.max_connections`` derived from the fd limit when it was not set.

    The soft ``RLIMIT_NOFILE`` minus a reserve, halved (``proto.limits.fd_budget``),
    logged at start (``event=limits``) and whenever a reload changes it. An explicit
    value is kept; one that exceeds the budget (or 0, no limit) gets a WARNING: past
    the budget, clients get 503s from running out of descriptors instead.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > MAX_NOFILE:
        soft = MAX_NOFILE
    budget = fd_budget(soft, backends=len({b.address for p in config.pools.values() for b in p.backends}))
    limits = config.limits
    before = previous.limits.max_connections if previous is not None else None
    if limits.max_connections is None:
        if budget.max_connections != before:
            log_event(
                log, logging.INFO, "limits",
                max_connections=budget.max_connections, rlimit_nofile=soft, reserve=budget.reserve,
            )  # fmt: skip
        return dataclasses.replace(config, limits=dataclasses.replace(limits, max_connections=budget.max_connections))
    if (limits.max_connections == 0 or limits.max_connections > budget.max_connections) and (
        previous is None or limits.max_connections != before
    ):
        log_event(
            log,
            logging.WARNING,
            "limits",
            max_connections=limits.max_connections or "unlimited",
            reason=f"more than RLIMIT_NOFILE={soft} allows ({budget.max_connections}); "
            "beyond that, clients get 503 when the proxy runs out of descriptors",
        )
    return config


class ListenError(WsproxyError):
    """A listener of the initial config cannot be opened (the port is taken, or not ours), or a jwks_url fetched."""


class App:
    def __init__(
        self,
        config: Config,
        *,
        inherited: dict[str, list[socket.socket]] | None = None,
        engine: bool | None = None,
    ) -> None:
        self.generation = Generation(with_fd_budget(config), 1)
        if engine is None:  # the epoll engine where there is epoll, unless WSPROXY_RELAY=trio
            engine = HAVE_EPOLL and os.environ.get("WSPROXY_RELAY", "engine") != "trio"
        #: relays every plain session (None: each session relays itself with trio pumps)
        self.engine: Engine | None = Engine() if engine else None
        self.registry = Registry()
        self.tickets = SessionTickets()  # TLS ticket keys per listener: rotate, survive reloads
        self.jwks = JwksFetcher(lambda: self.generation.config)  # routes' jwks_url: fetched at start, refreshed
        self.sessions: dict[str, Session] = {}
        self.session_control = SessionControl(self.sessions)  # the sessions API and per-identity caps
        self.clients = ClientTable()  # per client address: live connections, handshake rate
        self.metrics = Metrics(started_unix=time.time())
        self.connection_count = 0  # downstream connections being served
        self.health_checkers: dict[PoolName, HealthChecker] = {}
        self.listeners: dict[str, ListenerSlot] = {}
        self.stopping = False
        self._stopped = trio.Event()  # set with stopping: the engine's sessions are waited for from then on
        self.on_ready: Callable[[], None] | None = None  # systemd READY=1 and the like
        self.log_overridden: bool | None = None  # None: logging is the embedder's (tests); False: log.* applies
        self._inherited = inherited or {}  # systemd socket activation: listener name → sockets
        #: False in a worker process (workers > 1): the supervisor runs the checks and pushes verdicts
        self.health_checks = True
        self._conn_ids = itertools.count(1)
        self._conn_prefix = os.urandom(2).hex()
        self._control: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._rng = random.Random()
        self.drainer = Drainer(self.registry, self.sessions, lambda: self.generation.config.pools, self._rng)
        self.rebalancer = Rebalancer(self.registry, self.sessions, lambda: self.generation.config, self._rng)
        self.reloader = Reloader(lambda: self.generation.config.timeouts.reload_s, lambda: self.stopping)
        self._metrics_registry = collector_registry(self)  # read at scrape time, nothing per frame
        self.discovery = Discovery(lambda name: self.generation.config.pools.get(name), self.swap_pool, self.drainer.removing)
        self._metrics_registry.register_loop_collector(DiscoveryCollector(self.discovery))

    def next_conn_id(self) -> str:
        return f"{self._conn_prefix}{next(self._conn_ids):x}"

    def set_conn_prefix(self, prefix: str) -> None:
        """Start the session ids issued from now on with ``prefix`` (letters and digits; by default 4 random hex digits).

        A worker of ``workers`` > 1 sets its slot's (``supervisor.fanout.conn_prefix``), so ids are unique
        across workers and the supervisor knows which worker owns one.
        """
        if not prefix.isalnum() or not prefix.isascii():
            raise ValueError(f"a session id prefix is letters and digits: {prefix!r}")
        self._conn_prefix = prefix

    @property
    def addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name → the addresses it is bound to (none once closed, e.g. by a shutdown during start-up)."""
        return {
            name: [sock.getsockname()[:2] for sock in slot.sockets if sock.fileno() != -1]
            for name, slot in self.listeners.items()
        }

    # -- the session host (edge.host.SessionHost): what a connection changes here -------------

    def admit_connection(self, client_ip: str, now: float, limits: LimitsConfig) -> Rejection | None:
        refusal = self.clients.admit(client_ip, now, limits, self.connection_count)
        if refusal is None:
            self.clients.connected(client_ip)
            self.connection_count += 1
        return refusal

    def connection_closed(self, client_ip: str) -> None:
        self.clients.disconnected(client_ip)
        self.connection_count -= 1

    def admit_lifetime(self, session: Session, route: RouteConfig, admitted: Admitted) -> Refused | None:
        return lifetime.admit(session, route, admitted, trio.current_time(), time.time(), self._rng)

    def admit_identity(
        self, session: Session, pool: PoolConfig, up: Upgrade, claims: Mapping[str, object] | None, limits: LimitsConfig
    ) -> Rejection | None:
        identity = identity_of(session, pool, up, claims)
        if identity is None:
            return None
        return self.session_control.admit(session, identity, limits)  # counted even without a cap: a reload may set one

    def release_identity(self, session: Session) -> None:
        self.session_control.release(session)

    def session_established(self, session: Session) -> None:
        assert session.route is not None
        self.sessions[session.conn_id] = session
        self.session_control.established(session)
        lifetime.established(session, session.route, trio.current_time(), self._rng)

    def session_ended(self, session: Session) -> None:
        del self.sessions[session.conn_id]

    # -- running ----------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, serve until ``shutdown``, then wait for the sessions to end."""
        if self.stopping:  # shut down before it started: nothing to open
            task_status.started({})
            log_event(log, logging.INFO, "stopped")
            return
        try:
            try:
                await self.jwks.prepare()  # before any listener opens: a route without keys cannot serve
            except JwksStartupError as exc:
                raise ListenError(str(exc)) from None
            for spec in self.generation.config.listeners:
                self.listeners[spec.name] = ListenerSlot(spec, self._open(spec))
            for name, sockets in self._inherited.items():  # passed by systemd, but no listener has the name
                log_event(
                    log, logging.WARNING, "listener_unused",
                    name=name, sockets=len(sockets), reason="no listener has this name; closed",
                )  # fmt: skip
                for sock in sockets:
                    sock.close()
            self._inherited.clear()
            for name, slot in self.listeners.items():
                for host, port in self.addresses[name]:
                    log_event(
                        log,
                        logging.INFO,
                        "listening",
                        listener=name,
                        address=hostport(host, port),
                        tls=slot.spec.tls is not None,
                    )
            async with trio.open_nursery() as engine_nursery:
                if self.engine is not None:
                    engine_nursery.start_soon(self.engine.run)
                await self._serve_connections(task_status)
                engine_nursery.cancel_scope.cancel()  # every session has ended
        finally:
            for slot in self.listeners.values():
                slot.close()
        log_event(log, logging.INFO, "stopped")

    async def _serve_connections(self, task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]]) -> None:
        """The control tasks, the accept loops and one task per connection, until all have ended."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            if self.engine is not None:
                connections.start_soon(self._hold_engine_sessions, self.engine, connections)
            async with trio.open_nursery() as control:
                self._control = control
                self.drainer.nursery = control
                control.start_soon(idle_sweeper, self.sessions, lambda: self.generation.config)
                control.start_soon(measure_loop_lag, self.metrics)
                control.start_soon(self.jwks.run)
                control.start_soon(self.rebalancer.run)
                for pool in self.generation.config.pools.values():
                    await self._start_checker(pool)
                await self.discovery.start(control, self.generation.config.pools)  # first lookups, bounded
                for slot in self.listeners.values():
                    self._start_accepting(slot)
                task_status.started(self.addresses)
                if self.on_ready is not None:
                    self.on_ready()

    async def _hold_engine_sessions(self, engine: Engine, connections: trio.Nursery) -> None:
        """Keep ``connections`` open while the engine relays sessions, as their own tasks would.

        Sessions the engine relays have no task: once the proxy stops, this
        one waits until the engine has none left and no handshake is still
        running (one may yet hand a session over). Cancelled (the shutdown's
        deadline, an abort), it ends what is left, as cancelling their tasks
        would.
        """
        try:
            await self._stopped.wait()
            me = trio.lowlevel.current_task()
            while True:
                if engine.sessions:
                    await engine.until_empty()
                elif connections.child_tasks - {me}:  # handshakes (or the spread closes) still running
                    await trio.sleep(HOLD_POLL_S)
                else:
                    return
        finally:
            engine.end_all()

    def _open(self, spec: ListenerConfig) -> list[socket.socket]:
        inherited = self._inherited.pop(spec.name, None)
        if inherited:
            log_event(log, logging.INFO, "listener_inherited", listener=spec.name, sockets=len(inherited))
            for sock in inherited:
                host, port = sock.getsockname()[:2]
                if port != spec.bind.port or (host != spec.bind.host and spec.bind.host not in ("0.0.0.0", "::")):
                    log_event(
                        log, logging.WARNING, "listener_address",
                        listener=spec.name, passed=hostport(host, port), bind=spec.bind,
                        reason="the socket passed by systemd is used; its address differs from the listener bind",
                    )  # fmt: skip
            return inherited
        try:
            return open_listener(spec)
        except OSError as exc:
            raise ListenError(f"listener {spec.name}: cannot listen on {spec.bind}: {exc.strerror or exc}") from None

    def _start_accepting(self, slot: ListenerSlot) -> None:
        assert self._control is not None and self._connections is not None
        connections = self._connections

        def handler(sock: socket.socket, address: Any) -> Any:
            return handle_connection(sock, self, slot.spec, address)  # the slot's settings at accept time

        def overload_answer() -> bytes | None:
            return None if slot.spec.tls is not None else OVERLOAD_RESPONSE  # no plain text on a TLS port

        def shed(count: int) -> None:  # refusals without a session: counted here, logged by the loop
            self.metrics.refused(NO_ROUTE, "overload", None if slot.spec.tls is not None else 503, count)

        async def accept_all() -> None:
            with slot.scope:
                async with trio.open_nursery() as loops:
                    for sock in slot.sockets:
                        loops.start_soon(accept_loop, sock, handler, connections, overload_answer, shed)

        self._control.start_soon(accept_all)

    async def _start_checker(self, pool: PoolConfig) -> None:
        assert self._control is not None
        if not self.health_checks:
            return
        checker = HealthChecker(pool, self.registry, on_change=self.drainer.health_changed)
        self.health_checkers[pool.name] = checker
        await self._control.start(checker.run)

    # -- reload (config.diff has the plans, control.reload the SIGHUP flow) -------------

    @property
    def reloads(self) -> int:
        return self.reloader.applied

    @property
    def reload_failures(self) -> int:
        return self.reloader.failed

    @property
    def last_reload_unix(self) -> float | None:
        return self.reloader.last_unix

    @property
    def last_reload_error(self) -> str | None:
        return self.reloader.last_error

    async def reload_from(
        self, path: str, load: Callable[[str], Config], apply: Callable[[Config], None] | None = None
    ) -> None:
        """SIGHUP: load ``path`` in a thread, then apply it (default ``reload``), or log why not and keep the old config."""
        await self.reloader.reload_from(path, load, apply or self.reload, self.reload_failed)

    async def reload_and_wait(self, start: Callable[[], None]) -> list[str] | None:
        """``POST /reload``: see ``Reloader.reload_and_wait``."""
        return await self.reloader.reload_and_wait(start)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """``GET /ready``: see ``control.ready``."""
        from .control.ready import readiness

        return readiness(self)

    def reload(self, config: Config) -> None:
        """Apply a validated config at once; raises ReloadError (and changes nothing) when it cannot."""
        old = self.generation
        config = carry_discovered(old.config, with_fd_budget(config, old.config))  # same DNS question: same set
        plan = plan_listeners({name: slot.spec.bind for name, slot in self.listeners.items()}, config.listeners)
        opened: dict[str, list[socket.socket]] = {}
        freed: list[ListenerSlot] = []  # old listeners closed early to free a port
        try:
            for spec in plan.open:
                try:
                    # a worker is given its sockets by the supervisor (``supervisor.worker``)
                    opened[spec.name] = self._inherited.pop(spec.name, []) or open_listener(spec)
                except OSError as exc:
                    # The port may be held by a listener this reload removes or moves (e.g.
                    # 127.0.0.1:443 → 0.0.0.0:443): free it and try once more. Connection
                    # attempts to that port are refused for that instant only.
                    blocker = next(
                        (n for n in plan.close
                         if self.listeners[n].spec.bind.port == spec.bind.port and self.listeners[n] not in freed),
                        None,
                    )
                    if exc.errno != errno.EADDRINUSE or blocker is None:
                        raise ReloadError(f"listener {spec.name}: cannot bind {spec.bind}: {exc.strerror or exc}") from None
                    self.listeners[blocker].close()
                    freed.append(self.listeners[blocker])
                    opened[spec.name] = open_listener(spec)
        except (OSError, ReloadError) as exc:
            for sockets in opened.values():
                for sock in sockets:
                    sock.close()
            for slot in freed:  # put back what was freed (best effort)
                try:
                    slot.sockets = open_listener(slot.spec)
                    slot.scope = trio.CancelScope()
                    self._start_accepting(slot)
                except OSError:
                    pass
            if isinstance(exc, ReloadError):
                raise
            raise ReloadError(f"cannot open listener: {exc.strerror or exc}") from None
        # From here on nothing fails and nothing waits: the switch is atomic for every task.
        new = Generation(config, old.number + 1)
        previous = self.listeners
        self.listeners = {}
        for spec in config.listeners:
            if spec.name in plan.reuse:
                slot = previous.pop(plan.reuse[spec.name])
                slot.spec = spec  # the next accept uses the new settings (TLS contexts included)
                self.listeners[spec.name] = slot
            else:
                slot = self.listeners[spec.name] = ListenerSlot(spec, opened[spec.name])
                if self._control is not None and not self.stopping:
                    self._start_accepting(slot)
                for host, port in self.addresses[spec.name]:
                    log_event(
                        log,
                        logging.INFO,
                        "listening",
                        listener=spec.name,
                        address=hostport(host, port),
                    )
        for name, slot in previous.items():
            slot.close()
            log_event(log, logging.INFO, "listener_closed", listener=name)
        self.generation = new
        if config.log != old.config.log and self.log_overridden is False:
            from . import log as logsetup

            logsetup.configure(config.log.level, config.log.format)
        self._update_checkers(config)
        self.discovery.update(config.pools)
        self.drainer.drain_removed(removed_backends(old.config, config))
        if self._control is not None and not self.stopping:
            self._control.start_soon(revoke_open, self.sessions, config, self._rng)  # revoked_file was re-read
        self.registry.forget(  # gone from every pool and unused: no state kept; health per (pool, address) of the new config
            keep=addresses_in_use(config), pools={(name, b.address) for name, p in config.pools.items() for b in p.backends}
        )
        self.reloader.record_applied(time.time())
        log_event(
            log,
            logging.INFO,
            "reloaded",
            generation=new.number,
            pools=len(config.pools),
            routes=len(config.routes),
        )

    def reload_failed(self, errors: Sequence[str]) -> None:
        """Count and log a refused reload; the old config keeps serving."""
        self.reloader.record_failed(errors, self.generation.number)

    def _update_checkers(self, new: Config) -> None:
        running = {name: checker.can_update for name, checker in self.health_checkers.items()}
        for name, action in plan_checkers(running, new.pools).items():
            if action is CheckerAction.STOP:
                self.health_checkers.pop(name).stop()
            elif action is CheckerAction.UPDATE:
                self.health_checkers[name].update(new.pools[name])
            elif self._control is not None:
                self._control.start_soon(self._start_checker, new.pools[name])

    def swap_pool(self, pool: PoolConfig) -> None:
        """DNS discovery: ``pool`` (derived from the running one) replaces it, as a reload of that pool would.

        The running generation takes it (sessions being set up pick from it at
        once), its selector is rebuilt, its health checker updated, and the
        backends that left it drain like reload removals.
        """
        generation = self.generation
        old = generation.config
        config = dataclasses.replace(old, pools={**old.pools, pool.name: pool})
        generation.config = config
        generation.selectors[pool.name] = make_selector(pool)
        checker = self.health_checkers.get(pool.name)
        if checker is not None:
            checker.update(pool)
        self.drainer.drain_removed(removed_backends(old, config))
        self.registry.forget(keep=addresses_in_use(config))

    # -- draining (control.drain) -----------------------------------------------------

    def drain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: drain a backend of a pool. None if unknown, False if it was draining already."""
        return self.drainer.drain_backend(pool, address)

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: take a backend back into rotation. None if unknown, False if it was not draining."""
        return self.drainer.undrain_backend(pool, address)

    # -- shutdown -----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, close every session with 1001 spread over shutdown.spread, wait up to shutdown.timeout."""
        if self.stopping:
            return
        self.stopping = True
        self._stopped.set()
        settings = self.generation.config.shutdown
        log_event(
            log,
            logging.INFO,
            "shutdown",
            sessions=len(self.sessions),
            spread_s=float(settings.spread_s),
            timeout_s=float(settings.timeout_s),
        )
        for slot in self.listeners.values():
            slot.close()  # new connection attempts are refused from now on
        if self._control is not None:
            self._control.cancel_scope.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.deadline = trio.current_time() + settings.timeout_s
            self._connections.start_soon(
                partial(
                    close_spread,
                    list(self.sessions.values()),
                    settings.spread_s,
                    CLOSE_GOING_AWAY,
                    CLOSE_GOING_AWAY,
                    "proxy shutting down",
                    Outcome.SHUTDOWN,
                    live=self.sessions,
                    rng=self._rng,
                )
            )

    def abort(self) -> None:
        """Close everything now."""
        self.stopping = True
        self._stopped.set()
        if self._control is not None:
            self._control.cancel_scope.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    # -- state for the admin API and systemd ------------------------------------------

    def render_metrics(self, accept: str | None = None) -> tuple[str, bytes]:
        """What GET /metrics returns: (content type, body), OpenMetrics if ``accept`` asks for it."""
        return render(self._metrics_registry, accept)

    async def render_metrics_off_loop(self, accept: str | None = None) -> tuple[str, bytes]:
        """``render_metrics``, encoded in a worker thread from a snapshot taken on the loop."""
        return await render_off_loop(self._metrics_registry, accept)

    def status_line(self) -> str:
        count = len(self.sessions)
        return f"{count} session{'' if count == 1 else 's'}, config generation {self.generation.number}"

    def status(self) -> dict[str, object]:
        """What GET /status returns (and the status page shows)."""
        return snapshot(self)


if TYPE_CHECKING:
    _host: type[SessionHost] = App  # an App is what a session needs (edge.host); mypy checks it here
