"""The reload of ``workers: N`` (trio shell, a part of ``supervisor.main``): load once, apply everywhere or nowhere.

``SIGHUP``, ``POST /reload`` and ``wsproxy reload`` come here. The
supervisor loads the file (to refuse a bad one without asking anyone),
keeping the texts of the YAML files it read (``config.snapshot``), opens the
sockets of new listener addresses, and runs a two-phase round
(``table.ReloadRound``): every worker composes its config from that snapshot
(``prepare``; not from the disk, which may have changed since) and reports,
and only when all did is ``commit`` sent; otherwise ``abandon``, and the old
config keeps serving everywhere. A worker that fails to commit is restarted.
Once applied, the snapshot is the one a starting worker gets (``slots``).
"""

from __future__ import annotations

import logging
import time

import trio

from ..config.schema import Config
from ..config.snapshot import ConfigTexts
from ..log import log_event
from .ipc import ChannelClosed
from .sockets import _close_all
from .state import SlotSockets, SupervisorState
from .table import ReloadRound, RoundState, WorkerState, fingerprint


log = logging.getLogger("wsproxy.supervisor")


class Reloads(SupervisorState):
    """``Supervisor``'s part that runs reload rounds."""

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
        texts = ConfigTexts()  # what this load reads is what the workers will compose
        try:
            with trio.move_on_after(old.timeouts.reload_s):
                new = await trio.to_thread.run_sync(load_checked, self.path, texts, abandon_on_cancel=True)
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
        snapshot = texts.snapshot().to_data()
        for index in ready:
            counts, sockets = self._slot_sockets(index, opened)
            try:
                await self.channels[index].send(
                    {"t": "prepare", "round": round_.number, "listeners": counts, "config": snapshot}, sockets
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
        self.snapshot = texts.snapshot()
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

