"""The supervisor of ``workers: N`` (trio shell): workers, signals, systemd, the admin API, health, upgrades.

::

    Supervisor.run
    ├── signals        SIGHUP → reload, SIGTERM/SIGINT → shutdown (twice: at once), SIGUSR2 → upgrade
    ├── admin          the admin listener (AdminServer), answering from the workers' reports
    ├── health         one HealthChecker per pool; verdicts pushed to every worker
    ├── slot 0..N-1    spawn ``wsproxy worker``, talk to it, restart it with backoff when it exits
    └── systemd        READY once every worker serves, STATUS, the watchdog

The supervisor serves no traffic. It opens N ``SO_REUSEPORT`` sockets per
listener address (or takes systemd's, which all workers then share) and keeps
them open for its whole life: a worker that exits leaves its queue to its
successor, and meanwhile another worker accepts on it (``adopt``).

Upgrade (``SIGUSR2``, ``POST /upgrade``, ``wsproxy upgrade``): the supervisor
starts ``wsproxy run -c FILE`` (the installed program, ``program()``, through a
shell that exits at once, so the new supervisor is the service manager's child) with every
listening socket and one end of a socketpair passed as descriptors
(``WSPROXY_UPGRADE_FD``, ``WSPROXY_UPGRADE_LISTENERS``). The new supervisor
starts its workers on those sockets and, once all serve, says ``upgrade_ready``;
the old one then releases the admin listener (``admin_released``: the new one
binds it), tells its workers to ``retire`` (stop accepting, keep sessions until
they end or ``upgrade.timeout``, then close them with 1001 spread over
``shutdown.spread``) and exits when they have. Under systemd the new
supervisor sends ``MAINPID=`` then ``READY=1`` (the unit needs
``NotifyAccess=all``). If the new generation fails to start (bad config, a
crash, no answer within ``UPGRADE_START_TIMEOUT_S``), the old one keeps
serving, logs ``event=upgrade_failed`` and says why to ``wsproxy upgrade``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import trio

from ..app import ListenError
from ..config.schema import Address, Config, ListenerConfig, PoolConfig, PoolName, hostport
from ..control.health import HealthChecker
from ..control.metrics import Metrics
from ..balance.registry import Health, Registry
from ..control.ready import available_by_pool
from ..config.diff import CheckerAction, plan_checkers
from ..control.reload import ReloadRecord
from ..edge.listener import migrate_req, open_listener
from . import health
from ..log import log_event
from .ipc import Channel, ChannelClosed
from .merge import TEXT_CONTENT_TYPE, merge_metrics, merge_status
from .messages import Message
from .table import ReloadRound, RoundState, WorkerSlot, WorkerState, adopter, fingerprint

log = logging.getLogger("wsproxy.supervisor")

#: How long a new generation may take to have every worker serving before the upgrade is abandoned.
UPGRADE_START_TIMEOUT_S = 60.0
#: How often the health table is pushed to the workers even without a change (round trip times).
HEALTH_PUSH_INTERVAL_S = 1.0
UPGRADE_FD_VARIABLE = "WSPROXY_UPGRADE_FD"
UPGRADE_LISTENERS_VARIABLE = "WSPROXY_UPGRADE_LISTENERS"

#: Sockets of a listener: one list per worker slot, each with one socket per address the bind resolves to.
SlotSockets = list[list[socket.socket]]


def program() -> list[str]:
    """How to start this program again: ``python -m wsproxy``, or the launcher it was started by.

    A console script or a launcher (``/usr/bin/wsproxy``, which may set up
    ``sys.path`` itself, as under ``python -I``) is run again by path; ``python -m
    wsproxy`` again as a module (``PYTHONPATH`` is inherited).
    """
    launcher = sys.argv[0] if sys.argv else ""
    if not launcher or launcher.endswith("__main__.py") or not os.path.isfile(launcher):
        return [sys.executable, "-m", "wsproxy"]
    return [sys.executable, os.path.abspath(launcher)]


def take_upgrade_fds(environ: dict[str, str] | Any = os.environ) -> tuple[Channel | None, dict[str, SlotSockets]]:
    """The handover channel and listening sockets an old supervisor passed (an upgrade), or (None, {})."""
    fd_text = environ.pop(UPGRADE_FD_VARIABLE, None)
    listeners_text = environ.pop(UPGRADE_LISTENERS_VARIABLE, None)
    if not fd_text or not listeners_text:
        return None, {}
    channel = Channel(socket.socket(fileno=int(fd_text)))
    os.set_inheritable(int(fd_text), False)
    passed: dict[str, SlotSockets] = {}
    by_fd: dict[int, socket.socket] = {}  # one object per descriptor: systemd's sockets are shared by every slot
    for name, slots in json.loads(listeners_text).items():
        passed[name] = []
        for fds in slots:
            group = []
            for fd in fds:
                if fd not in by_fd:
                    os.set_inheritable(fd, False)
                    by_fd[fd] = socket.socket(fileno=fd)
                    by_fd[fd].setblocking(False)
                group.append(by_fd[fd])
            passed[name].append(group)
    return channel, passed


class Supervisor:
    """Implements ``control.admin_http.AdminApp`` from the workers' reports."""

    def __init__(self, config: Config, path: str, *, log_level: str | None = None) -> None:
        from ..control.systemd import Notifier, listen_fds

        self.config = config
        self.path = path
        self.log_level = log_level
        self.count = config.workers
        self.fingerprint = fingerprint(config)
        self.notifier = Notifier.from_environ()
        self.handover, self.passed = take_upgrade_fds()
        self.activated = listen_fds()  # systemd socket activation: shared by every worker
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.channels: dict[int, Channel] = {}
        self.processes: dict[int, trio.Process] = {}
        self.sockets: dict[str, SlotSockets] = {}
        self.registry = Registry()
        self.metrics = Metrics(started_unix=time.time())
        self.session_control = None  # GET /sessions and kick: 501 (not aggregated across workers yet)
        self.checkers: dict[PoolName, HealthChecker] = {}
        self.generation = 1
        self.reload_record = ReloadRecord(log)  # counts and last errors, logged as one process logs them
        self.stopping = False
        self.retired = False  # an upgrade handed over to a new generation
        self.ready_sent = False
        self.draining: set[tuple[str, str]] = set()  # (pool, backend) drained by the operator
        self._round: ReloadRound | None = None
        self._round_changed = trio.Event()
        self._rounds = 0
        self._reload_lock = trio.Lock()
        self._health_changes: list[list[Any]] = []
        self._health_dirty = trio.Event()
        self._all_ready = trio.Event()
        self._admin_released = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._admin: Any = None

    # -- listening sockets -----------------------------------------------------------

    def _open_all(self, config: Config, names: set[str] | None = None) -> dict[str, SlotSockets]:
        """N SO_REUSEPORT sockets per address of each listener (``names``: only those); OSError if one cannot bind."""
        opened: dict[str, SlotSockets] = {}
        try:
            for spec in config.listeners:
                if names is not None and spec.name not in names:
                    continue
                opened[spec.name] = self._open_listener(spec)
        except BaseException:
            _close_all(opened)
            raise
        return opened

    def _open_listener(self, spec: ListenerConfig) -> SlotSockets:
        shared = self.activated.pop(spec.name, None)
        if shared:  # systemd passed one socket: every worker accepts on it
            log_event(
                log,
                logging.INFO,
                "listener_inherited",
                listener=spec.name,
                sockets=len(shared),
                shared_by_workers=self.count,
            )
            return [shared for _ in range(self.count)]
        passed = self.passed.pop(spec.name, None)
        slots: SlotSockets = []
        if passed and _same_address(passed[0], spec):
            slots = passed[: self.count]
            _close_all({spec.name: passed[self.count :]})  # fewer workers than before (see README, "Workers")
        elif passed:
            _close_all({spec.name: passed})
        port = slots[0][0].getsockname()[1] if slots else None
        try:
            while len(slots) < self.count:
                group = open_listener(spec, reuse_port=True, port=port)
                slots.append(group)
                port = group[0].getsockname()[1]
        except BaseException:
            _close_all({spec.name: slots})
            raise
        return slots

    def _slot_sockets(self, index: int, sockets: dict[str, SlotSockets]) -> tuple[dict[str, int], list[socket.socket]]:
        counts: dict[str, int] = {}
        flat: list[socket.socket] = []
        for name, slots in sockets.items():
            counts[name] = len(slots[index])
            flat.extend(slots[index])
        return counts, flat

    # -- running ---------------------------------------------------------------------

    async def run(self) -> None:
        from ..control.admin import AdminServer

        config = self.config
        try:
            self.sockets = self._open_all(config)
        except OSError as exc:
            raise ListenError(f"listener: cannot listen: {exc.strerror or exc}") from None
        _close_all(self.passed)  # listeners the new config no longer has
        self.passed.clear()
        for name, slots in self.sockets.items():
            for sock in slots[0]:
                host, port = sock.getsockname()[:2]
                log_event(
                    log,
                    logging.INFO,
                    "listening",
                    listener=name,
                    address=hostport(host, port),
                    workers=self.count,
                )
        if migrate_req() is False and self.count > 1:
            log_event(
                log,
                logging.INFO,
                "tcp_migrate_req",
                value=0,
                hint="sysctl net.ipv4.tcp_migrate_req=1 keeps connections "
                     "queued on a listener that closes (fewer workers after an upgrade)",
            )
        admin = self._admin = AdminServer(self)  # type: ignore[arg-type]  # session_control is None: 501
        admin.reload_timeout_s = config.timeouts.reload_s
        admin.reloader = self.reload_on_request
        admin.upgrader = self.upgrade_on_request
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._signals, signals)
                    if self.handover is not None:
                        try:
                            await self.handover.send({"t": "upgrade_started", "pid": os.getpid()})
                        except ChannelClosed:
                            pass  # _watch_handover sees it too, and gives up
                        nursery.start_soon(self._watch_handover, self.handover)
                    if self.handover is None:
                        try:
                            address = await nursery.start(admin.serve, config.admin)
                        except OSError as exc:
                            raise ListenError(f"admin.bind: cannot listen: {exc.strerror or exc}") from None
                        if address is not None:
                            log_event(log, logging.INFO, "admin_listening", address=address)
                    for pool in config.pools.values():
                        await self._start_checker(pool)
                    nursery.start_soon(self._push_health)
                    nursery.start_soon(self.notifier.watchdog)
                    for slot in self.slots:
                        nursery.start_soon(self._run_slot, slot)
                    nursery.start_soon(self._when_all_ready, admin)
                    await self._until_workers_gone()
                    nursery.cancel_scope.cancel()
        finally:
            _close_all(self.sockets)
        log_event(log, logging.INFO, "stopped", role='supervisor')

    async def _until_workers_gone(self) -> None:
        while not ((self.stopping or self.retired) and not self.processes):
            await self._wait_change()

    async def _wait_change(self) -> None:
        await self._round_changed.wait()

    def _changed(self) -> None:
        self._round_changed.set()
        self._round_changed = trio.Event()

    async def _when_all_ready(self, admin: Any) -> None:
        await self._all_ready.wait()
        if self.handover is not None:  # an upgrade: tell the old generation, then take the admin listener
            await self._take_over(admin)
        self.ready_sent = True
        self.notifier.ready(self.status_line())
        log_event(
            log,
            logging.INFO,
            "ready",
            workers=self.count,
            pids=",".join(str(s.pid) for s in self.slots),
        )
        while not self.stopping and not self.retired:
            await trio.sleep(5)
            self.notifier.status(self.status_line())

    async def _watch_handover(self, channel: Channel) -> None:
        """An upgrade's new supervisor: hear from the old one; if it goes away before the handover, give up."""
        while True:
            try:
                message, _ = await channel.receive()
            except ChannelClosed:
                if self.handover is not None:
                    log_event(
                        log,
                        logging.ERROR,
                        "upgrade_abandoned",
                        reason="the old supervisor closed the handover channel",
                    )
                    self.handover = None
                    self.shutdown()
                return
            if message.get("t") == "admin_released":  # the old supervisor's last word: it closes now
                self._admin_released.set()
                return

    async def _take_over(self, admin: Any) -> None:
        assert self.handover is not None and self._nursery is not None
        channel = self.handover
        try:
            await channel.send({"t": "upgrade_ready", "pid": os.getpid()})
        except ChannelClosed:
            return  # _watch_handover gives up
        with trio.move_on_after(10):
            await self._admin_released.wait()
        if self.handover is None or self.stopping:
            return
        try:
            address = await self._nursery.start(admin.serve, self.config.admin)
        except OSError as exc:
            log_event(log, logging.ERROR, "admin_failed", reason=f"cannot listen: {exc.strerror or exc}")
            address = None
        if address is not None:
            log_event(log, logging.INFO, "admin_listening", address=address)
        # Our parent was a shell that exited at once: systemd (or init) is our parent now, so the
        # manager can wait for us as its own main process (a non-child MAINPID would not be waited for).
        self.notifier.send(f"MAINPID={os.getpid()}")
        log_event(log, logging.INFO, "upgraded", pid=os.getpid())
        self.handover = None
        channel.close()

    # -- one worker slot ----------------------------------------------------------------

    async def _run_slot(self, slot: WorkerSlot) -> None:
        while not self.stopping and not self.retired:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            command = [*program(), "worker", "-c", self.path, "--ipc-fd", str(child.fileno())]
            if self.log_level:
                command += ["--log-level", self.log_level]
            try:
                process = await trio.lowlevel.open_process(command, pass_fds=(child.fileno(),))
            except OSError as exc:
                log_event(log, logging.ERROR, "worker_spawn_failed", slot=slot.index, reason=str(exc))
                parent.close()
                child.close()
                await trio.sleep(slot.backoff.exited(0.0))
                continue
            child.close()
            channel = Channel(parent)
            slot.pid, slot.state = process.pid, WorkerState.STARTING
            slot.started_at, slot.started_unix = trio.current_time(), time.time()
            self.processes[slot.index] = process
            log_event(log, logging.INFO, "worker_started", slot=slot.index, pid=process.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._talk, slot, channel)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            channel.close()
            self.channels.pop(slot.index, None)  # in it from the start message on (broadcasts reach started workers only)
            del self.processes[slot.index]
            was_ready = slot.state in (WorkerState.READY, WorkerState.RETIRING)
            slot.state, slot.report, slot.metrics = WorkerState.DOWN, None, ""
            if self._round is not None and not self._round.done:
                self._round.gone(slot.index)
            self._changed()
            if self.stopping or self.retired:
                log_event(
                    log,
                    logging.INFO,
                    "worker_exited",
                    slot=slot.index,
                    pid=process.pid,
                    status=_exit(code),
                )
                return
            delay = slot.backoff.exited(trio.current_time() - slot.started_at)
            slot.restarts += 1
            log_event(
                log,
                logging.WARNING,
                "worker_exited",
                slot=slot.index,
                pid=process.pid,
                status=_exit(code),
                restart_in_s=delay,
                restarts=slot.restarts,
            )
            if was_ready:
                await self._adopt(slot)
            for other in self.slots:  # what this worker adopted needs another adopter
                if other.adopted_by == slot.index:
                    other.adopted_by = None
                    if other.state is not WorkerState.READY:
                        await self._adopt(other)
            await trio.sleep(delay)

    async def _talk(self, slot: WorkerSlot, channel: Channel) -> None:
        try:
            hello, _ = await channel.receive()
            if hello.get("errors") or hello.get("fingerprint") != self.fingerprint:
                reason = "; ".join(hello.get("errors") or []) or (
                    "the config file changed since the config in effect was loaded; reload to apply it"
                )
                log_event(
                    log,
                    logging.ERROR,
                    "worker_start_failed",
                    slot=slot.index,
                    pid=hello.get("pid"),
                    reason=reason,
                )
                await channel.send({"t": "stop"})
                if slot.adopted_by is None:
                    await self._adopt(slot)
                return
            counts, sockets = self._slot_sockets(slot.index, self.sockets)
            await channel.send(
                {
                    "t": "start", "slot": slot.index, "workers": self.count, "listeners": counts,
                    "generation": self.generation, "health": health.table(self.registry, self.config, trio.current_time()),
                },
                sockets,
            )
            self.channels[slot.index] = channel
            for pool, address in sorted(self.draining):
                await channel.send({"t": "drain", "pool": pool, "backend": address})
            while True:
                message, extra = await channel.receive()
                for sock in extra:
                    sock.close()
                kind = message["t"]
                if kind == "ready":
                    slot.state = WorkerState.READY
                    await self._release(slot)
                    if all(s.state is WorkerState.READY for s in self.slots):
                        self._all_ready.set()
                    self._changed()
                elif kind == "report":
                    slot.report = message.get("status")
                    slot.metrics = str(message.get("metrics", ""))
                elif kind == "prepared" and self._round is not None and self._round.number == message.get("round"):
                    self._round.prepared(slot.index, list(message.get("errors", [])), message.get("fingerprint"))
                    self._changed()
                elif kind == "committed" and self._round is not None and self._round.number == message.get("round"):
                    self._round.committed(slot.index, list(message.get("errors", [])))
                    self._changed()
        except ChannelClosed:
            return

    async def _adopt(self, orphan: WorkerSlot) -> None:
        """A worker is down: another one accepts on its sockets until it is back (``_release``)."""
        if self.stopping or self.retired or self.activated_shared:
            return
        index = adopter(self.slots, orphan.index)
        if index is None:
            return
        counts, sockets = self._slot_sockets(orphan.index, self.sockets)
        orphan.adopted_by = index
        try:
            await self.channels[index].send({"t": "adopt", "slot": orphan.index, "listeners": counts}, sockets)
        except (ChannelClosed, KeyError):
            orphan.adopted_by = None

    @property
    def activated_shared(self) -> bool:
        """Every worker accepts on the same sockets (systemd socket activation): nothing to adopt."""
        return all(slots and all(group is slots[0] for group in slots) for slots in self.sockets.values())

    async def _release(self, slot: WorkerSlot) -> None:
        if slot.adopted_by is None:
            return
        channel = self.channels.get(slot.adopted_by)
        slot.adopted_by = None
        if channel is not None:
            try:
                await channel.send({"t": "release", "slot": slot.index})
            except ChannelClosed:
                pass

    async def _broadcast(self, message: Message, *, only: set[int] | None = None) -> None:
        for index, channel in list(self.channels.items()):
            if only is not None and index not in only:
                continue
            try:
                await channel.send(message)
            except ChannelClosed:
                pass

    # -- signals ---------------------------------------------------------------------------

    async def _signals(self, signals: Any) -> None:
        assert self._nursery is not None
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not self.stopping and not self.retired:
                    log_event(log, logging.INFO, "signal", signal='SIGHUP', action='reload', path=self.path)
                    self._nursery.start_soon(self.reload)
            elif signum == signal.SIGUSR2:
                if not self.stopping and not self.retired:
                    log_event(log, logging.INFO, "signal", signal='SIGUSR2', action='upgrade', path=self.path)
                    self._nursery.start_soon(self.upgrade)
            elif self.stopping:
                log_event(log, logging.WARNING, "signal", signal=name, action='exit_now')
                await self._broadcast({"t": "shutdown", "now": True})
            else:
                log_event(
                    log,
                    logging.INFO,
                    "signal",
                    signal=name,
                    action='shutdown',
                    workers=len(self.processes),
                )
                self.shutdown()

    def shutdown(self) -> None:
        self.stopping = True
        if not self.retired:
            self.notifier.stopping()
        assert self._nursery is not None
        self._nursery.start_soon(self._broadcast, {"t": "shutdown"})
        self._changed()

    # -- health ------------------------------------------------------------------------------

    async def _start_checker(self, pool: PoolConfig) -> None:
        assert self._nursery is not None
        checker = HealthChecker(pool, self.registry, on_change=self._health_changed)
        self.checkers[pool.name] = checker
        await self._nursery.start(checker.run)

    def _health_changed(self, pool: PoolConfig, address: Address, verdict: Health) -> None:
        self._health_changes.append([pool.name, address.host, address.port, verdict.value])
        self._health_dirty.set()

    async def _push_health(self) -> None:
        while True:
            with trio.move_on_after(HEALTH_PUSH_INTERVAL_S):
                await self._health_dirty.wait()
            self._health_dirty = trio.Event()
            changes, self._health_changes = self._health_changes, []
            await self._broadcast(
                {"t": "health", "backends": health.table(self.registry, self.config, trio.current_time()), "changes": changes}
            )

    def _update_checkers(self, new: Config) -> None:
        assert self._nursery is not None
        running = {name: checker.can_update for name, checker in self.checkers.items()}
        for name, action in plan_checkers(running, new.pools).items():
            if action is CheckerAction.STOP:
                self.checkers.pop(name).stop()
            elif action is CheckerAction.UPDATE:
                self.checkers[name].update(new.pools[name])
            else:
                self._nursery.start_soon(self._start_checker, new.pools[name])

    # -- reload ------------------------------------------------------------------------------

    async def reload_on_request(self) -> list[str] | None:
        if self.stopping or self.retired:
            return None
        log_event(log, logging.INFO, "reload_requested", by='admin', path=self.path)
        return await self.reload()

    async def reload(self) -> list[str]:
        """Load once, then apply in every worker or in none (``table.ReloadRound``); the errors, [] when applied."""
        async with self._reload_lock:
            self.notifier.reloading()
            errors = await self._reload()
            if errors:
                self.reload_record.record_failed(errors, self.generation)
            else:
                self.reload_record.record_applied(time.time())
            if self.ready_sent:
                self.notifier.ready(self.status_line())
            return errors

    async def _reload(self) -> list[str]:
        from ..edge.contexts import load_checked
        from ..errors import ConfigErrors

        old = self.config
        new: Config | None = None
        try:
            with trio.move_on_after(old.timeouts.reload_s):
                new = await trio.to_thread.run_sync(load_checked, self.path, abandon_on_cancel=True)
        except ConfigErrors as exc:
            return [str(e) for e in exc.errors]
        except Exception as exc:
            log_event(log, logging.ERROR, "reload_error", exc_info=True, path=self.path)
            return [f"{self.path}: loading failed: {type(exc).__name__}"]
        if new is None:
            return [f"{self.path}: loading did not finish within {old.timeouts.reload_s:g}s (timeouts.reload); abandoned"]
        if new.workers != self.count:
            log_event(
                log,
                logging.WARNING,
                "workers_unchanged",
                running=self.count,
                configured=new.workers,
                reason="the number of workers changes at the next start or upgrade",
            )
        old_binds = {spec.bind: str(spec.name) for spec in old.listeners}
        fresh = {str(spec.name) for spec in new.listeners if spec.bind not in old_binds}
        try:
            opened = self._open_all(new, fresh)
        except OSError as exc:
            return [f"cannot open listener: {exc.strerror or exc}"]
        admin = self._admin
        try:
            change = admin.prepare(new.admin)
        except OSError as exc:
            _close_all(opened)
            return [f"admin.bind: cannot listen: {exc.strerror or exc}"]
        self._rounds += 1
        # every started worker (a starting one reads the messages once it serves)
        ready = {s.index: s.pid for s in self.slots if s.index in self.channels and s.state is not WorkerState.DOWN}
        round_ = self._round = ReloadRound.begin(self._rounds, fingerprint(new), ready)
        for index in ready:
            counts, sockets = self._slot_sockets(index, opened)
            try:
                await self.channels[index].send(
                    {"t": "prepare", "round": round_.number, "listeners": counts}, sockets
                )
            except (ChannelClosed, KeyError):
                round_.gone(index)
        with trio.move_on_after(old.timeouts.reload_s):
            while round_.state is RoundState.PREPARING:
                await self._wait_change()
        if round_.state is RoundState.PREPARING:
            for index in list(round_.waiting):
                round_.prepared(index, [f"did not prepare within {old.timeouts.reload_s:g}s (timeouts.reload)"], None)
        if round_.state is RoundState.ABANDONED:
            await self._broadcast({"t": "abandon", "round": round_.number}, only=set(ready))
            admin.abandon(change)
            _close_all(opened)
            return round_.errors
        targets = round_.committing_to(set(self.channels))
        await self._broadcast({"t": "commit", "round": round_.number}, only=targets)
        with trio.move_on_after(old.timeouts.reload_s):
            while round_.state is RoundState.COMMITTING:
                await self._wait_change()
        for index in round_.restart | set(round_.waiting):
            log_event(log, logging.ERROR, "worker_restart", slot=index, reason="failed to apply the reload")
            await self._broadcast({"t": "shutdown", "now": True}, only={index})
        for index in set(self.channels) - set(ready):  # started during the round, on the old config
            log_event(
                log,
                logging.WARNING,
                "worker_restart",
                slot=index,
                reason="started during the reload, on the old config",
            )
            await self._broadcast({"t": "shutdown", "now": True}, only={index})
        # Applied: the supervisor's view follows.
        self.config, self.fingerprint, self.generation = new, round_.fingerprint, self.generation + 1
        removed = [name for name in self.sockets if name not in {spec.name for spec in new.listeners}]
        moved = {old_binds[spec.bind]: str(spec.name) for spec in new.listeners if spec.bind in old_binds}
        kept: dict[str, SlotSockets] = {}
        for old_name, slots in self.sockets.items():
            if old_name in moved:
                kept[moved[old_name]] = slots
            elif old_name in removed or old_name not in moved:
                _close_all({old_name: slots})
        kept.update(opened)
        self.sockets = kept
        admin.commit(change)
        admin.reload_timeout_s = new.timeouts.reload_s
        self._update_checkers(new)
        log_event(log, logging.INFO, "reloaded", generation=self.generation, workers=len(targets))
        return []

    # -- upgrade -----------------------------------------------------------------------------

    async def upgrade_on_request(self) -> tuple[bool, str]:
        if self.stopping or self.retired:
            return False, "shutting down or already upgraded"
        log_event(log, logging.INFO, "upgrade_requested", by='admin', path=self.path)
        return await self.upgrade()

    async def upgrade(self) -> tuple[bool, str]:
        """Start the next generation on our sockets; (True, its pid) once it serves, else (False, why)."""
        async with self._reload_lock:
            if self.stopping or self.retired:
                return False, "shutting down or already upgraded"
            ok, detail = await self._upgrade()
            if not ok:
                log_event(log, logging.ERROR, "upgrade_failed", reason=detail, action='kept_serving')
            return ok, detail

    async def _upgrade(self) -> tuple[bool, str]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        passed = {name: [[s.fileno() for s in group] for group in slots] for name, slots in self.sockets.items()}
        fds = sorted({fd for slots in passed.values() for group in slots for fd in group} | {child.fileno()})
        env = dict(os.environ)
        env[UPGRADE_FD_VARIABLE] = str(child.fileno())
        env[UPGRADE_LISTENERS_VARIABLE] = json.dumps(passed)
        env.pop("WATCHDOG_PID", None)  # names this process; the new supervisor pings once it is the main pid
        command = [*program(), "run", "-c", self.path]
        if self.log_level:
            command += ["--log-level", self.log_level]
        # Through a shell that exits at once (a double fork): the new supervisor is then the service
        # manager's child, which systemd needs to wait for it as the main process after MAINPID=.
        command = ["/bin/sh", "-c", '"$@" &', "wsproxy-upgrade", *command]
        try:
            process = await trio.lowlevel.open_process(command, pass_fds=fds, env=env)
        except OSError as exc:
            parent.close()
            child.close()
            return False, f"cannot start {command[0]}: {exc.strerror or exc}"
        child.close()
        await process.wait()
        channel = Channel(parent)
        answer: Message | None = None
        new_pid: int | None = None
        with trio.move_on_after(UPGRADE_START_TIMEOUT_S) as scope:
            while True:
                try:
                    answer, _ = await channel.receive()
                except ChannelClosed:
                    answer = None
                    break
                if answer.get("t") != "upgrade_started":
                    break
                new_pid = int(answer["pid"])
                log_event(log, logging.INFO, "upgrade_started", new_pid=new_pid)
        if answer is None or answer.get("t") != "upgrade_ready":
            channel.close()  # a new supervisor still starting gives up when it sees this
            why = "did not have its workers serving in time" if scope.cancelled_caught else "exited before serving"
            if new_pid is not None and scope.cancelled_caught:
                try:
                    os.kill(new_pid, signal.SIGTERM)
                except OSError:
                    pass
            return False, f"the new generation (pid {new_pid or '-'}) {why}; see its log"
        new_pid = int(answer.get("pid", new_pid or 0))
        # Hand over: the admin listener first (the new supervisor binds it), then our workers retire.
        self.retired = True
        listening = self._admin._listening
        self._admin.commit(self._admin.prepare(None))
        if listening is not None:
            listening.close()  # now, not at the next checkpoint: the new supervisor binds the same address
        try:
            await channel.send({"t": "admin_released"})
        except ChannelClosed:
            pass
        channel.close()
        for checker in self.checkers.values():
            checker.stop()
        timeout_s = self.config.upgrade.timeout_s
        sessions = sum(int((s.report or {}).get("sessions", 0) or 0) for s in self.slots)
        log_event(
            log,
            logging.INFO,
            "upgrade_handover",
            new_pid=new_pid,
            old_workers=len(self.processes),
            sessions=sessions,
            timeout_s=timeout_s,
        )
        await self._broadcast({"t": "retire", "timeout_s": timeout_s})
        for slot in self.slots:
            slot.state = WorkerState.RETIRING if slot.index in self.processes else slot.state
        self._changed()
        return True, str(new_pid)

    # -- the admin API's view ----------------------------------------------------------------

    def status_line(self) -> str:
        sessions = sum(int((s.report or {}).get("sessions", 0) or 0) for s in self.slots)
        ready = sum(1 for s in self.slots if s.state is WorkerState.READY)
        return f"{sessions} session{'' if sessions == 1 else 's'}, {ready}/{self.count} workers, config generation {self.generation}"

    def workers_view(self) -> list[dict[str, Any]]:
        view = []
        for slot in self.slots:
            report = slot.report or {}
            own = report.get("worker") or {}
            view.append(
                {
                    "slot": slot.index, "pid": slot.pid, "state": slot.state.value,
                    "sessions": report.get("sessions"), "connections": report.get("connections"),
                    "restarts": slot.restarts, "started_unix": slot.started_unix,
                    "rss_bytes": own.get("rss_bytes"), "loop_lag_s": own.get("loop_lag_s"),
                    "generation": report.get("generation"), "adopted_by": slot.adopted_by,
                }
            )
        return view

    def status(self) -> dict[str, object]:
        config = self.config
        now = trio.current_time()
        pools: dict[str, object] = {}
        for name, pool in config.pools.items():
            backends = []
            for backend in pool.backends:
                verdict = self.registry.health(name, backend.address)
                backends.append(
                    {
                        "address": str(backend.address), "weight": backend.weight, "health": verdict.health.value,
                        "last_check": verdict.last_check, "rtt_s": verdict.rtt_s,
                        "draining": (name, str(backend.address)) in self.draining,
                        "ejected": False, "available": self.registry.available(name, backend, now),
                    }
                )
            pools[name] = {"balance": pool.balance, "backends": backends}
        base: dict[str, Any] = {
            "pid": os.getpid(),  # the supervisor's (an upgrade changes it)
            "generation": self.generation,
            "last_reload_unix": self.reload_record.last_unix,
            "last_reload_error": self.reload_record.last_error,
            "started_unix": self.metrics.started_unix,
            "reloads": self.reload_record.applied + self.reload_record.failed,
            "reload_failures": self.reload_record.failed,
            "listeners": [
                {
                    "name": spec.name,
                    "addresses": [hostport(*s.getsockname()[:2]) for s in self.sockets.get(spec.name, [[]])[0]],
                    "tls": spec.tls is not None,
                }
                for spec in config.listeners
            ],
            "routes": [
                {"host": r.host, "path": r.path, "pool": r.pool, "auth": r.auth.mode if r.auth else None}
                for r in config.routes
            ],
            "pools": pools,
        }
        reports = [s.report for s in self.slots if s.report is not None]
        return merge_status(base, reports, self.workers_view())

    def _own_series(self) -> list[tuple[str, str, str, float]]:
        return [
            ("wsproxy_reloads", "counter", "Reloads attempted (failed ones included).", float(self.reload_record.applied + self.reload_record.failed)),
            ("wsproxy_reload_failures", "counter", "Reloads refused.", float(self.reload_record.failed)),
            ("wsproxy_workers", "gauge", "Worker processes serving.",
             float(sum(1 for s in self.slots if s.state is WorkerState.READY))),
            ("wsproxy_worker_restarts", "counter", "Worker processes restarted after they exited.",
             float(sum(s.restarts for s in self.slots))),
        ]

    def render_metrics(self, accept: str | None = None) -> tuple[str, bytes]:
        """The workers' last metrics merged (always the text format)."""
        text = merge_metrics(((s.index, s.metrics) for s in self.slots if s.metrics), self._own_series())
        return TEXT_CONTENT_TYPE, text.encode()

    async def render_metrics_off_loop(self, accept: str | None = None) -> tuple[str, bytes]:
        """``GET /metrics``: the reports are taken on the loop, parsed and merged in a thread."""
        reports = [(s.index, s.metrics) for s in self.slots if s.metrics]
        text = await trio.to_thread.run_sync(merge_metrics, reports, self._own_series())
        return TEXT_CONTENT_TYPE, text.encode()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        reasons: list[str] = []
        if self.stopping or self.retired:
            reasons.append("shutting down")
        down = [s.index for s in self.slots if s.state is not WorkerState.READY]
        if down:
            reasons.append(f"worker(s) {','.join(map(str, down))} not serving")
        counts = available_by_pool(self.config, self.registry, trio.current_time(), reasons)
        return not reasons, {"ready": not reasons, "reasons": reasons, "pools": counts}

    def drain_backend(self, pool: str, address: str) -> bool | None:
        return self._drain(pool, address, undo=False)

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        return self._drain(pool, address, undo=True)

    def _drain(self, pool: str, address: str, *, undo: bool) -> bool | None:
        config = self.config.pools.get(PoolName(pool))
        if config is None or not any(str(b.address) == address for b in config.backends):
            return None
        key = (pool, address)
        if (key in self.draining) != undo:
            return False
        if undo:
            self.draining.discard(key)
        else:
            self.draining.add(key)
        assert self._nursery is not None
        self._nursery.start_soon(self._broadcast, {"t": "drain", "pool": pool, "backend": address, "undo": undo})
        return True


def _same_address(group: list[socket.socket], spec: ListenerConfig) -> bool:
    try:
        host, port = group[0].getsockname()[:2]
    except (OSError, IndexError):
        return False
    return (spec.bind.port in (0, port)) and (host == spec.bind.host or spec.bind.host in ("localhost",))


def _close_all(sockets: dict[str, SlotSockets]) -> None:
    for slots in sockets.values():
        for group in slots:
            for sock in group:
                sock.close()


def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else str(code)


def run(config: Config, path: str, log_level: str | None) -> int:
    """``wsproxy run`` with ``workers`` > 1 (or an upgrade's new generation): serve until stopped; the exit status."""
    supervisor = Supervisor(config, path, log_level=log_level)
    failed: list[BaseException] = []
    try:
        trio.run(supervisor.run)
    except* ListenError as group:
        failed.extend(group.exceptions)
    for failure in failed:
        print(f"wsproxy: {failure}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["Supervisor", "run", "take_upgrade_fds"]
