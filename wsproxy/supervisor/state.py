"""What every part of the supervisor shares (``supervisor.main``): its state, and how a part says or waits for a change.

``Supervisor`` is one object built from parts, one module each (``sockets``,
``slots``, ``reloading``, ``upgrade``, ``admin_view``); each part derives
from ``SupervisorState``, which creates every attribute (``__init__``), and
names the few methods one part calls in another (each defined by its part).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import trio

from ..balance.registry import Registry
from ..config.schema import Config, PoolName
from ..config.snapshot import Snapshot
from ..control.health import HealthChecker
from ..control.metrics import Metrics
from ..control.reload import ReloadRecord
from .ipc import Channel, ChannelClosed
from .messages import Message
from .sessions_api import SessionsAcross
from .table import ReloadRound, WorkerSlot, fingerprint

log = logging.getLogger("wsproxy.supervisor")

#: Sockets of a listener: one list per worker slot, each with one socket per address the bind resolves to.
SlotSockets = list[list[socket.socket]]


class SupervisorState:
    """The supervisor's state, created once; the parts read and change it on the one trio loop."""

    def __init__(self, config: Config, path: str, snapshot: Snapshot, *, log_level: str | None = None) -> None:
        from ..control.systemd import Notifier, listen_fds
        from .upgrade import take_upgrade_fds

        self.config = config
        self.snapshot = snapshot  # the YAML files ``config`` was composed from: what a starting worker composes
        self.path = path
        self.log_level = log_level
        self.count = config.workers
        self.fingerprint = fingerprint(config)
        self.notifier = Notifier.from_environ()
        self.handover, self.passed = take_upgrade_fds()
        #: After an upgrade, the channel to the generation that retires (``upgrade``), until it has exited,
        #: its last summary for ``/status`` (``merge.retiring_summary``) and its last metrics for ``/metrics``
        #: (the text its supervisor merged from its workers' reports: ``merge_families``'s ``retiring``).
        #: The metrics outlive the channel when the older generation exits while this one retires too (two
        #: upgrades in a row): its counters stay in what this one sends its successor (``upgrade._tell_newer``).
        self.older: Channel | None = None
        self.older_summary: dict[str, Any] | None = None
        self.older_metrics: str | None = None
        self.activated = listen_fds()  # systemd socket activation: shared by every worker
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.channels: dict[int, Channel] = {}
        self.processes: dict[int, trio.Process] = {}
        self.sockets: dict[str, SlotSockets] = {}
        self.registry = Registry()
        self.metrics = Metrics(started_unix=time.time())
        self.session_control = SessionsAcross(self)  # GET /sessions and kick: asked of every worker
        self.checkers: dict[PoolName, HealthChecker] = {}
        self.generation = 1
        self.reload_record = ReloadRecord(log)  # counts and last errors, logged as one process logs them
        self.stopping = False
        self.retired = False  # an upgrade handed over to a new generation
        self.told_last = trio.Event()  # retired: the new supervisor has this generation's final counts
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

    async def _wait_change(self) -> None:
        await self._round_changed.wait()

    def _changed(self) -> None:
        self._round_changed.set()
        self._round_changed = trio.Event()

    async def _broadcast(self, message: Message, *, only: set[int] | None = None) -> None:
        for index, channel in list(self.channels.items()):
            if only is not None and index not in only:
                continue
            try:
                await channel.send(message)
            except ChannelClosed:
                pass

    # -- defined by the parts (``Supervisor`` puts them together) ------------------------------

    def _open_all(self, config: Config, names: set[str] | None = None) -> dict[str, SlotSockets]:
        raise NotImplementedError  # sockets.ListeningSockets

    def _slot_sockets(self, index: int, sockets: dict[str, SlotSockets]) -> tuple[dict[str, int], list[socket.socket]]:
        raise NotImplementedError  # sockets.ListeningSockets

    def _update_checkers(self, new: Config) -> None:
        raise NotImplementedError  # main.Supervisor

    def shutdown(self) -> None:
        raise NotImplementedError  # main.Supervisor

    def status_line(self) -> str:
        raise NotImplementedError  # admin_view.AdminView
