"""systemd integration: the notify protocol and socket activation, without libsystemd.

Two small pieces a ``Type=notify`` service needs, spoken directly:

- ``Notifier`` sends ``sd_notify(3)`` messages (``READY=1``, ``RELOADING=1``,
  ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``) as one datagram each to the
  AF_UNIX socket named by ``$NOTIFY_SOCKET``: a path, or an abstract address
  written with a leading ``@``. Without ``$NOTIFY_SOCKET`` (not started by
  systemd, or ``Type=simple``) every call is a no-op.
- ``listen_fds`` takes the listening sockets systemd passed for socket
  activation (``sd_listen_fds_with_names(3)``): ``LISTEN_PID``, ``LISTEN_FDS``,
  ``LISTEN_FDNAMES``, fds from 3 on. ``FileDescriptorName=`` in
  ``wsproxy.socket`` is the listener's ``name`` in the config.

What this is not: it does not decide *when* to notify (``app.py`` does: ready
once the listeners are up, reloading/ready around a reload, stopping on
SIGTERM) and it opens no listener of its own. Only ``Notifier.watchdog`` is a
trio task; everything else is a plain, synchronous call that does at most one
short ``send``.

Wiring, as ``app.py`` does it::

    notifier = Notifier.from_environ()
    passed = listen_fds()                     # once, before anything forks or execs
    ...                                       # open listeners, preferring passed[spec.name]
    notifier.ready("0 sessions, config generation 1")
    nursery.start_soon(notifier.watchdog)
    ...                                       # on SIGHUP:
    notifier.reloading(); ...; notifier.ready("12 sessions, config generation 2")
    ...                                       # on SIGTERM:
    notifier.stopping()

Protocol notes (``sd_notify(3)``, systemd's ``src/libsystemd/sd-daemon``):

- A message is newline-separated ``KEY=VALUE`` assignments in one datagram;
  the kernel attaches our credentials (systemd's socket has ``SO_PASSCRED``),
  which is how ``NotifyAccess=main`` knows the sender.
- ``RELOADING=1`` must carry ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` in µs):
  systemd 253+ (``Type=notify-reload``) uses it to match the ``READY=1`` that
  ends the reload; 252 accepts and ignores it.
- ``WATCHDOG_USEC`` is the ``WatchdogSec=`` timeout; the service pings at half
  of it. ``WATCHDOG_PID``, when set, names the process meant (a shell wrapper
  would see its child's pid there): another process must not ping.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import trio
from ..log import log_event

log = logging.getLogger("wsproxy.control.systemd")

#: The first fd systemd passes (``SD_LISTEN_FDS_START``): 0-2 are stdio.
LISTEN_FDS_START = 3
#: The name of a passed fd when ``LISTEN_FDNAMES`` does not give one (as systemd does).
UNKNOWN_FD_NAME = "unknown"
#: A notify send blocks at most this long (only when systemd's queue is full),
#: so a stuck manager can never stall the event loop for longer.
NOTIFY_SEND_TIMEOUT_S = 0.5

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """sd_notify over $NOTIFY_SOCKET; a no-op when it is not set."""

    def __init__(self, address: str | bytes | None = None, *, watchdog_interval_s: float | None = None) -> None:
        self.address = address  # the AF_UNIX address to send to; None = notifications off
        #: seconds between two ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``); None = no watchdog
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._failing = False  # the last send failed (and that was logged at WARNING)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (left in place)."""
        address = _notify_address(environ.get("NOTIFY_SOCKET", ""))
        return cls(address, watchdog_interval_s=_watchdog_interval_s(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, watchdog_interval_s={self.watchdog_interval_s!r})"

    def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields as one message; never raises.

        A field cannot span lines (a newline would start a new assignment), so
        newlines in a field become spaces. When the socket is gone or refuses
        the message, the first failure is logged at WARNING and the following
        ones at DEBUG, until a send succeeds again.
        """
        if self.address is None or not fields:
            return
        message = "\n".join(field.replace("\n", " ") for field in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # connected, so that a full queue is waited for by poll() (with
                # a deadline) instead of spinning on EAGAIN
                sock.connect(self.address)
                sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
                sock.send(message)
        except OSError as exc:  # includes socket.timeout
            if self._failing:
                log_event(log, logging.DEBUG, "notify_failed", socket=_show(self.address), error=str(exc))
            else:
                self._failing = True
                log_event(
                    log,
                    logging.WARNING,
                    "notify_failed",
                    socket=_show(self.address),
                    error=str(exc),
                    message=message.decode(),
                )
            return
        if self._failing:
            self._failing = False
            log_event(log, logging.INFO, "notify_recovered", socket=_show(self.address))

    def ready(self, status: str) -> None:
        """Startup or a reload is complete: ``READY=1`` with the status line."""
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload starts: ``RELOADING=1`` and the ``CLOCK_MONOTONIC`` time in µs."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown has begun (systemd shows "deactivating" from now on)."""
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """A free-form status line (``systemctl status`` shows it as ``Status:``)."""
        self.send(f"STATUS={text}")

    async def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every ``watchdog_interval_s``, forever; return at once without a watchdog.

        Run it in a long-lived nursery: it pings from the event loop itself, so
        a loop that stops running lets the watchdog fire, which is the point.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        log_event(log, logging.INFO, "watchdog", interval_s=interval_s)
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval_s)


