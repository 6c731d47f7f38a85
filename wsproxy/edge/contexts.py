"""SSL contexts from the TLS settings of a config: built by the edge, checked before a config is used.

The config holds data about TLS only (``TlsConfig``, ``BackendTlsConfig``: file
paths, settings, the position of the ``tls`` mapping in the YAML). This module
turns it into ``ssl.SSLContext`` objects:

- ``listener_context(tls)``: a TLS listener's context, with its SNI
  certificates and client CA;
- ``pool_context(pool)``: the client context of a pool's ``wss://`` backends,
  from its ``tls`` mapping or, without one, the system's trust store;
- ``check_contexts(config)``: builds every context ``config`` needs, and
  raises ``ConfigErrors`` at the position of the ``tls`` mapping for each
  certificate, key or CA file that cannot be used (missing, expired, not PEM,
  a key of another certificate);
- ``load_checked(path)``: ``config.load.load_config`` then ``check_contexts``.
  Every entry point loads with it (``wsproxy run`` and ``check``, a reload,
  the supervisor of ``workers: N`` and each worker), so a bad certificate
  refuses a config before anything uses it, and the old one keeps serving.

Contexts are cached per config object, weakly: built once for each
``TlsConfig`` or ``BackendTlsConfig`` object (by ``check_contexts``, in the
loader's thread) and dropped with it. Not by value: a reload that names the
same files builds a new object, which reads them again (a certificate renewed
in place is served from the next accept on). The system trust store, for
pools without a ``tls`` mapping, is read once per checked config and shared.

Policy: TLS 1.2 at least, Mozilla's "intermediate" cipher list for TLS 1.2
(TLS 1.3 suites are OpenSSL's), ALPN ``http/1.1``, no compression, no
renegotiation. SNI picks the certificate: exact names before wildcards (a
wildcard covers exactly one label, RFC 6125 §6.4.3), the top-level
certificate when nothing matches. Session resumption is on unless
``session_ticket_lifetime`` is 0; the ticket keys are set by ``edge.tickets``.

What this is not: TLS channels and handshakes (``edge.tls``). This module
imports ``ssl`` and no trio, so ``wsproxy check`` stays a plain process.
"""

from __future__ import annotations

import datetime
import ssl
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from ..config.schema import BackendTlsConfig, Config, ListenerConfig, PoolConfig, PoolName, Position, TlsConfig
from ..config.snapshot import ConfigTexts
from ..errors import ConfigError, ConfigErrors, WsproxyError

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "TlsError",
    "check_contexts",
    "client_context",
    "listener_context",
    "load_checked",
    "pool_context",
    "server_context",
]

#: Mozilla "intermediate" (v5.7) TLS 1.2 cipher suites.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


class TlsError(WsproxyError):
    """A certificate, key or CA file cannot be used."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


# --- the cache ------------------------------------------------------------------

K = TypeVar("K", TlsConfig, BackendTlsConfig)


class _Contexts:
    """SSL contexts by config object (identity, not value), each dropped with its object."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[TlsConfig] | weakref.ref[BackendTlsConfig], ssl.SSLContext]] = {}

    def get(self, key: K, build: Callable[[K], ssl.SSLContext]) -> ssl.SSLContext:
        entry = self._by_id.get(id(key))
        if entry is not None and entry[0]() is key:
            return entry[1]
        context = build(key)
        ident = id(key)

        def forget(ref: object) -> None:
            current = self._by_id.get(ident)
            if current is not None and current[0] is ref:
                del self._by_id[ident]

        self._by_id[ident] = (weakref.ref(key, forget), context)
        return context

    def __len__(self) -> int:
        return len(self._by_id)


_contexts = _Contexts()
_system: ssl.SSLContext | None = None  # the system trust store's client context (pools without a tls mapping)


def listener_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SSLContext of a TLS listener (built at the first call for this object; raises ``TlsError``)."""
    return _contexts.get(tls, server_context)


def pool_context(pool: PoolConfig) -> ssl.SSLContext:
    """The client SSLContext of ``pool``'s wss:// backends (raises ``TlsError``)."""
    global _system
    if pool.tls is not None:
        return _contexts.get(pool.tls, client_context)
    if _system is None:
        _system = client_context(None)
    return _system


def check_contexts(config: Config) -> None:
    """Build every SSLContext ``config`` needs; ``ConfigErrors`` for each file that cannot be used.

    Each error is placed at the ``tls`` mapping that names the file (the
    listener's or the pool's), as the loader places its own.
    """
    global _system
    errors, system = _context_errors(config.source, config.listeners, config.pools)
    if errors:
        raise ConfigErrors(errors)
    if system is not None:
        _system = system


def _context_errors(
    source: str, listeners: Sequence[ListenerConfig], pools: Mapping[PoolName, PoolConfig]
) -> tuple[list[ConfigError], ssl.SSLContext | None]:
    """What ``check_contexts`` finds wrong with these listeners and pools, and the system trust store it read."""
    errors: list[ConfigError] = []
    system: ssl.SSLContext | None = None
    for index, spec in enumerate(listeners):
        if spec.tls is not None:
            _check(errors, source, spec.tls.where, f"listeners[{index}].tls", partial(listener_context, spec.tls))
    for name, pool in pools.items():
        if pool.tls is not None:
            _check(errors, source, pool.tls.where, f"pools.{name}.tls", partial(pool_context, pool))
        elif system is None and any(b.tls for b in pool.backends):
            # Read again for each config, as a reload reads every other file again.
            system = _check(errors, source, None, f"pools.{name}.backends", partial(client_context, None))
    return errors, system


