"""A worker process (``wsproxy worker``, started by the supervisor): one ``App`` under the supervisor's orders (trio shell).

::

    worker.main
    ├── App.serve          the proxy, on the listening sockets the supervisor passed (no admin, no health checks)
    ├── _commands          the supervisor's messages: reload rounds, health verdicts, drains, adopt, retire, shutdown
    └── _report            status and metrics to the supervisor, once a second

The worker builds its config itself (a config holds TLS contexts, which do
not travel), but not from the YAML files on disk: the supervisor's first
message (``config``) is the snapshot of the files the config in effect was
composed from (``config.snapshot``), and a reload's ``prepare`` carries the
new one, so a worker started or restarted while an operator edits the file
serves the config in effect, and a reload applies exactly what the supervisor
validated. Files the config references (certificates, token files, JWKS...)
are read from disk. The worker says what it loaded (``hello`` with the
config's fingerprint); the supervisor starts it only if that is the config
the others run. It opens no listening socket and answers no admin request:
the supervisor does both.

Signals: SIGTERM is a graceful shutdown (as for ``wsproxy run``; systemd's
``KillMode=control-group`` sends it to every process); SIGINT is ignored (a
Ctrl-C in a terminal reaches the whole process group; the supervisor decides).
If the supervisor goes away (its end of the channel closes), the worker shuts
down gracefully.

Every line the worker logs carries ``worker=SLOT`` (``--slot``, set before
anything is logged: ``log.set_process_fields``). Its session ids start with
``w{SLOT}x`` and its pid (``fanout.conn_prefix``), and it answers the supervisor's
sessions API questions (``ask``) from its own ``SessionControl``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

import trio

from ..app import App, ListenerSlot
from ..control.reload import ReloadError
from ..config.schema import Config, PoolName
from ..balance.registry import Health
from . import fanout, health
from ..log import log_event, write_in_batches
from .ipc import Channel, ChannelClosed
from .messages import Message
from .table import fingerprint, split_limits

log = logging.getLogger("wsproxy.worker")

#: Seconds between two reports (status and metrics) to the supervisor.
REPORT_INTERVAL_S = 1.0


def group(sockets: list[socket.socket], counts: dict[str, int]) -> dict[str, list[socket.socket]]:
    """The sockets of a message, by listener name, in the order ``counts`` lists them."""
    grouped: dict[str, list[socket.socket]] = {}
    at = 0
    for name, count in counts.items():
        grouped[name] = sockets[at : at + count]
        at += count
    return grouped


def run(path: str, ipc_fd: int, log_level: str | None, slot: int | None = None) -> int:
    """``wsproxy worker``: serve as the supervisor says until it says stop; the exit status."""
    from .. import log as logsetup

    logsetup.set_process_fields(worker=slot)  # every line of this process says which worker wrote it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel_sock = socket.socket(fileno=ipc_fd)
    os.set_inheritable(ipc_fd, False)
    trio.run(_main, path, Channel(channel_sock), log_level)
    return 0


def load_snapshot(path: str, message: Message) -> Config:
    """The config composed from the snapshot a ``config`` or ``prepare`` message carries; ``ConfigErrors`` if none."""
    from ..config.snapshot import ConfigTexts, Snapshot
    from ..edge.contexts import load_checked
    from ..errors import ConfigError, ConfigErrors

    try:
        snapshot = Snapshot.from_data(message.get("config"))
    except ValueError as exc:
        raise ConfigErrors([ConfigError(path, 0, 0, "", f"the supervisor's {message['t']} message: {exc}")]) from None
    return load_checked(path, ConfigTexts(snapshot))


async def _main(path: str, channel: Channel, log_level: str | None) -> None:
    from .. import log as logsetup
    from ..errors import ConfigErrors

    try:
        first, _ = await channel.receive()
    except ChannelClosed:
        return  # the supervisor went away before this worker began
    config: Config | None = None
    errors: list[str] = []
    try:
        config = load_snapshot(path, first)
    except ConfigErrors as exc:
        errors = [str(e) for e in exc.errors]
    if config is not None:
        logsetup.configure(log_level or config.log.level, config.log.format)
    log_overridden = log_level is not None
    from .. import __version__

    hello: Message = {"t": "hello", "pid": os.getpid(), "version": __version__}
    if config is None:
        await channel.send({**hello, "errors": errors})
        return
    await channel.send({**hello, "fingerprint": fingerprint(config)})
    try:
        start, sockets = await channel.receive()
    except ChannelClosed:
        log_event(log, logging.WARNING, "worker_orphaned", pid=os.getpid(), reason="the supervisor closed the channel before start")
        return
    if start["t"] != "start":
        log_event(log, logging.INFO, "worker_not_started", pid=os.getpid(), message=start["t"])
        return  # the supervisor refused this worker (it said why in its log)
    worker = Worker(path, channel, config, start, sockets, log_overridden)
    await worker.serve()


class Worker:
    def __init__(
        self, path: str, channel: Channel, config: Config, start: Message, sockets: list[socket.socket], log_overridden: bool
    ) -> None:
        self.path = path
        self.channel = channel
        self.slot = int(start["slot"])
        self.workers = int(start["workers"])
        self.app = App(split_limits(config, self.workers), inherited=group(sockets, start["listeners"]))
        self.app.health_checks = False
        self.app.log_overridden = log_overridden
        self.app.generation.number = int(start.get("generation", 1))
        self.app.set_conn_prefix(fanout.conn_prefix(self.slot, os.getpid()))  # ids unique across live workers
        self.prepared: dict[int, tuple[Config, dict[str, list[socket.socket]]]] = {}
        self.preparing: set[int] = set()  # rounds whose prepare is loading now
        self.abandoned: set[int] = set()  # of those, the ones the supervisor abandoned meanwhile
        self.adopted: dict[int, list[ListenerSlot]] = {}
        self.retiring = False
        self._health = start.get("health", [])

    async def serve(self) -> None:
        from ..control import gc_tuning

        app = self.app
        health.apply(app.registry, self._health, trio.current_time())
        gc_tuning.tune()  # as wsproxy run does: after start-up, what exists now is frozen
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            serving = trio.Event()

            def ready() -> None:
                serving.set()
                nursery.start_soon(self.channel.send, {"t": "ready", "pid": os.getpid()})

            app.on_ready = ready
            self.serving = serving
            nursery.start_soon(write_in_batches)  # the session lines (log.write_in_batches); to the end
            nursery.start_soon(self._commands)
            nursery.start_soon(self._report)
            nursery.start_soon(self._signals)
            await app.serve()
            if self.retiring:
                await self._last_report()
            nursery.cancel_scope.cancel()
        log_event(log, logging.INFO, "worker_stopped", slot=self.slot, pid=os.getpid())

    async def _last_report(self) -> None:
        """Retired and done: the final counts (the sessions closed since the last report) before this process exits.

        The retiring supervisor keeps them (``slots``), and the new one's
        ``/metrics`` goes on counting them until the whole old generation has
        exited (``merge.merge_families``'s ``exited``).
        """
        await self._send_report()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                if self.app.stopping:
                    self.app.abort()
                else:
                    log_event(
                        log,
                        logging.INFO,
                        "signal",
                        signal='SIGTERM',
                        action='shutdown',
                        slot=self.slot,
                    )
                    self.app.shutdown()

    async def _commands(self) -> None:
        await self.serving.wait()  # a reload before the listeners are open would open them twice
        while True:
            try:
                message, sockets = await self.channel.receive()
            except ChannelClosed:
                if not self.app.stopping:
                    log_event(log, logging.WARNING, "supervisor_gone", slot=self.slot, action='shutdown')
                    self.app.shutdown()
                return
            try:
                await self._handle(message, sockets)
            except ChannelClosed:
                continue  # seen by the next receive
            except Exception:
                log_event(
                    log,
                    logging.ERROR,
                    "worker_error",
                    exc_info=True,
                    slot=self.slot,
                    message=message.get("t"),
                )

    async def _handle(self, message: Message, sockets: list[socket.socket]) -> None:
        kind = message["t"]
        app = self.app
        if kind == "health":
            health.apply(app.registry, message["backends"], trio.current_time())
            for pool_name, address, verdict in health.changes(message.get("changes", [])):
                pool = app.generation.config.pools.get(PoolName(pool_name))
                if pool is not None:
                    app.drainer.health_changed(pool, address, verdict)
        elif kind == "prepare":
            # In a task of its own: loading may take up to timeouts.reload, and meanwhile this
            # loop keeps answering (the sessions API's asks, health, drains).
            self.nursery.start_soon(self._prepare_logged, message, sockets)
        elif kind == "commit":
            await self._commit(int(message["round"]))
        elif kind == "abandon":
            number = int(message["round"])
            if number in self.preparing:
                self.abandoned.add(number)  # its _prepare drops what it loads
            _, opened = self.prepared.pop(number, (None, {}))
            for group_ in opened.values():
                for sock in group_:
                    sock.close()
        elif kind == "drain":
            if message.get("undo"):
                app.undrain_backend(message["pool"], message["backend"])
            else:
                app.drain_backend(message["pool"], message["backend"])
        elif kind == "adopt":
            self._adopt(int(message["slot"]), group(sockets, message["listeners"]))
        elif kind == "release":
            for slot in self.adopted.pop(int(message["slot"]), []):
                slot.close()  # this process's copies; the supervisor keeps the sockets
        elif kind == "ask":
            await self.channel.send({"t": "answer", "id": message["id"], "data": self._answer(message)})
        elif kind == "retire":
            self._retire(float(message["timeout_s"]))
        elif kind == "shutdown":
            if message.get("now"):
                app.abort()
            else:
                app.shutdown()
        else:
            log_event(log, logging.WARNING, "worker_unknown_message", slot=self.slot, type=kind)
            for sock in sockets:
                sock.close()

    def _answer(self, message: Message) -> dict[str, Any]:
        """The sessions API's part of this worker (``supervisor.fanout``): a page, or the closes started."""
        control = self.app.session_control
        what, by = message["what"], str(message.get("by", "-"))
        if what == "sessions":
            return fanout.worker_page(control.records(), fanout.query_from_message(message["query"]))
        order = fanout.order_from_message(message["order"])
        if what == "close_session":
            return {"closed": control.close_session(str(message["conn"]), order, by=by)}
        if what == "close_identity":
            return {"closed": control.close_identity(str(message["identity"]), order, by=by)}
        raise ValueError(f"unknown question {what!r}")

    async def _prepare_logged(self, message: Message, sockets: list[socket.socket]) -> None:
        number = int(message["round"])
        self.preparing.add(number)
        try:
            await self._prepare(message, sockets)
        except ChannelClosed:
            pass  # the supervisor is gone: _commands sees it and shuts down
        except Exception:
            log_event(log, logging.ERROR, "worker_error", exc_info=True, slot=self.slot, message="prepare")
        finally:
            self.preparing.discard(number)
            self.abandoned.discard(number)

    async def _prepare(self, message: Message, sockets: list[socket.socket]) -> None:
        from ..errors import ConfigErrors

        number = int(message["round"])
        opened = group(sockets, message.get("listeners", {}))
        errors: list[str] = []
        config: Config | None = None
        try:
            with trio.move_on_after(self.app.generation.config.timeouts.reload_s):
                config = await trio.to_thread.run_sync(load_snapshot, self.path, message, abandon_on_cancel=True)
            if config is None:
                errors.append(f"{self.path}: loading did not finish within timeouts.reload; abandoned")
        except ConfigErrors as exc:
            errors = [str(e) for e in exc.errors]
        except Exception as exc:  # a loader bug must not take the worker down
            log_event(log, logging.ERROR, "reload_error", exc_info=True, path=self.path)
            errors = [f"{self.path}: loading failed: {type(exc).__name__}"]
        if config is not None and not errors and number not in self.abandoned:
            self.prepared[number] = (config, opened)
        else:
            for group_ in opened.values():
                for sock in group_:
                    sock.close()
        reply: Message = {"t": "prepared", "round": number, "errors": errors}
        if config is not None:
            reply["fingerprint"] = fingerprint(config)
        await self.channel.send(reply)

    async def _commit(self, number: int) -> None:
        config, opened = self.prepared.pop(number, (None, {}))
        errors: list[str] = []
        if config is None:
            errors.append(f"reload round {number} was not prepared here")
        else:
            app = self.app
            app._inherited.update(opened)  # App.reload takes these instead of binding (edge.listener)
            try:
                app.reload(split_limits(config, self.workers))
            except ReloadError as exc:
                errors.append(str(exc))
            for name in list(opened):  # not taken: the listener kept its address after all
                for sock in app._inherited.pop(name, []):
                    sock.close()

        await self.channel.send(
            {"t": "committed", "round": number, "errors": errors, "generation": self.app.generation.number}
        )

    def _adopt(self, orphan: int, sockets: dict[str, list[socket.socket]]) -> None:
        """Accept on the sockets of slot ``orphan`` too, until ``release`` (its worker is down)."""
        slots = []
        for name, group_ in sockets.items():
            own = self.app.listeners.get(name)
            if own is None or self.retiring or self.app.stopping:
                for sock in group_:
                    sock.close()
                continue
            slot = ListenerSlot(own.spec, group_)
            slots.append(slot)
            self.app._start_accepting(slot)
        self.adopted.setdefault(orphan, []).extend(slots)
        log_event(log, logging.INFO, "worker_adopted", slot=self.slot, orphan=orphan, listeners=len(slots))

    def _retire(self, timeout_s: float) -> None:
        """An upgrade: stop accepting now; shut down once the sessions ended, or after ``timeout_s``."""
        if self.retiring:
            return
        self.retiring = True
        app = self.app
        slots = [*app.listeners.values(), *(s for group_ in self.adopted.values() for s in group_)]
        app.listeners = {}  # what /status lists and a shutdown closes: nothing any more
        self.adopted.clear()
        for slot in slots:
            slot.close()  # this process's copies: connections waiting in the queue go to the new workers
        log_event(
            log,
            logging.INFO,
            "worker_retiring",
            slot=self.slot,
            pid=os.getpid(),
            sessions=len(app.sessions),
            timeout_s=timeout_s,
        )
        self.nursery.start_soon(self._retire_later, timeout_s)

    async def _retire_later(self, timeout_s: float) -> None:
        app = self.app
        with trio.move_on_after(timeout_s):
            while app.sessions or app.connection_count:
                await trio.sleep(0.2)
        app.shutdown()  # what is left gets 1001, spread over shutdown.spread

    async def _report(self) -> None:
        while await self._send_report():
            await trio.sleep(REPORT_INTERVAL_S)

    async def _send_report(self) -> bool:
        """Send one report; False once the supervisor's end of the channel is closed."""
        try:
            await self.channel.send(self.report())
        except ChannelClosed:
            return False
        except Exception:  # a report that cannot be built must not take the sessions down
            log_event(log, logging.ERROR, "worker_error", exc_info=True, slot=self.slot, action='report')
        return True

    def report(self) -> Message:
        app = self.app
        _content_type, metrics = app.render_metrics()
        status: dict[str, Any] = app.status()
        status["worker"] = {
            "slot": self.slot,
            "pid": os.getpid(),
            "retiring": self.retiring,
            "rss_bytes": _rss_bytes(),
            "loop_lag_s": app.metrics.loop_lag_last_s,
            "reported_unix": time.time(),
        }
        return {"t": "report", "status": status, "metrics": metrics.decode("utf-8", "replace")}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


__all__ = ["Health", "Worker", "run"]
