"""``wsproxy run``: the App under signals, systemd and the admin listener.

    SIGHUP          reload the config file (loaded in a thread, applied atomically)
    SIGTERM/SIGINT  graceful shutdown; a second one exits at once
"""

from __future__ import annotations

import logging
import signal

import trio

from .app import App
from .config.schema import Config

log = logging.getLogger("wsproxy.app")


async def main(config: Config, path: str, log_overridden: bool = False) -> None:
    """Run the proxy: SIGHUP reloads ``path``; SIGTERM or SIGINT shut down, a second one exits at once.

    Under systemd: listening sockets passed by socket activation are used by
    listener name, and the notify protocol reports READY, RELOADING, STOPPING,
    STATUS and the watchdog.
    """
    from .config.load import load_config
    from .control.admin import serve_admin
    from .control.systemd import Notifier, listen_fds

    notifier = Notifier.from_environ()
    app = App(config, inherited=listen_fds())
    app.log_overridden = log_overridden
    app.on_ready = lambda: notifier.ready(app.status_line())
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

        async def watch_signals() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if app.stopping:
                        continue
                    log.info("event=signal signal=SIGHUP action=reload path=%s", path)
                    nursery.start_soon(reload_config)  # beside this loop: signals are handled while it loads
                    continue
                if app.stopping:
                    log.warning("event=signal signal=%s action=exit_now", name)
                    app.abort()
                    return
                log.info("event=signal signal=%s action=shutdown", name)
                notifier.stopping()
                app.shutdown()

        async def reload_config() -> None:
            notifier.reloading()
            await app.reload_from(path, load_config)  # loads under timeouts.reload, then applies or logs
            notifier.ready(app.status_line())

        async def report_status() -> None:
            while True:
                await trio.sleep(5)
                notifier.status(app.status_line())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            nursery.start_soon(notifier.watchdog)
            nursery.start_soon(report_status)
            if config.admin is not None:
                address = await nursery.start(serve_admin, app, config.admin)
                log.info("event=admin_listening address=%s", address)
            await app.serve()  # returns once accepting has stopped and every session has ended
            nursery.cancel_scope.cancel()
