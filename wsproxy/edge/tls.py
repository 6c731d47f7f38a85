"""TLS: certificate loading, SSL contexts, and a TLS channel for the relay.

``server_context`` builds the ``SSLContext`` of a listener from its
``TlsConfig``: the one function that reads certificates and keys, called by the
config loader (so a reload re-reads and validates them before anything
changes) and nowhere else. ``client_context`` does the same for ``wss://``
backends. Both raise ``TlsError`` with the file and the reason.

``TlsChannel`` is a ``RawChannel`` with an ``ssl.SSLObject`` between memory
BIOs: the socket is driven like a plain one (a task parks only when the kernel
has nothing for it), OpenSSL works on memory. Unlike ``trio.SSLStream`` there
is no scheduler pass per call; unlike a non-blocking ``SSLSocket`` there are
no per-record reads and no bytes hidden in OpenSSL from readiness waits.

Policy: TLS 1.2 at least, Mozilla's "intermediate" cipher list for TLS 1.2
(TLS 1.3 suites are OpenSSL's), ALPN ``http/1.1``, no compression, no
renegotiation. SNI picks the certificate: exact names before wildcards (a
wildcard covers exactly one label, RFC 6125 §6.4.3), the
top-level certificate when nothing matches. Session resumption: TLS 1.3 tickets
and TLS 1.2 tickets and session ids are on unless ``session_ticket_lifetime``
is 0; the ticket keys are set by ``edge.tickets`` (rotation, reloads).

TLS 1.3 tickets are held back (RFC 8446 §4.6.1 lets the server send them at
any time after the handshake): a server TLS 1.3 channel keeps the
NewSessionTicket records OpenSSL writes when the handshake completes and sends
them in front of its first answer. Sent at once, they reach a client while it
writes its request, and a client that reads in one thread and writes in
another on one ``SSLSocket`` (``websockets``' sync client does) races inside
OpenSSL, which does not allow concurrent ``SSL_read`` and ``SSL_write`` on one
connection: 6 of 3,600 upgrades from 4 threads of that client timed out
(0 of 4,800 with the tickets held back). Held back, they arrive with the 101
(or the refusal), when such a client only reads.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Sequence

import trio

from ..config.schema import Address, BackendTlsConfig, PoolConfig, SniCertConfig, TlsConfig
from ..errors import WsproxyError
from .channel import ChannelBroken, RawChannel

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
    """The SSLContext of a TLS listener, with its SNI certificates and client CA."""
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
    """The SSLContext for wss:// backends: verification always on."""
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


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def peer_subject(sock: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The verified client certificate's subject as "CN=alice,O=Example", or None."""
    cert = sock.getpeercert()
    if not cert:
        return None
    parts = []
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
    for rdn in subject:
        for key, value in rdn:
            parts.append(f"{_SHORT_NAMES.get(key, key)}={value}")
    return ",".join(parts) or None


class TlsHandshakeFailed(WsproxyError):
    """A TLS handshake towards a backend failed; the message says why, for the log."""


def backend_server_name(pool: PoolConfig, address: Address) -> str:
    """The name a wss:// backend's certificate must carry: the pool's server_name, or its host."""
    return pool.tls.server_name if pool.tls and pool.tls.server_name else address.host


async def start_client_tls(channel: RawChannel, context: ssl.SSLContext, server_name: str) -> TlsChannel:
    """Wrap a fresh connection to a backend in TLS and verify its certificate.

    Raises ``TlsHandshakeFailed`` (the connection closed) with the verifier's
    reason; sessions and health checks report the same words.
    """
    tls = TlsChannel.wrap_client(channel.sock, context, server_name)
    tls.watched = channel.watched
    try:
        await tls.handshake()
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        raise TlsHandshakeFailed(f"TLS verification failed: {exc.verify_message} (server name {server_name!r})") from None
    except (ssl.SSLError, ChannelBroken) as exc:
        tls.close()
        raise TlsHandshakeFailed(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}") from None
    except BaseException:
        tls.close()
        raise
    return tls


class TlsChannel(RawChannel):
    """A TLS connection: an ``ssl.SSLObject`` between two memory BIOs over the raw socket.

    The socket is read and written by ``RawChannel`` (one ``recv`` or ``send``
    per chunk, parking only when the kernel says so); OpenSSL only encrypts
    and decrypts memory. That costs fewer system calls than a non-blocking
    ``SSLSocket`` (which reads each record's header and body separately, plus
    an EAGAIN) and leaves no bytes hidden inside OpenSSL where a readiness
    wait cannot see them.

    Both pumps of a session use one channel (one reads, the other writes), and
    both may produce TLS output; ``_flush`` lets only one task at a time drain
    the outgoing BIO to the socket, so records never interleave.
    """

    __slots__ = ("ssl", "incoming", "outgoing", "_flushing", "_flushed", "_held", "tls_error")

    def __init__(self, sock: socket.socket, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        super().__init__(sock)
        self.ssl = ssl_object
        self.incoming = incoming
        self.outgoing = outgoing
        self._flushing = False
        self._flushed: trio.Event | None = None
        self._held = b""  # TLS 1.3 tickets, sent in front of the first answer (module docstring)
        self.tls_error: str | None = None  # why the last read ended in a TLS error (an alert), for the log

    @classmethod
    def wrap_server(cls, sock: socket.socket, context: ssl.SSLContext) -> TlsChannel:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(sock, context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)

    @classmethod
    def wrap_client(cls, sock: socket.socket, context: ssl.SSLContext, server_name: str) -> TlsChannel:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
        return cls(sock, ssl_object, incoming, outgoing)

    def take_output(self) -> bytes:
        """What is still to be sent, in order (held tickets first), for a new owner of the socket."""
        held, self._held = self._held, b""
        return held + (self.outgoing.read() if self.outgoing.pending else b"")

    async def _flush(self) -> None:
        """Send what OpenSSL has written, in order; raises ChannelBroken."""
        while self._flushing:  # another task is sending earlier records: wait for it
            assert self._flushed is not None
            await self._flushed.wait()
        if not self.outgoing.pending and not self._held:
            return
        self._flushing = True
        self._flushed = trio.Event()
        try:
            if self._held:  # written before anything that is pending: records go out in order
                held, self._held = self._held, b""
                await RawChannel.send(self, held)
            while self.outgoing.pending:
                await RawChannel.send(self, self.outgoing.read())
        finally:
            self._flushing = False
            self._flushed.set()

    async def _fill(self) -> bool:
        """Move the next bytes from the socket into OpenSSL; False at EOF."""
        data = await RawChannel.receive(self)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        """Complete the TLS handshake; raises ssl.SSLError or ChannelBroken."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ChannelBroken("connection closed during the TLS handshake") from None
            except ssl.SSLError:
                with trio.move_on_after(1):  # the alert OpenSSL wrote says why (best effort)
                    try:
                        await self._flush()
                    except ChannelBroken:
                        pass
                raise
        if self.ssl.server_side and self.ssl.version() == "TLSv1.3":
            # The client has sent its Finished: all OpenSSL wrote since is post-handshake
            # (NewSessionTicket). Hold it until the first answer (module docstring).
            self._held = self.outgoing.read()
            return
        await self._flush()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            try:
                data = self.ssl.read(max_bytes)
            except ssl.SSLWantReadError:
                try:
                    if self.outgoing.pending:
                        await self._flush()
                except ChannelBroken:
                    return b""
                if not await self._fill():
                    continue  # OpenSSL now sees EOF: read raises below
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                self.tls_error = exc.reason or str(exc)
                return b""  # an alert or garbage on the wire: the peer is gone
            else:
                if self.outgoing.pending:  # e.g. a TLS 1.3 key update answer
                    try:
                        await self._flush()
                    except ChannelBroken:
                        return b""
                return data

    def pending_error(self) -> str | None:
        """The TLS error the peer already sent (an alert) but nobody read, without waiting.

        For a send that failed because the peer reset the connection: the
        alert that explains why may still be in the socket's receive queue.
        """
        if self.tls_error is None:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if data:
                self.incoming.write(data)
            try:
                self.ssl.read(1)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self.tls_error = exc.reason or str(exc)
        return self.tls_error

    async def send(self, data: bytes | memoryview) -> None:
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            raise ChannelBroken(str(exc)) from None
        await self._flush()

    def send_eof(self) -> None:
        """Send close_notify (best effort, without waiting), then half-close TCP."""
        try:
            self.ssl.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        if (self.outgoing.pending or self._held) and not self._flushing:
            held, self._held = self._held, b""
            try:
                self.sock.send(held + self.outgoing.read())
            except OSError:
                pass
        super().send_eof()


__all__ = [
    "INTERMEDIATE_CIPHERS",
    "SniCertConfig",
    "TlsChannel",
    "TlsError",
    "client_context",
    "peer_subject",
    "server_context",
]
