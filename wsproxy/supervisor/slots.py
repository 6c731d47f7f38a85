"""The worker slots of ``workers: N`` (trio shell, a part of ``supervisor.main``): start, talk, restart, adopt.

Each slot runs ``wsproxy worker`` with one end of a socketpair (``ipc``),
sends it ``config`` (the snapshot of the YAML files of the config in effect:
the worker composes its config from it, whatever the files on disk say now),
checks its ``hello`` (the config it loaded must be the one in effect: a file
the config references, such as a token file, may have changed since), sends
``start`` with the slot's listening sockets, and then hears its messages
(``ready``, ``report``, the reload round's answers, the sessions API's
``answer``) until it exits. A worker that exits is started again after the
slot's backoff (``table.Backoff``); meanwhile another worker accepts on its
sockets (``adopt``), until it serves again (``release``). Once an upgrade
retired this generation, a worker is not started again, and the last report
of one that exited (its final counts) is kept for ``upgrade._tell_newer``.
"""

from __future__ import annotations

import logging
import signal
import socket
import time

import trio

from .. import __version__
from . import health
from ..log import log_event
from .ipc import Channel, ChannelClosed
from .state import SupervisorState
from .table import WorkerSlot, WorkerState, adopter, hello_refusal
from .upgrade import program


log = logging.getLogger("wsproxy.supervisor")

#: How long a retired generation's worker that exited may take to have its last report read (it is in the channel).
RETIRED_LAST_REPORT_S = 1.0


class WorkerSlots(SupervisorState):
    """``Supervisor``'s part that runs each worker slot and talks to its worker."""

    async def _run_slot(self, slot: WorkerSlot) -> None:
        while not self.stopping and not self.retired:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            command = [*program(), "worker", "-c", self.path, "--ipc-fd", str(child.fileno()), "--slot", str(slot.index)]
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
                if self.retired:  # its last report may still be in the channel: read on to its end, briefly
                    nursery.cancel_scope.deadline = trio.current_time() + RETIRED_LAST_REPORT_S
                else:
                    nursery.cancel_scope.cancel()
            channel.close()
            self.channels.pop(slot.index, None)  # in it from the start message on (broadcasts reach started workers only)
            del self.processes[slot.index]
            was_ready = slot.state in (WorkerState.READY, WorkerState.RETIRING)
            # A retired generation's worker that exited keeps its last metrics: its counters stay in the sums
            # this supervisor sends the new one until the whole generation has exited (upgrade._tell_newer).
            slot.state, slot.report, slot.metrics = WorkerState.DOWN, None, slot.metrics if self.retired else ""
            if self._round is not None and not self._round.done:
                self._round.gone(slot.index)
            self.session_control.gone(slot.index)
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
            await channel.send({"t": "config", "config": self.snapshot.to_data()})
            hello, _ = await channel.receive()
            reason = hello_refusal(hello, __version__, self.fingerprint)
            if reason is not None:
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
                elif kind == "answer":  # the sessions API (admin_view.SessionsAcross)
                    self.session_control.answered(slot.index, int(message["id"]), dict(message.get("data") or {}))
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



def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else str(code)
