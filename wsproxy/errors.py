"""The exception tree of wsproxy.

Each error knows who misbehaved and what the reaction is, so that the code that
catches it does not have to decide again::

    WsproxyError
    ├── ConfigError(file, line, column, path, message)   one problem in a config file
    ├── ConfigErrors(errors)                              all problems found in one load
    ├── config.files.FileRefused                          a config-referenced file that may not be read
    ├── UpstreamUnavailable(status, reason, headers)      502/503/504 before the upgrade
    │   └── LocalOverload(reason, headers)                503 + Retry-After: the proxy's own
    │                                                     sockets ran out, not the backend's fault
    ├── edge.channel.ChannelBroken                        the peer cannot receive any more
    ├── edge.gate.ProxyHeaderError                        a bad PROXY protocol header: close
    ├── edge.contexts.TlsError(file, reason)              a certificate, key or CA file is unusable
    ├── edge.tls.TlsHandshakeFailed                       TLS towards a backend failed (logged reason)
    ├── edge.tickets.TicketKeysUnavailable                libssl unreachable: OpenSSL's own ticket keys
    ├── edge.jwks.JwksFetchFailed                         a jwks_url fetch failed: the last good keys stay
    ├── edge.jwks.JwksStartupError                        at start, a route has no JWT keys: exit 1
    ├── app.ListenError                                   a listener of the initial config cannot open
    ├── control.reload.ReloadError                        a valid config that could not be applied
    ├── control.discovery.LookupFailed                    a DNS lookup gave no answer (logged, counted)
    ├── supervisor.ipc.ChannelClosed                      the other process of a worker channel went away
    ├── supervisor.messages.ProtocolError                 a worker channel carried something not a message
    └── cli.CommandFailed                                 a CLI command's one-line failure

The classes live beside the code that raises them; this module holds the
base and the ones several layers share. Two private exceptions are control
flow inside one function's callees and never escape it
(``edge.session._Done``, ``edge.forward_auth._NoAnswer``).

Refused handshakes are not exceptions: a refusal is one value
(``edge.refusal.Refused``) answered, logged and counted by one function.
Protocol violations inside an established session are not exceptions
either: the frame scanner returns them as values (``proto.frames.Violation``),
because the relay reacts to them in-line, at a frame boundary.
"""

from __future__ import annotations

from collections.abc import Sequence


class WsproxyError(Exception):
    """Base class of every error wsproxy raises on purpose."""


class ConfigError(WsproxyError):
    """One problem in a config file, located by position and YAML path.

    ``str()`` gives the line an operator sees, in the compiler style that
    editors understand::

        conf/wsproxy.yaml:14:9: pools.chat.backends[2].address: expected "host:port", got "chat-3"

    ``line`` and ``column`` count from 1; both are 0 when the problem has no
    position (the file cannot be read at all).
    """

    def __init__(self, file: str, line: int, column: int, path: str, message: str) -> None:
        super().__init__(file, line, column, path, message)
        self.file = file
        self.line = line
        self.column = column
        self.path = path
        self.message = message

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigErrors(WsproxyError):
    """Every problem found while loading one config file (at least one)."""

    def __init__(self, errors: Sequence[ConfigError], partial: object = None) -> None:
        assert errors, "ConfigErrors needs at least one error"
        super().__init__(errors)
        self.errors = list(errors)
        #: what the loader could still read of a config with errors (``config.load.Partial``), so
        #: that its certificate files are checked in the same run; None when nothing was
        self.partial = partial

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class UpstreamUnavailable(WsproxyError):
    """No backend could take the session: 502 (refused), 503 (none available), 504 (silent)."""

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)  # extra response headers (Retry-After)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class LocalOverload(UpstreamUnavailable):
    """The proxy could not create or connect its own upstream socket (EMFILE, ENOBUFS...): 503.

    Not a backend failure: no passive-health record, no retry on another backend.
    """

    def __init__(self, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(503, reason, headers)
