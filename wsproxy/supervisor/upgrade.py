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

``Upgrades`` holds both sides: the old generation's (``upgrade``) and the new
one's (``_watch_handover``, ``_take_over``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import trio

from ..log import log_event
from .ipc import Channel, ChannelClosed
from .messages import Message
from .state import SlotSockets, SupervisorState
from .table import WorkerState


log = logging.getLogger("wsproxy.supervisor")

#: How long a new generation may take to have every worker serving before the upgrade is abandoned.
UPGRADE_START_TIMEOUT_S = 60.0
UPGRADE_FD_VARIABLE = "WSPROXY_UPGRADE_FD"
UPGRADE_LISTENERS_VARIABLE = "WSPROXY_UPGRADE_LISTENERS"


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