def _check(
    errors: list[ConfigError], source: str, where: Position | None, path: str, build: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext | None:
    try:
        return build()
    except TlsError as exc:
        if where is None:  # the system trust store, or a config built by code: no line to point at
            where = Position(source, 0, 0, path)
        errors.append(ConfigError(where.file, where.line, where.column, where.path, f"{exc.file}: {exc.reason}"))
        return None


def load_checked(path: str, texts: ConfigTexts | None = None) -> Config:
    """The config in ``path`` with every SSLContext it needs built; ``ConfigErrors`` otherwise.

    What ``wsproxy run`` and ``wsproxy check``, reloads, the supervisor and
    its workers load with (see the module docstring). ``texts`` is where the
    YAML files are read (``config.load.load_config``): a worker of ``workers:
    N`` gives the supervisor's snapshot. A config with errors still has the
    certificate files of the listeners and pools the loader could read
    checked, and their errors join the others, in position order: one run of
    ``wsproxy check`` says everything that is wrong.
    """
    from ..config.load import Partial, load_config, sorted_errors

    try:
        config = load_config(path, texts)
    except ConfigErrors as exc:
        part = exc.partial
        if isinstance(part, Partial):
            more, _ = _context_errors(part.source, part.listeners, part.pools)
            if more:
                raise ConfigErrors(sorted_errors([*exc.errors, *more], part.source)) from None
        raise
    check_contexts(config)
    return config


# --- building ---------------------------------------------------------------------


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _check_certificate(path: str, now: datetime.datetime) -> None:
    """Refuse a certificate file that cannot be read or whose leaf has expired."""
    from cryptography import x509

    from ..config.files import FileRefused, read_file

    try:
        data = read_file(path)  # a regular file of at most 1 MiB, never a FIFO or a device
    except FileRefused as exc:
        raise TlsError(path, str(exc)) from None
    except OSError as exc:
        raise TlsError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        leaf = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(path, "not a PEM certificate") from None
    if leaf.not_valid_after_utc < now:
        raise TlsError(path, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if leaf.not_valid_before_utc > now:
        raise TlsError(path, f"certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, now: datetime.datetime) -> None:
    _check_certificate(cert, now)
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(exc.filename or key, "cannot read: No such file or directory") from None
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsError(key, f"the key does not match the certificate {cert}") from None
        raise TlsError(key, f"cannot load the key pair with {cert}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsError(key, f"cannot read: {exc.strerror or exc}") from None


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TlsError(path, "cannot read: No such file or directory") from None
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(path, f"not a usable PEM CA bundle: {exc}") from None


def server_context(tls: TlsConfig, *, now: datetime.datetime | None = None) -> ssl.SSLContext:
    """A new SSLContext for a TLS listener, with its SNI certificates and client CA (uncached)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    default = _server_leaf_context(tls, tls.cert, tls.key, now)
    by_name: dict[str, ssl.SSLContext] = {}
    wildcards: list[tuple[str, ssl.SSLContext]] = []
    for entry in tls.sni:
        ctx = _server_leaf_context(tls, entry.cert, entry.key, now)
        for name in entry.names:
            if name.startswith("*."):
                wildcards.append((name[1:], ctx))  # ".example.com"
            else:
                by_name.setdefault(name, ctx)
    if by_name or wildcards:
        default.sni_callback = _sni_chooser(by_name, wildcards)
    return default


def _server_leaf_context(tls: TlsConfig, cert: str, key: str, now: datetime.datetime) -> ssl.SSLContext:
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH)
    if not tls.session_ticket_lifetime_s:  # resumption off: no tickets, no session cache
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
        # (Python's server contexts keep OpenSSL's session-id cache; a session id without
        # tickets is only honoured by the same context, i.e. until the next reload.)
    _load_chain(ctx, cert, key, now)
    if tls.client_ca and tls.client_cert != "off":
        _load_ca(ctx, tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_cert == "required" else ssl.CERT_OPTIONAL
    return ctx


def _sni_chooser(by_name: dict[str, ssl.SSLContext], wildcards: Sequence[tuple[str, ssl.SSLContext]]):  # type: ignore[no-untyped-def]
    def choose(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        chosen = by_name.get(name)
        if chosen is None:
            # RFC 6125 §6.4.3: "*" covers exactly one label, so "*.w.test" names
            # "a.w.test" and not "a.b.w.test" (clients refuse that match anyway).
            label, dot, rest = name.partition(".")
            if label and dot:
                for suffix, ctx in wildcards:
                    if "." + rest == suffix:
                        chosen = ctx
                        break
        if chosen is not None:
            sock.context = chosen

    return choose


def client_context(tls: BackendTlsConfig | None) -> ssl.SSLContext:
    """A new SSLContext for wss:// backends (uncached): verification always on."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if tls is not None and tls.ca:
        _load_ca(ctx, tls.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls is not None and tls.cert:
        now = datetime.datetime.now(datetime.timezone.utc)
        _load_chain(ctx, tls.cert, tls.key or tls.cert, now)
    return ctx
