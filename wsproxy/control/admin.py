"""The admin listener: where the admin API listens, and how a reload changes it (trio shell).

::

    AdminServer.serve           in run.py's nursery (serve_admin for one config)
    └── nursery
        ├── _run_listening      one per listener generation; a reload that moves it starts another
        │   └── accept_loop     one per bound socket (edge.listener)
        └── serve_connection    one per admin connection: h11, keep-alive (control.admin_http)

It binds ``admin.bind`` (TCP) or a unix socket (mode 0660; a stale socket
file is replaced, another process's is left alone; removed on exit). A TCP
bind off loopback needs a token, or ``insecure_no_token: true`` (the config
loader checks; a WARNING here at start). The names each listener answers to
(``admin_policy.AdminSite``) come from what it actually bound.

A reload applies the admin section (``AdminServer.prepare`` then ``commit``):
a new token replaces the old one at once, for open connections too; a new
``bind`` opens the new listener first (a failure leaves the old one serving
and fails the reload), then stops the old one, whose connections finish
their current requests. Known limit: moving to the same port on an
overlapping address (``127.0.0.1:9090`` → ``0.0.0.0:9090``) fails with
EADDRINUSE, since the old socket still holds the port; move through another
port.

The routes, the checks and the answers are ``control.admin_routes``'s; this
module does no HTTP and no TLS.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable
from dataclasses import dataclass, field

import trio

from ..config.ops import is_loopback_host
from ..config.schema import AdminConfig, ListenerConfig, ListenerName, hostport
from ..edge.listener import BACKLOG, accept_loop, open_listener
from .admin_http import MAX_HEAD_BYTES, serve_connection
from .admin_routes import AdminApp, Reloader, Upgrader
from .admin_policy import AdminSite
from ..log import log_event

__all__ = ["MAX_HEAD_BYTES", "AdminApp", "AdminChange", "AdminServer", "serve_admin"]

log = logging.getLogger("wsproxy.control.admin")

UNIX_SOCKET_MODE = 0o660


async def serve_admin(
    app: AdminApp, config: AdminConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin API on ``config.bind`` or ``config.unix_path`` until cancelled.

    ``task_status.started`` gets the bound address once listening:
    ``"127.0.0.1:9090"``, ``"[::1]:9090"`` or ``"unix:/run/wsproxy/admin.sock"``.
    """
    # With a config, serve() always starts with an address, never None.
    await AdminServer(app).serve(config, task_status=task_status)  # type: ignore[arg-type]


@dataclass(eq=False)
class _Listening:
    """One opened admin listener: its sockets, what it answers to, and the scope that stops it."""

    sockets: list[socket.socket]
    addresses: list[str]
    site: AdminSite
    unix_path: str | None = None
    inode: int | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.unix_path is not None:
            _unlink_if_ours(self.unix_path, self.inode)


@dataclass(frozen=True)
class AdminChange:
    """A reload's admin section, made ready by ``AdminServer.prepare``: the new listener already bound."""

    config: AdminConfig | None
    token: bytes | None
    move: bool  # bind or unix_path changed (or the listener was added or removed)
    listening: _Listening | None  # opened when ``move`` and a listener is wanted