def _notify_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address: ``/path``, or ``@name`` → b"\\0name"."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd 254+ also knows "vsock:CID:PORT" (VMs); a service on a host never gets one
    log_event(log, logging.WARNING, "notify_unsupported", socket=value)
    return None


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC``, when the watchdog is meant for this process."""
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None  # meant for another process (our parent or child)
        except ValueError:
            log_event(log, logging.WARNING, "watchdog_ignored", reason=f"invalid WATCHDOG_PID: {pid_text}")
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        log_event(log, logging.WARNING, "watchdog_ignored", reason=f"invalid WATCHDOG_USEC: {usec_text}")
        return None
    return usec / 2 / 1_000_000


def _show(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address


def listen_fds(environ: Mapping[str, str] = os.environ, *, unset: bool = True) -> dict[str, list[socket.socket]]:
    """Take the sockets systemd passed: ``{FileDescriptorName: [sockets]}``, in fd order.

    The fds (3, 4, ...) count only when ``LISTEN_PID`` is this process; they are
    made non-blocking and close-on-exec. A missing name is ``"unknown"``. An fd
    that is not a socket (``ListenFIFO=``...) is left alone with a warning. With
    ``unset`` (and a mutable ``environ``), ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed whatever they said, as ``sd_listen_fds(1)``
    does, so that no child process takes the fds for its own. Call it once.
    """
    try:
        return _take_fds(environ)
    finally:
        if unset and isinstance(environ, MutableMapping):
            for name in _LISTEN_VARIABLES:
                environ.pop(name, None)


def _take_fds(environ: Mapping[str, str]) -> dict[str, list[socket.socket]]:
    pid_text = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    if not pid_text or not count_text:
        return {}
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        log_event(
            log,
            logging.WARNING,
            "listen_fds_ignored",
            reason=f"invalid LISTEN_PID={pid_text!r} or LISTEN_FDS={count_text!r}",
        )
        return {}
    if pid != os.getpid():
        return {}  # meant for another process
    if count <= 0:
        return {}
    names = environ.get("LISTEN_FDNAMES", "")
    name_list = names.split(":") if names else []
    if names and len(name_list) != count:
        log_event(
            log,
            logging.WARNING,
            "listen_fds_names",
            reason=f"LISTEN_FDNAMES has {len(name_list)} names for {count} fds: {names}",
        )
    name_list += [UNKNOWN_FD_NAME] * (count - len(name_list))
    passed: dict[str, list[socket.socket]] = {}
    for offset in range(count):
        fd = LISTEN_FDS_START + offset
        name = name_list[offset] or UNKNOWN_FD_NAME
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
        except OSError as exc:
            log_event(log, logging.WARNING, "listen_fd_skipped", fd=fd, name=name, reason=str(exc))
            continue
        sock.setblocking(False)
        passed.setdefault(name, []).append(sock)
        log_event(log, logging.INFO, "listen_fd", fd=fd, name=name, address=_sockname(sock))
    return passed


def _sockname(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return repr(address)
