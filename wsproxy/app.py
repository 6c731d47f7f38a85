"""The root of the task tree: listeners, sessions and the control tasks.

::

    App.serve
    ├── connections : one task per downstream connection (edge.session.handle_connection),
    │                 and the spread closes of a shutdown
    └── control     : one accept loop per listening socket (each in its own cancel scope),
                      the idle sweeper, one health checker per pool, drains, the admin server,
                      the systemd watchdog
    run.main        : App.serve + the signal loop (SIGHUP → reload, SIGTERM/SIGINT → shutdown),
                      systemd notify, the admin listener

``App`` owns everything a running proxy shares: the current ``Generation``
(the config and what is built from it), the backend ``Registry``, the table of
established sessions, the per-client table and the metrics. Nothing of this is
global, so several ``App``s can run in one process (the tests do).

Theory of operation: reload
---------------------------
A reload is a new ``Config``, loaded and validated in full (files included)
before ``App.reload`` is called. ``reload`` first does the only part that can
still fail, opening the sockets of new or moved listeners; if that fails
nothing has changed. Then, without a checkpoint in between: listeners that
kept their address keep their socket and serve the new settings from the next
accept on; removed ones stop accepting; the generation reference is swapped
(new sessions use the new routes and pools at once, established ones keep
theirs); health checkers are updated; sessions whose backend left its pool
drain. Backend state lives in the registry by address, so it survives.
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
from typing import Any

import trio

from .balance.policy import Selector, make_selector
from .config.schema import Address, Config, DrainConfig, ListenerConfig, PoolConfig, PoolName, hostport
from .control.health import HealthChecker
from .control.metrics import NO_ROUTE, Metrics, collector_registry, measure_loop_lag, render
from .control.registry import BackendState, Health, Registry
from .control.status import snapshot
from .edge.gate import RouteGate
from .edge.engine import HAVE_EPOLL, Engine
from .edge.listener import accept_loop, open_listener
from .edge.overload import OVERLOAD_RESPONSE
from .edge.session import Session, handle_connection
from .proto.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from .proto.limits import ClientTable, fd_budget
from .proto.relay import Outcome
from .proto.routing import Router

log = logging.getLogger("wsproxy.app")

#: Random share of a spread interval added to each close, so closes do not fall on a grid.
SPREAD_JITTER = 0.5
#: An unlimited (or huge) RLIMIT_NOFILE counts as this many descriptors.
MAX_NOFILE = 10_000_000



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
            log.info(
                "event=limits max_connections=%d (from RLIMIT_NOFILE=%d) reserve=%d",
                budget.max_connections, soft, budget.reserve,
            )
        return dataclasses.replace(config, limits=dataclasses.replace(limits, max_connections=budget.max_connections))
    if (limits.max_connections == 0 or limits.max_connections > budget.max_connections) and (
        previous is None or limits.max_connections != before
    ):
        log.warning(
            "event=limits max_connections=%s reason=%r",
            limits.max_connections or "unlimited",
            f"more than RLIMIT_NOFILE={soft} allows ({budget.max_connections}); "
            "beyond that, clients get 503 when the proxy runs out of descriptors",
        )
    return config


class ListenError(Exception):
    """A listener of the initial config cannot be opened (the port is taken, or not ours)."""


class ReloadError(Exception):
    """A valid config that could not be applied (a new listener could not bind), or one that could not be loaded in time."""


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
        self.sessions: dict[str, Session] = {}
        self.clients = ClientTable()  # per client address: live connections, handshake rate
        self.metrics = Metrics(started_unix=time.time())
        self.connection_count = 0  # downstream connections being served
        self.health_checkers: dict[PoolName, HealthChecker] = {}
        self.listeners: dict[str, ListenerSlot] = {}
        self.stopping = False
        self.last_reload_unix: float | None = None
        self.last_reload_error: str | None = None
        self.reloads = 0
        self.reload_failures = 0
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
        self._removals: dict[tuple[PoolName, Address], int] = {}  # removal drains: (pool, backend) → epoch
        self._reloading = False  # a reload_from is loading or applying
        self._reload_again = False  # a SIGHUP came during it: load once more when it is done
        self._loader_busy = False  # a loader thread is running (possibly abandoned, still stuck)
        # POST /reload waits for "its" reload: attempts are numbered, their errors kept briefly.
        self._reload_attempts = 0
        self._reload_results: dict[int, list[str] | None] = {}  # attempt → errors ([] applied, None not run)
        self._reload_done = trio.Event()
        self._last_reload_errors: list[str] = []
        self._metrics_registry = collector_registry(self)  # read at scrape time, nothing per frame

    def next_conn_id(self) -> str:
        return f"{self._conn_prefix}{next(self._conn_ids):x}"

    @property
    def addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name → the addresses it is bound to."""
        return {name: [sock.getsockname()[:2] for sock in slot.sockets] for name, slot in self.listeners.items()}

    # -- running ----------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, serve until ``shutdown``, then wait for the sessions to end."""
        try:
            for spec in self.generation.config.listeners:
                self.listeners[spec.name] = ListenerSlot(spec, self._open(spec))
            for name, sockets in self._inherited.items():  # passed by systemd, but no listener has the name
                log.warning(
                    "event=listener_unused name=%s sockets=%d reason='no listener has this name; closed'",
                    name, len(sockets),
                )
                for sock in sockets:
                    sock.close()
            self._inherited.clear()
            for name, slot in self.listeners.items():
                for host, port in self.addresses[name]:
                    log.info("event=listening listener=%s address=%s tls=%s", name, hostport(host, port), slot.spec.tls is not None)
            async with trio.open_nursery() as engine_nursery:
                if self.engine is not None:
                    engine_nursery.start_soon(self.engine.run)
                await self._serve_connections(task_status)
                engine_nursery.cancel_scope.cancel()  # every session has ended
        finally:
            for slot in self.listeners.values():
                slot.close()
        log.info("event=stopped")

    async def _serve_connections(self, task_status: trio.TaskStatus[dict[str, list[tuple[str, int]]]]) -> None:
        """The control tasks, the accept loops and one task per connection, until all have ended."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            async with trio.open_nursery() as control:
                self._control = control
                control.start_soon(self._idle_sweeper)
                control.start_soon(measure_loop_lag, self.metrics)
                for pool in self.generation.config.pools.values():
                    await self._start_checker(pool)
                for slot in self.listeners.values():
                    self._start_accepting(slot)
                task_status.started(self.addresses)
                if self.on_ready is not None:
                    self.on_ready()

    def _open(self, spec: ListenerConfig) -> list[socket.socket]:
        inherited = self._inherited.pop(spec.name, None)
        if inherited:
            log.info("event=listener_inherited listener=%s sockets=%d", spec.name, len(inherited))
            for sock in inherited:
                host, port = sock.getsockname()[:2]
                if port != spec.bind.port or (host != spec.bind.host and spec.bind.host not in ("0.0.0.0", "::")):
                    log.warning(
                        "event=listener_address listener=%s passed=%s bind=%s reason='the socket passed by systemd is used; "
                        "its address differs from the listener bind'",
                        spec.name, hostport(host, port), spec.bind,
                    )
            return inherited
        try:
            return open_listener(spec)
        except OSError as exc:
            raise ListenError(f"listener {spec.name}: cannot listen on {spec.bind}: {exc.strerror or exc}") from None

    def _start_accepting(self, slot: ListenerSlot) -> None:
        assert self._control is not None and self._connections is not None
        connections = self._connections

        def handler(sock: socket.socket) -> Any:
            return handle_connection(sock, self, slot.spec)  # the slot's settings at accept time

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
        checker = HealthChecker(pool, self.registry, on_change=self._health_changed)
        self.health_checkers[pool.name] = checker
        await self._control.start(checker.run)

    # -- reload -------------------------------------------------------------------

    async def reload_from(
        self, path: str, load: Callable[[str], Config], apply: Callable[[Config], None] | None = None
    ) -> None:
        """SIGHUP: load ``path`` in a thread, then apply it, or log why not and keep the old config.

        ``apply`` (default ``reload``) applies the loaded config or raises ReloadError;
        ``wsproxy run`` passes one that applies the admin section too.

        The loader runs under the running config's ``timeouts.reload``; past it
        the reload is abandoned (``event=reload_failed``). The thread is
        abandoned too (``abandon_on_cancel``): a loader stuck in a read can
        delay neither this task's end, nor the signal loop, nor a shutdown.
        While an abandoned loader is still stuck, further reloads fail at once
        rather than pile up threads. A SIGHUP that arrives during a reload runs
        one more reload when it is done (they coalesce).
        """
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        try:
            while not self.stopping:
                self._reload_again = False
                self._reload_attempts += 1
                attempt, applied, failed = self._reload_attempts, self.reloads, self.reload_failures
                await self._reload_once(path, load, apply or self.reload)
                result = list(self._last_reload_errors) if self.reload_failures != failed else [] if self.reloads != applied else None
                self._finish_attempt(attempt, result)
                if not self._reload_again:
                    break
        finally:
            self._reloading = False
            self._reload_done.set()  # a waiter whose reload will not run (shutting down) looks again
            self._reload_done = trio.Event()

    async def _reload_once(self, path: str, load: Callable[[str], Config], apply: Callable[[Config], None]) -> None:
        from .errors import ConfigErrors

        if self._loader_busy:
            self.reload_failed([f"{path}: the loader of an abandoned reload is still stuck; not loading again until it returns"])
            return
        timeout_s = self.generation.config.timeouts.reload_s

        def load_and_mark() -> Config:
            try:
                return load(path)
            finally:
                self._loader_busy = False  # read by the trio thread; a plain flag is enough

        self._loader_busy = True
        new: Config | None = None
        try:
            with trio.move_on_after(timeout_s):
                new = await trio.to_thread.run_sync(load_and_mark, abandon_on_cancel=True)
        except ConfigErrors as exc:
            self.reload_failed([str(e) for e in exc.errors])
            return
        except Exception as exc:  # a loader bug must not take the running proxy down
            log.exception("event=reload_error path=%s", path)
            self.reload_failed([f"{path}: loading failed: {type(exc).__name__}"])
            return
        if new is None:
            self.reload_failed([f"{path}: loading did not finish within {timeout_s:g}s (timeouts.reload); abandoned"])
            return
        if self.stopping:
            return
        try:
            apply(new)
        except ReloadError as exc:
            self.reload_failed([str(exc)])

    async def reload_and_wait(self, start: Callable[[], None]) -> list[str] | None:
        """``POST /reload``: ``start`` a reload (as SIGHUP does), wait for it, return its errors.

        [] when the new config was applied; the errors when it was refused
        (the old config keeps serving); None when the process is shutting down.
        The reload waited for is the first one that starts after this call (one
        already loading may have read the file before it changed).
        """
        if self.stopping:
            return None
        attempt = self._reload_attempts + 1
        start()
        while attempt not in self._reload_results:
            if self.stopping and not self._reloading:
                return None
            await self._reload_done.wait()
        return self._reload_results[attempt]

    def _finish_attempt(self, attempt: int, result: list[str] | None) -> None:
        self._reload_results[attempt] = result
        for old in [n for n in self._reload_results if n <= attempt - 16]:
            del self._reload_results[old]
        self._reload_done.set()
        self._reload_done = trio.Event()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """``GET /ready``: see ``control.ready``."""
        from .control.ready import readiness

        return readiness(self)

    def reload(self, config: Config) -> None:
        """Apply a validated config at once; raises ReloadError (and changes nothing) when it cannot."""
        old = self.generation
        config = with_fd_budget(config, old.config)
        # Listeners are matched by address first (a rename keeps the socket), then by name.
        by_bind = {slot.spec.bind: name for name, slot in self.listeners.items()}
        reuse: dict[str, str] = {}  # new listener name → the old listener whose sockets it takes
        for spec in config.listeners:
            old_name = by_bind.get(spec.bind)
            if old_name is not None and old_name not in reuse.values():
                reuse[spec.name] = old_name
        opened: dict[str, list[socket.socket]] = {}
        freed: list[ListenerSlot] = []  # old listeners closed early to free a port
        try:
            for spec in config.listeners:
                if spec.name in reuse:
                    continue
                try:
                    # a worker is given its sockets by the supervisor (``supervisor.worker``)
                    opened[spec.name] = self._inherited.pop(spec.name, []) or open_listener(spec)
                except OSError as exc:
                    # The port may be held by a listener this reload removes or moves (e.g.
                    # 127.0.0.1:443 → 0.0.0.0:443): free it and try once more. Connection
                    # attempts to that port are refused for that instant only.
                    blocker = next(
                        (n for n, slot in self.listeners.items()
                         if slot.spec.bind.port == spec.bind.port and n not in reuse.values()
                         and slot not in freed),
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
            if spec.name in reuse:
                slot = previous.pop(reuse[spec.name])
                slot.spec = spec  # the next accept uses the new settings (TLS contexts included)
                self.listeners[spec.name] = slot
            else:
                slot = self.listeners[spec.name] = ListenerSlot(spec, opened[spec.name])
                if self._control is not None and not self.stopping:
                    self._start_accepting(slot)
                for host, port in self.addresses[spec.name]:
                    log.info("event=listening listener=%s address=%s", spec.name, hostport(host, port))
        for name, slot in previous.items():
            slot.close()
            log.info("event=listener_closed listener=%s", name)
        self.generation = new
        if config.log != old.config.log and self.log_overridden is False:
            from . import log as logsetup

            logsetup.configure(config.log.level, config.log.format)
        self._update_checkers(old.config, config)
        self._drain_removed(old.config, config)
        self.reloads += 1
        self.last_reload_unix = time.time()
        self.last_reload_error = None
        log.info("event=reloaded generation=%d pools=%d routes=%d", new.number, len(config.pools), len(config.routes))

    def reload_failed(self, errors: Sequence[str]) -> None:
        """Count and log a refused reload; the old config keeps serving."""
        self.reload_failures += 1
        self._last_reload_errors = list(errors)
        self.last_reload_error = "; ".join(errors)
        for error in errors:
            log.error("event=reload_failed error=%r", error)
        log.error("event=reload_failed generation=%d errors=%d action=kept_old_config", self.generation.number, len(errors))

    def _update_checkers(self, old: Config, new: Config) -> None:
        for name in [n for n in self.health_checkers if n not in new.pools]:
            self.health_checkers.pop(name).stop()
        for name, pool in new.pools.items():
            checker = self.health_checkers.get(name)
            if checker is not None:
                try:
                    checker.update(pool)
                    continue
                except RuntimeError:  # a pool that gained health checks: a new checker runs them
                    pass
            if self._control is not None:
                self._control.start_soon(self._start_checker, pool)

    def _drain_removed(self, old: Config, new: Config) -> None:
        """The sessions of backends that left their pool drain (the pool no longer picks them)."""
        for name, pool in old.pools.items():
            kept = {b.address for b in new.pools[name].backends} if name in new.pools else set()
            drain = new.pools[name].drain if name in new.pools else pool.drain
            for backend in pool.backends:
                if backend.address not in kept:
                    key = (name, backend.address)
                    epoch = self._removals[key] = self._removals.get(key, 0) + 1
                    self._drain_sessions_of(
                        name, backend.address, drain, "removed by reload", still=partial(self._still_removed, key, epoch)
                    )

    def _still_removed(self, key: tuple[PoolName, Address], epoch: int) -> bool:
        """A removal drain stands while no later reload re-added or removed the backend again."""
        pool = self.generation.config.pools.get(key[0])
        back = pool is not None and any(b.address == key[1] for b in pool.backends)
        return self._removals.get(key) == epoch and not back

    # -- draining -----------------------------------------------------------------

    def drain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: drain a backend of a pool. None if unknown, False if it was draining already."""
        backend = self._find(pool, address)
        if backend is None:
            return None
        if self.registry.state(backend).draining:
            return False
        self._drain(pool, backend, self.generation.config.pools[PoolName(pool)].drain, "admin")
        return True

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: take a backend back into rotation. None if unknown, False if it was not draining."""
        backend = self._find(pool, address)
        if backend is None:
            return None
        state = self.registry.state(backend)
        if not state.draining:
            return False
        self._undrain(state)
        log.info("event=undrain pool=%s backend=%s", pool, backend)
        return True

    def _find(self, pool: str, address: str) -> Address | None:
        config = self.generation.config.pools.get(PoolName(pool))
        if config is None:
            return None
        return next((b.address for b in config.backends if str(b.address) == address), None)

    def _health_changed(self, pool: PoolConfig, address: Address, health: Health) -> None:
        if health is Health.DOWN and pool.drain.on_unhealthy:
            self._drain(pool.name, address, pool.drain, "unhealthy")
        elif health is Health.UP:
            state = self.registry.state(address)
            if state.draining and state.drain_reason == "unhealthy":
                self._undrain(state)

    def _undrain(self, state: BackendState) -> None:
        state.draining = False
        state.drain_reason = ""
        state.drain_epoch += 1  # a drain still waiting for its grace period gives up

    def _drain(self, pool: str, address: Address, drain: DrainConfig, reason: str) -> None:
        """Take a backend out of rotation (every pool: the state is per address), then close its sessions."""
        state = self.registry.state(address)
        if state.draining:
            return
        state.draining = True
        state.drain_reason = reason
        state.drain_epoch += 1
        epoch = state.drain_epoch
        self._drain_sessions_of(pool, address, drain, reason, still=lambda: state.drain_epoch == epoch)

    def _drain_sessions_of(
        self,
        pool: str,
        address: Address,
        drain: DrainConfig,
        reason: str,
        still: Callable[[], bool],
    ) -> None:
        """Close the sessions of ``pool`` on ``address`` after the grace period, spread out.

        ``still`` says whether the drain still stands when its time comes: an
        undrain, or a reload that puts the backend back, cancels it.
        """
        sessions = self._sessions_on(pool, address)
        log.info(
            "event=drain pool=%s backend=%s reason=%r sessions=%d close_after_s=%g spread_s=%g",
            pool, address, reason, len(sessions), drain.timeout_s, drain.spread_s,
        )
        if self._control is not None:
            self._control.start_soon(self._drain_later, pool, address, drain, reason, still)

    def _sessions_on(self, pool: str, address: Address) -> list[Session]:
        return [
            s for s in self.sessions.values()
            if s.backend is not None and s.backend.address == address and s.route is not None and s.route.pool == pool
        ]

    async def _drain_later(
        self, pool: str, address: Address, drain: DrainConfig, reason: str, still: Callable[[], bool]
    ) -> None:
        await trio.sleep(drain.timeout_s)
        if not still():
            return
        sessions = self._sessions_on(pool, address)
        log.info("event=drain_closing pool=%s backend=%s sessions=%d", pool, address, len(sessions))
        await self._close_spread(
            sessions,
            drain.spread_s,
            CLOSE_SERVICE_RESTART,
            CLOSE_GOING_AWAY,
            f"backend draining ({reason})",
            Outcome.DRAIN,
            still=still,
        )
        key = (PoolName(pool), address)
        if reason == "removed by reload" and still():
            del self._removals[key]  # done: forget it, so many reloads leave nothing behind

    async def _close_spread(
        self,
        sessions: Sequence[Session],
        spread_s: float,
        client_code: int,
        backend_code: int,
        reason: str,
        kind: Outcome,
        *,
        still: Callable[[], bool] = lambda: True,
    ) -> None:
        """Close ``sessions`` evenly over ``spread_s``, each at a jittered point of its slot."""
        count = len(sessions)
        if not count:
            return
        slot_s = spread_s / count
        start = trio.current_time()
        order = list(sessions)
        self._rng.shuffle(order)  # nobody is always first
        for index, session in enumerate(order):
            at = start + slot_s * (index + self._rng.uniform(0, SPREAD_JITTER))
            await trio.sleep_until(at)
            if not still():
                return
            relay = session.relay
            if relay is not None and session.conn_id in self.sessions:
                session.draining = True
                relay.finish(client_code, backend_code, reason, kind)

    # -- shutdown -----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, close every session with 1001 spread over shutdown.spread, wait up to shutdown.timeout."""
        if self.stopping:
            return
        self.stopping = True
        settings = self.generation.config.shutdown
        log.info(
            "event=shutdown sessions=%d spread_s=%g timeout_s=%g", len(self.sessions), settings.spread_s, settings.timeout_s
        )
        for slot in self.listeners.values():
            slot.close()  # new connection attempts are refused from now on
        if self._control is not None:
            self._control.cancel_scope.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.deadline = trio.current_time() + settings.timeout_s
            self._connections.start_soon(
                self._close_spread,
                list(self.sessions.values()),
                settings.spread_s,
                CLOSE_GOING_AWAY,
                CLOSE_GOING_AWAY,
                "proxy shutting down",
                Outcome.SHUTDOWN,
            )

    def abort(self) -> None:
        """Close everything now."""
        self.stopping = True
        if self._control is not None:
            self._control.cancel_scope.cancel()
        if self._connections is not None:
            self._connections.cancel_scope.cancel()

    # -- state for the admin API and systemd ------------------------------------------

    def render_metrics(self, accept: str | None = None) -> tuple[str, bytes]:
        """What GET /metrics returns: (content type, body), OpenMetrics if ``accept`` asks for it."""
        return render(self._metrics_registry, accept)

    def status_line(self) -> str:
        count = len(self.sessions)
        return f"{count} session{'' if count == 1 else 's'}, config generation {self.generation.number}"

    def status(self) -> dict[str, object]:
        """What GET /status returns (and the status page shows)."""
        return snapshot(self)

    # -- the idle sweeper -----------------------------------------------------------

    async def _idle_sweeper(self) -> None:
        """Idle timeouts and keepalive pings for every session, without per-chunk timers.

        One pass over the sessions every ``timeouts.idle`` / 8 (or a quarter of
        the shortest keepalive timeout), at most every 5 s. A session is idle
        when its byte counters have not moved since it was last seen moving.
        """
        while True:
            config = self.generation.config
            period = config.timeouts.idle_s / 8
            for route in config.routes:
                if route.keepalive is not None:
                    period = min(period, route.keepalive.timeout_s / 4, route.keepalive.interval_s / 4)
            await trio.sleep(min(max(period, 0.02), 5.0))
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
                    relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "idle timeout", Outcome.IDLE)
                    continue
                keepalive = session.route.keepalive if session.route is not None else None
                if keepalive is not None:
                    relay.keepalive(now, keepalive.interval_s, keepalive.timeout_s)