class AdminServer:
    """The admin listener of one process, kept across reloads.

    ``serve`` runs it; a reload calls ``prepare`` (may raise OSError: nothing
    changed) and, once the rest of the config is applied, ``commit`` (never
    fails) or ``abandon``. The token is read per request, so a commit takes
    effect for the very next request on any connection.
    """

    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.config: AdminConfig | None = None
        self.token: bytes | None = None
        self.reloader: Reloader | None = None  # POST /reload; set by ``wsproxy run``
        self.upgrader: Upgrader | None = None  # POST /upgrade; set by the supervisor (workers > 1)
        self.reload_timeout_s = 30.0  # timeouts.reload of the running config (``wsproxy run`` keeps it current)
        self._listening: _Listening | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def address(self) -> str | None:
        """Where it listens now (the first address), or None when off."""
        return self._listening.addresses[0] if self._listening else None

    async def serve(
        self, config: AdminConfig | None, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen as ``config`` says (not at all when None) until cancelled; started with the address."""
        token = _token(config) if config is not None else None
        listening = _open(config) if config is not None else None  # OSError: start-up fails, as for any listener
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.config, self.token = config, token
                if listening is not None:
                    self._start(listening)
                    listening = None
                task_status.started(self.address)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if listening is not None:
                listening.close()

    def prepare(self, config: AdminConfig | None) -> AdminChange:
        """Ready ``config`` for ``commit``: open the new listener if it moved; OSError if it cannot."""
        token = _token(config) if config is not None else None
        move = _where(config) != _where(self.config)
        listening = _open(config) if move and config is not None else None
        return AdminChange(config, token, move, listening)

    def abandon(self, change: AdminChange) -> None:
        """The reload failed elsewhere: close what ``prepare`` opened."""
        if change.listening is not None:
            change.listening.close()

    def commit(self, change: AdminChange) -> None:
        """Swap in the token, move the listener, and log what changed."""
        changed = []
        if change.token != self.token:
            changed.append("token")
        if change.config is not None and self.config is not None and change.config.insecure_no_token != self.config.insecure_no_token:
            changed.append("insecure_no_token")
        self.config, self.token = change.config, change.token
        old = self._listening
        if change.move:
            changed.append("bind")
            if old is not None:
                old.scope.cancel()  # _run_listening closes its sockets; its connections finish their requests
                self._listening = None
            if change.listening is not None:
                if self._nursery is None:  # not serving (shutting down): nothing to move to
                    change.listening.close()
                else:
                    self._start(change.listening)
        if not changed:
            return
        log_event(
            log,
            logging.INFO,
            "admin_reloaded",
            changed=",".join(changed),
            address=self.address or "off",
            was=old.addresses[0] if old and change.move else "-",
            auth="token" if self.token else "none",
        )
        if "token" in changed and self._listening is not None:
            _warn_if_insecure(self.config, self._listening.addresses, self.token)

    def _start(self, listening: _Listening) -> None:
        assert self._nursery is not None
        self._listening = listening
        self._nursery.start_soon(self._run_listening, listening)
        for address in listening.addresses:
            log_event(
                log,
                logging.INFO,
                "listening",
                listener='admin',
                address=address,
                auth="token" if self.token else "none",
            )
        _warn_if_insecure(self.config, listening.addresses, self.token)

    async def _run_listening(self, listening: _Listening) -> None:
        assert self._nursery is not None

        def handler(sock: socket.socket, _address: object) -> Awaitable[None]:
            return serve_connection(sock, self, listening.site)

        try:
            with listening.scope:
                async with trio.open_nursery() as accepting:
                    for sock in listening.sockets:
                        accepting.start_soon(accept_loop, sock, handler, self._nursery)
        finally:
            listening.close()


def _where(config: AdminConfig | None) -> object:
    return None if config is None else (config.bind, config.unix_path)


def _open(config: AdminConfig) -> _Listening:
    """Bind ``config``'s listener (OSError if it cannot)."""
    unix_path = config.unix_path
    if unix_path is not None:
        sock = _open_unix(unix_path)
        return _Listening([sock], [f"unix:{unix_path}"], AdminSite.for_unix(), unix_path, os.stat(unix_path).st_ino)
    if config.bind is None:
        raise ValueError("admin: neither bind nor unix_path is set")
    sockets = open_listener(ListenerConfig(name=ListenerName("admin"), bind=config.bind))
    bound = [sock.getsockname()[:2] for sock in sockets]
    return _Listening(
        sockets, [hostport(host, port) for host, port in bound], AdminSite.for_tcp(bound, config.bind.host)
    )


def _warn_if_insecure(config: AdminConfig | None, addresses: list[str], token: bytes | None) -> None:
    if config is None or config.bind is None or token is not None or is_loopback_host(config.bind.host):
        return
    log_event(
        log,
        logging.WARNING,
        "admin_insecure",
        address=addresses[0],
        reason="insecure_no_token: true: anyone who can reach this address can drain backends",
    )


def _token(config: AdminConfig) -> bytes | None:
    if config.token is None:
        return None
    token = config.token.strip()  # a token file usually ends with a line feed
    if not token:
        raise ValueError(f"admin: the token in {config.token_file or 'the config'} is empty")
    return token


def _open_unix(path: str) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path``, replacing a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"admin: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:  # nobody listens: a leftover of a process that is gone
                os.unlink(path)
            else:
                raise OSError(errno.EADDRINUSE, f"admin: another process is listening on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_if_ours(path: str, inode: int | None) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
