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

``Supervisor`` is one object whose parts live in modules of their own, one
concept each; this module has its task tree, its signals and the health
checks:

- ``state``: every attribute, and how a part says or waits for a change (``SupervisorState``);
- ``sockets``: the listening sockets, N per address (``ListeningSockets``);
- ``slots``: each worker slot: spawn, talk, restart, adopt (``WorkerSlots``);
- ``reloading``: the two-phase reload round (``Reloads``);
- ``upgrade``: the hand-over to a new generation, both sides (``Upgrades``);
- ``admin_view``: what the admin API reads and calls (``AdminView``);
- ``sessions_api``: the sessions API asked of every worker (``SessionsAcross``;
  its decisions are ``fanout``'s).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import trio

from ..app import ListenError
from ..config.schema import Address, Config, PoolConfig, hostport
from ..config.snapshot import Snapshot
from ..control.health import HealthChecker
from ..balance.registry import Health
from ..config.diff import CheckerAction, plan_checkers
from ..edge.listener import migrate_req
from . import health
from ..log import log_event
from .admin_view import AdminView
from .ipc import ChannelClosed
from .reloading import Reloads
from .slots import WorkerSlots
from .sockets import ListeningSockets, _close_all
from .upgrade import UPGRADE_FD_VARIABLE, Upgrades, take_upgrade_fds

log = logging.getLogger("wsproxy.supervisor")

#: How often the health table is pushed to the workers even without a change (round trip times).
HEALTH_PUSH_INTERVAL_S = 1.0
#: How long a retired supervisor, its workers gone, waits to pass its final counts to the new one.
FINAL_WORD_S = 2.0


class Supervisor(ListeningSockets, WorkerSlots, Reloads, Upgrades, AdminView):
    """Implements ``control.admin_routes.AdminApp`` from the workers' reports."""

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
        admin = self._admin = AdminServer(self)
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
                    if self.retired:  # the final counts to the new supervisor (upgrade._tell_newer)
                        with trio.move_on_after(FINAL_WORD_S):
                            await self.told_last.wait()
                    nursery.cancel_scope.cancel()
        finally:
            _close_all(self.sockets)
        log_event(log, logging.INFO, "stopped", role='supervisor')

    async def _until_workers_gone(self) -> None:
        # A retired supervisor also waits for a generation retiring behind it (an upgrade during the
        # window): the new supervisor reaches that one through this one (upgrade.Upgrades._serve_newer).
        while not ((self.stopping or self.retired) and not self.processes and (self.stopping or self.older is None)):
            await self._wait_change()

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


def run(config: Config, path: str, log_level: str | None, snapshot: Snapshot) -> int:
    """``wsproxy run`` with ``workers`` > 1 (or an upgrade's new generation): serve until stopped; the exit status.

    ``snapshot`` holds the YAML files ``config`` was composed from, as that
    load read them: what every worker composes its config from.
    """
    supervisor = Supervisor(config, path, snapshot, log_level=log_level)
    failed: list[BaseException] = []
    try:
        trio.run(supervisor.run)
    except* ListenError as group:
        failed.extend(group.exceptions)
    for failure in failed:
        print(f"wsproxy: {failure}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["UPGRADE_FD_VARIABLE", "Supervisor", "run", "take_upgrade_fds"]
