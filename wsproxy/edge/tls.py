"""TLS: certificate loading, SSL contexts, and a TLS channel for the relay.

``server_context`` builds the ``SSLContext`` of a listener from its
``TlsConfig``: the one function that reads certificates and keys, called by the
config loader (so a reload re-reads and validates them before anything
changes) and nowhere else. ``client_context`` does the same for ``wss://``
backends. Both raise ``TlsError`` with the file and the reason.

``TlsChannel`` is a ``RawChannel`` over a non-blocking ``ssl.SSLSocket``:
OpenSSL reads and writes the socket itself, in C, and the task parks on
``wait_readable``/``wait_writable`` only when OpenSSL asks for it. That avoids
the memory-BIO copies and the scheduler passes of ``trio.SSLStream`` (see
bench/README.md for the measurements).

Policy: TLS 1.2 at least, Mozilla's "intermediate" cipher list for TLS 1.2
(TLS 1.3 suites are OpenSSL's), ALPN ``http/1.1``, no compression, no
renegotiation. SNI picks the certificate: exact names before wildcards, the
top-level certificate when nothing matches.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Sequence

import trio

from ..config.schema import BackendTlsConfig, SniCertConfig, TlsConfig
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


class TlsError(Exception):
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

    try:
        with open(path, "rb") as file:
            data = file.read()
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
    # TLS 1.3 session tickets are off: with them, about 3 in 1,000 back-to-back TLS 1.3
    # sessions (Python's ssl client) never delivered their request to the non-blocking
    # SSLSocket (reproduced with 4 client threads; 0 in 2,700 without tickets, 0 with
    # TLS 1.2). Until that is understood, clients do full handshakes on reconnect.
    ctx.num_tickets = 0
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
            for suffix, ctx in wildcards:
                if name.endswith(suffix) and len(name) > len(suffix):
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


def peer_subject(sock: ssl.SSLSocket) -> str | None:
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


class TlsChannel(RawChannel):
    """A TLS connection over a non-blocking ``ssl.SSLSocket``."""

    __slots__ = ()

    sock: ssl.SSLSocket

    @classmethod
    def wrap_server(cls, sock: socket.socket, context: ssl.SSLContext) -> TlsChannel:
        sock.setblocking(False)
        return cls(context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False))

    @classmethod
    def wrap_client(cls, sock: socket.socket, context: ssl.SSLContext, server_name: str) -> TlsChannel:
        sock.setblocking(False)
        return cls(context.wrap_socket(sock, server_side=False, do_handshake_on_connect=False, server_hostname=server_name))

    async def handshake(self) -> None:
        """Complete the TLS handshake; raises ssl.SSLError or ChannelBroken."""
        sock = self.sock
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(trio.lowlevel.wait_readable)
            except ssl.SSLWantWriteError:
                await self._wait(trio.lowlevel.wait_writable)
            except ssl.SSLError:
                raise
            except OSError as exc:
                raise ChannelBroken(str(exc)) from None

    async def _wait(self, wait) -> None:  # type: ignore[no-untyped-def]
        try:
            await wait(self.sock)
        except trio.ClosedResourceError:
            raise ChannelBroken("closed") from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        sock = self.sock
        while True:
            try:
                return sock.recv(max_bytes)
            except ssl.SSLWantReadError:
                if sock.pending():
                    continue  # decrypted bytes wait in OpenSSL: the socket will not wake us
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return b""
            except ssl.SSLWantWriteError:
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except (ssl.SSLError, OSError):
                return b""  # reset, or garbage on the wire: the peer is gone

    def try_receive(self, max_bytes: int = 65536) -> bytes | None:
        try:
            return self.sock.recv(max_bytes)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLError, OSError):
            return b""

    async def send(self, data: bytes | memoryview) -> None:
        sock = self.sock
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except ssl.SSLWantWriteError:
                    await self._wait(trio.lowlevel.wait_writable)
                    continue
                except ssl.SSLWantReadError:
                    await self._wait(trio.lowlevel.wait_readable)
                    continue
                except (ssl.SSLError, OSError) as exc:
                    raise ChannelBroken(str(exc)) from None
                view = view[sent:]
        finally:
            view.release()

    def send_eof(self) -> None:
        """Send close_notify (best effort, without waiting for the peer's)."""
        try:
            self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass


__all__ = [
    "INTERMEDIATE_CIPHERS",
    "SniCertConfig",
    "TlsChannel",
    "TlsError",
    "client_context",
    "peer_subject",
    "server_context",
]
