"""TLS channels: a TLS connection for the relay, and the client handshake towards wss:// backends.

The ``SSLContext`` objects come from ``edge.contexts`` (built from the
config's TLS settings and checked before a config is used); this module
drives connections with them.

``TlsChannel`` is a ``RawChannel`` with an ``ssl.SSLObject`` between memory
BIOs: the socket is driven like a plain one (a task parks only when the kernel
has nothing for it), OpenSSL works on memory. Unlike ``trio.SSLStream`` there
is no scheduler pass per call; unlike a non-blocking ``SSLSocket`` there are
no per-record reads and no bytes hidden in OpenSSL from readiness waits.

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

import socket
import ssl

import trio

from ..config.schema import Address, PoolConfig
from ..errors import WsproxyError
from .channel import ChannelBroken, RawChannel

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
    "TlsChannel",
    "TlsHandshakeFailed",
    "backend_server_name",
    "peer_subject",
    "start_client_tls",
]
