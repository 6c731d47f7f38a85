"""``wsproxy run``: the App under signals, systemd and the admin listener.

    SIGHUP          reload the config file (loaded in a thread, applied atomically,
                    the admin section included: token swapped, listener moved)
    SIGTERM/SIGINT  graceful shutdown; a second one exits at once
"""

from __future__ import annotations

import logging
import signal

import trio

from typing import TYPE_CHECKING

from .app import App, ListenError
from .control import gc_tuning
from .control.reload import ReloadError
from .config.schema import Config
from .log import log_event, write_in_batches

if TYPE_CHECKING:
    from .control.admin import AdminServer

log = logging.getLogger("wsproxy.app")


async def main(config: Config, path: str, log_overridden: bool = False) -> None:
    """Run the proxy: SIGHUP reloads ``path``; SIGTERM or SIGINT shut down, a second one exits at once.

    Under systemd: listening sockets passed by socket activation are used by
    listener name, and the notify protocol reports READY, RELOADING, STOPPING,
    STATUS and the watchdog.
    """
    from .control.admin import AdminServer
    from .edge.contexts import load_checked
    from .control.systemd import Notifier, listen_fds

    notifier = Notifier.from_environ()
    app = App(config, inherited=listen_fds())
    app.log_overridden = log_overridden
    app.on_ready = lambda: notifier.ready(app.status_line())
    admin = AdminServer(app)
    admin.reload_timeout_s = config.timeouts.reload_s
    gc_tuning.tune()  # after start-up: what exists now is frozen
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

        async def watch_signals() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if app.stopping:
                        continue
                    log_event(log, logging.INFO, "signal", signal='SIGHUP', action='reload', path=path)
                    nursery.start_soon(reload_config)  # beside this loop: signals are handled while it loads
                    continue
                if app.stopping:
                    log_event(log, logging.WARNING, "signal", signal=name, action='exit_now')
                    app.abort()
                    return
                log_event(log, logging.INFO, "signal", signal=name, action='shutdown')
                notifier.stopping()
                app.shutdown()

        async def reload_config() -> None:
            notifier.reloading()
            # Loads under timeouts.reload, then applies to the App and the admin listener, or logs why not.
            await app.reload_from(path, load_checked, apply=lambda new: reload(app, admin, new))
            notifier.ready(app.status_line())

        async def report_status() -> None:
            while True:
                await trio.sleep(5)
                notifier.status(app.status_line())

        async def reload_on_request() -> list[str] | None:  # POST /reload (wsproxy reload)
            log_event(log, logging.INFO, "reload_requested", by='admin', path=path)
            return await app.reload_and_wait(lambda: nursery.start_soon(reload_config))

        admin.reloader = reload_on_request

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_in_batches)  # the session lines (log.write_in_batches); to the end
            nursery.start_soon(watch_signals)
            nursery.start_soon(notifier.watchdog)
            nursery.start_soon(report_status)
            try:
                address = await nursery.start(admin.serve, config.admin)  # serves nothing until a reload adds it when None
            except OSError as exc:  # one line and exit 1, as for a listener (wsproxy.__main__)
                raise ListenError(f"admin.bind: cannot listen on {_admin_where(config)}: {exc.strerror or exc}") from None
            if address is not None:
                log_event(log, logging.INFO, "admin_listening", address=address)
            await app.serve()  # returns once accepting has stopped and every session has ended
            nursery.cancel_scope.cancel()


def _admin_where(config: Config) -> str:
    admin = config.admin
    return f"unix:{admin.unix_path}" if admin and admin.unix_path else str(admin and admin.bind)


def reload(app: App, admin: AdminServer, new: Config) -> None:
    """Apply ``new`` to the App and the admin listener together, or to neither (ReloadError).

    The new admin listener is bound before anything changes; it takes over
    (and the new token applies) right after the App logged ``event=reloaded``.
    """
    try:
        change = admin.prepare(new.admin)
    except OSError as exc:
        raise ReloadError(f"admin.bind: cannot listen on {_admin_where(new)}: {exc.strerror or exc}") from exc
    try:
        app.reload(new)
    except BaseException:
        admin.abandon(change)
        raise
    admin.commit(change)
    admin.reload_timeout_s = new.timeouts.reload_s
