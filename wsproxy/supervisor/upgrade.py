"""The upgrade hand-over of ``workers: N`` (trio shell, a part of ``supervisor.main``).

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

The upgrade channel stays open after the hand-over, for as long as the old
generation retires (``upgrade.timeout``, up to an hour or more): the old
supervisor sends ``retiring`` once a second (its pid, the sessions its
workers still hold, its workers, the deadline: ``/status``'s ``retiring``;
and its workers' metrics, merged: ``/metrics``'s series labelled
``generation="retiring"``, ``merge.merge_families``) and answers the new
one's ``ask`` (the sessions API: ``answer``, from its own workers,
``SessionsAcross.answer_newer``), so the admin API, now the new
supervisor's, still lists, kicks and closes the old generation's sessions
(``fanout.RETIRING``). When the old supervisor exits, the channel closes and
the new one stops asking it. Messages: ``supervisor.messages``.

``Upgrades`` holds both sides: the old generation's (``upgrade``,
``_serve_newer``) and the new one's (``_watch_handover``, ``_take_over``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from functools import partial
from typing import Any

import trio

from ..log import log_event
from . import fanout
from .ipc import Channel, ChannelClosed
from .merge import OLDER_SLOT, merge_metrics, retiring_summary
from .messages import Message
from .state import SlotSockets, SupervisorState
from .table import WorkerState


log = logging.getLogger("wsproxy.supervisor")

#: How long a new generation may take to have every worker serving before the upgrade is abandoned.
UPGRADE_START_TIMEOUT_S = 60.0
UPGRADE_FD_VARIABLE = "WSPROXY_UPGRADE_FD"
UPGRADE_LISTENERS_VARIABLE = "WSPROXY_UPGRADE_LISTENERS"
#: How often a retiring supervisor tells its successor how many sessions it still holds.
RETIRING_SUMMARY_INTERVAL_S = 1.0


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


class Upgrades(SupervisorState):
    """``Supervisor``'s part that hands over to a new generation, or takes over from an old one."""

    async def _watch_handover(self, channel: Channel) -> None:
        """An upgrade's new supervisor: hear from the old one; if it goes away before the handover, give up.

        After the handover (``admin_released``), the old generation retires:
        its summaries and its answers to the sessions API come here until it
        exits and the channel closes.
        """
        while True:
            try:
                message, extra = await channel.receive()
            except ChannelClosed:
                if self.handover is not None and not self._admin_released.is_set():
                    log_event(
                        log,
                        logging.ERROR,
                        "upgrade_abandoned",
                        reason="the old supervisor closed the handover channel",
                    )
                    self.handover = None
                    self.shutdown()
                else:
                    self._older_gone(channel)
                return
            for sock in extra:
                sock.close()
            kind = message.get("t")
            if kind == "admin_released":  # the old supervisor retires from now on: ask it too (state.older)
                self.older = channel
                self._admin_released.set()
            elif kind == "retiring":
                self.older_summary = {k: v for k, v in message.items() if k not in ("t", "metrics")}
                metrics = message.get("metrics")
                self.older_metrics = metrics if isinstance(metrics, str) else None
            elif kind == "answer":
                self.session_control.answered(fanout.RETIRING, int(message["id"]), dict(message.get("data") or {}))

    def _older_gone(self, channel: Channel) -> None:
        """The retiring generation has exited (its supervisor's end of the channel closed): stop asking it."""
        channel.close()
        pid = (self.older_summary or {}).get("pid")
        self.older, self.older_summary = None, None
        self.older_metrics = self.older_metrics if self.retired else None  # see state.SupervisorState
        self.session_control.gone(fanout.RETIRING)
        log_event(log, logging.INFO, "older_generation_exited", pid=pid)
        self._changed()

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
        self.handover = None  # the channel stays: the old generation retires (_watch_handover)

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
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_newer, channel, time.time() + timeout_s)
        self._changed()
        return True, str(new_pid)

    # -- retiring: the new generation's view of this one ------------------------------------------

    async def _serve_newer(self, channel: Channel, deadline_unix: float) -> None:
        """Retiring: tell the new supervisor what is left once a second, and answer its sessions API questions.

        Until this process exits (the channel closes with it), or the new
        supervisor does (then this one just goes on retiring).
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tell_newer, channel, deadline_unix)
                while True:
                    try:
                        message, extra = await channel.receive()
                    except ChannelClosed:
                        break
                    for sock in extra:
                        sock.close()
                    if message.get("t") == "ask":
                        nursery.start_soon(self._answer_newer, channel, message)
                nursery.cancel_scope.cancel()
        finally:
            channel.close()

    async def _tell_newer(self, channel: Channel, deadline_unix: float) -> None:
        """The ``retiring`` message once a second: the summary, and the workers' metrics merged (in a thread).

        A worker that has exited still counts in the metrics with its last
        report's counters and histograms (``merge_families``'s ``exited``; it
        sends a last report before it exits, ``worker.Worker._last_report``,
        which ``slots`` keeps), so that the sums the new supervisor exports do
        not go backwards before this generation is gone as a whole. A
        generation that retires behind this one (two upgrades in a row) is
        passed on too, as one more report (``merge.OLDER_SLOT``), and its last
        metrics as an exited worker's once it has exited.

        Once every worker (and the generation behind) is gone, one last
        message at once, with the final counts, then ``told_last``: the
        supervisor waits for it before it exits (``main``), so the closes of
        the last sessions reach the new supervisor's sums.
        """
        try:
            await self._tell_newer_until_done(channel, deadline_unix)
        finally:
            self.told_last.set()

    async def _tell_newer_until_done(self, channel: Channel, deadline_unix: float) -> None:
        while True:
            done = not self.processes and self.older is None
            reports = [s.report for s in self.slots if s.index in self.processes]
            summary = retiring_summary(os.getpid(), reports, len(self.processes), deadline_unix, self.older_summary)
            live: list[tuple[int | str, str]] = [
                (s.index, s.metrics) for s in self.slots if s.index in self.processes and s.metrics
            ]
            exited: list[tuple[int | str, str]] = [
                (s.index, s.metrics) for s in self.slots if s.index not in self.processes and s.metrics
            ]
            if self.older_metrics:  # a generation retiring behind this one, or its last text once it exited
                (live if self.older is not None else exited).append((OLDER_SLOT, self.older_metrics))
            _content_type, metrics = await trio.to_thread.run_sync(partial(merge_metrics, live, exited=exited))
            try:
                await channel.send({"t": "retiring", **summary, "metrics": metrics.decode()})
            except ChannelClosed:
                return
            if done:
                return
            with trio.move_on_after(RETIRING_SUMMARY_INTERVAL_S):
                while self.processes or self.older is not None:
                    await self._wait_change()

    async def _answer_newer(self, channel: Channel, message: Message) -> None:
        try:
            data = await self.session_control.answer_newer(message)
        except Exception:  # a question this version cannot answer: the new supervisor reports us as unanswered
            log_event(log, logging.ERROR, "error", exc_info=True, action="answer_newer", what=message.get("what"))
            return
        try:
            await channel.send({"t": "answer", "id": message.get("id"), "data": data})
        except ChannelClosed:
            pass
