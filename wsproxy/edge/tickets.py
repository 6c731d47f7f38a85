"""TLS session ticket keys of the listeners: rotated, and kept across reloads.

OpenSSL encrypts session tickets (TLS 1.3 tickets, TLS 1.2 ``SessionTicket``)
with a key of the ``SSL_CTX`` that accepted the connection, made at random
when the context is created. A reload builds new ``SSLContext`` objects, so on
its own every reload would invalidate every ticket, and a context that lives
for months would never change its key. Python's ``ssl`` has no API for ticket
keys, so this module sets them through libssl with ``ctypes``:
``SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)`` on the ``SSL_CTX *`` of the
Python object (the first field after the object header of CPython's
``_ssl._SSLContext``), and ``SSL_CTX_set_timeout`` to the ticket lifetime.

Policy, per listener: one 80-byte key (16 bytes of name, 32 of HMAC key, 32
of AES key) from ``os.urandom``, held in memory only (never written to disk,
never logged). It is replaced every ``session_ticket_lifetime``, checked when a
connection is accepted; a ticket is honoured while the key that encrypted it is
current and OpenSSL's session timeout (the same lifetime) has not passed, so
between 0 and one lifetime after it was issued; a client with an older ticket
gets a full handshake and a new ticket. A reload keeps the key of each listener
whose client-certificate policy (``client_cert``, ``client_ca`` and the CA
file's contents) did not change, so tickets survive certificate renewals; a
changed policy starts a new key, so no session verified under the old policy
is resumed. OpenSSL encrypts and decrypts tickets with the key of the context
the connection started with (``session_ctx``), the listener's default context,
also when SNI switches the certificate, so that is the one that gets the key.

Fail safe: the ``ctypes`` path is taken only on CPython with a libssl whose
version is ``ssl.OPENSSL_VERSION_NUMBER``, and only after the pointer proves to
be the context's (``SSL_CTX_get_options`` and ``SSL_CTX_get_verify_mode``
agree with the Python object) and the key reads back. Anything else logs one
WARNING (``event=tls_tickets_fallback``) and leaves OpenSSL's own behaviour:
tickets work within one config generation, a reload starts new keys, and keys
rotate only with reloads.

This is not the TLS channel (``edge.tls``) and does no I/O but reading the
client CA file when a listener's context changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config.schema import TlsConfig
from ..errors import WsproxyError
from ..log import log_event
from .contexts import listener_context

log = logging.getLogger("wsproxy.edge.tickets")

#: OpenSSL ``ssl.h``: ``SSL_CTRL_GET_TLSEXT_TICKET_KEYS``, ``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``.
SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
#: OpenSSL >= 1.1.0: key name (16) + HMAC secret (32) + AES-256 key (32).
TICKET_KEY_BYTES = 80


class TicketKeysUnavailable(WsproxyError):
    """libssl cannot be reached safely from Python; the message says why."""


class Libssl:
    """The few libssl functions this module calls, from the library ``_ssl`` is linked to."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise TicketKeysUnavailable(f"not CPython ({sys.implementation.name})")
        import _ssl

        path = getattr(_ssl, "__file__", None)
        try:
            # dlsym on the extension's handle also searches the libraries it was linked with.
            lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
            version = lib.OpenSSL_version_num
            self._ctrl = lib.SSL_CTX_ctrl
            self._options = lib.SSL_CTX_get_options
            self._verify_mode = lib.SSL_CTX_get_verify_mode
            self._set_timeout = lib.SSL_CTX_set_timeout
        except (OSError, AttributeError) as exc:
            raise TicketKeysUnavailable(f"libssl functions not found: {exc}") from None
        version.restype, version.argtypes = ctypes.c_ulong, []
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            raise TicketKeysUnavailable(
                f"libssl {version():#x} is not the one Python's ssl was built with ({ssl.OPENSSL_VERSION_NUMBER:#x})"
            )
        self._ctrl.restype, self._ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self._options.restype, self._options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        self._verify_mode.restype, self._verify_mode.argtypes = ctypes.c_int, [ctypes.c_void_p]
        self._set_timeout.restype, self._set_timeout.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_long]

    def ssl_ctx(self, context: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` of ``context``, checked against what the Python object reports."""
        import _ssl

        if not isinstance(context, _ssl._SSLContext):
            raise TicketKeysUnavailable(f"not an SSLContext: {type(context).__name__}")
        # CPython's PySSLContext: PyObject_HEAD, then SSL_CTX *ctx.
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not pointer:
            raise TicketKeysUnavailable("no SSL_CTX where CPython keeps it")
        if self._options(pointer) != context.options or self._verify_mode(pointer) != int(context.verify_mode):
            raise TicketKeysUnavailable("the SSL_CTX found does not match the SSLContext (unknown object layout)")
        return pointer

    def set_ticket_key(self, context: ssl.SSLContext, key: bytes, lifetime_s: float) -> None:
        """Make ``key`` the only ticket key of ``context`` and ``lifetime_s`` its session timeout."""
        pointer = self.ssl_ctx(context)
        if len(key) != TICKET_KEY_BYTES:
            raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes, got {len(key)}")
        given = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)
        if self._ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, given) != 1:
            raise TicketKeysUnavailable("SSL_CTX_set_tlsext_ticket_keys failed")
        back = ctypes.create_string_buffer(TICKET_KEY_BYTES)
        if self._ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, back) != 1 or back.raw != key:
            raise TicketKeysUnavailable("the ticket key did not read back")
        self._set_timeout(pointer, max(1, int(lifetime_s)))


@dataclass(slots=True)
class _ListenerKey:
    key: bytes
    rotate_at: float  # clock() value at which the key is replaced
    policy: tuple[object, ...]  # the client-certificate policy the key was made under
    context: ssl.SSLContext | None = None  # the context that has it (the listener's current one)


class SessionTickets:
    """The ticket keys of every TLS listener; one per app, consulted on every TLS accept.

    ``context_for`` returns the listener's ``SSLContext`` after making sure it
    carries the listener's current key: a dictionary lookup and a clock read
    when nothing changed; a ``ctypes`` call when the context is new (start, a
    reload) or the key is due.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        libssl: Callable[[], Libssl] = Libssl,
    ) -> None:
        self._clock = clock
        self._random = random_bytes
        self._load = libssl
        self._lib: Libssl | None = None
        self._failed: str | None = None  # why the ctypes path is off (logged once)
        self._keys: dict[str, _ListenerKey] = {}

    @property
    def fallback_reason(self) -> str | None:
        """Why keys are OpenSSL's own (None while this module sets them)."""
        return self._failed

    def context_for(self, listener: str, tls: TlsConfig) -> ssl.SSLContext:
        """The context to accept a connection of ``listener`` with, carrying its current ticket key."""
        context = listener_context(tls)
        lifetime_s = tls.session_ticket_lifetime_s
        if not lifetime_s or self._failed is not None:
            return context
        entry = self._keys.get(listener)
        now = self._clock()
        if entry is not None and entry.context is context and now < entry.rotate_at:
            return context  # the common case
        policy = _policy(tls)
        if entry is None or entry.policy != policy or now >= entry.rotate_at:
            entry = self._keys[listener] = _ListenerKey(self._random(TICKET_KEY_BYTES), now + lifetime_s, policy)
        try:
            if self._lib is None:
                self._lib = self._load()
            self._lib.set_ticket_key(context, entry.key, lifetime_s)
        except TicketKeysUnavailable as exc:
            self._failed = str(exc)
            self._keys.clear()
            log_event(
                log,
                logging.WARNING,
                "tls_tickets_fallback",
                reason=self._failed,
                effect="ticket keys are OpenSSL's own: a reload starts new ones, no rotation between reloads",
            )
            return context
        entry.context = context
        return context


def _policy(tls: TlsConfig) -> tuple[object, ...]:
    """What a resumed session skips re-checking: the client-certificate policy."""
    digest = ""
    if tls.client_ca and tls.client_cert != "off":
        try:
            with open(tls.client_ca, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            digest = "unreadable"  # the loader read it; whatever it is now, it is a change
    return (tls.client_cert, tls.client_ca, digest)


__all__ = ["Libssl", "SessionTickets", "TICKET_KEY_BYTES", "TicketKeysUnavailable"]
