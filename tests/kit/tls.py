"""Certificates, TLS clients and TLS bytes for tests: a throwaway PKI (trustme), a real ClientHello.

``make_pki`` (and the ``pki`` fixture, imported by the modules that use it)
makes a CA and the proxy's default certificate; ``tls_block`` is a listener's
``tls`` mapping for it in a YAML config. ``tls_connect`` and
``upgrade_over_tls`` are a client over ``trio.SSLStream`` that reports a
refused handshake instead of raising.

What is not here: TLS servers (the tests start them with ``ssl`` contexts and
trio-websocket, as a real peer would).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from tests.kit.ws import UPGRADE_REQUEST


def q(path: Path | str) -> str:
    """A path as a YAML scalar (a JSON string is a valid YAML double-quoted one)."""
    return json.dumps(str(path))


def write_leaf(cert: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    """Write ``cert`` as ``stem.pem`` (leaf first, then the chain) and ``stem.key``."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


@dataclass
class Pki:
    """A server CA and the proxy's default certificate (localhost, 127.0.0.1, chat.example.com)."""

    ca: trustme.CA
    ca_pem: Path
    cert: trustme.LeafCert
    cert_pem: Path
    key_pem: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (and verifies host names)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_pki(directory: Path, stem: str = "server") -> Pki:
    ca = trustme.CA()
    ca_pem = directory / f"{stem}-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert = ca.issue_cert("localhost", "127.0.0.1", "chat.example.com")
    cert_pem, key_pem = write_leaf(cert, directory, stem)
    return Pki(ca, ca_pem, cert, cert_pem, key_pem)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fixture: ``make_pki`` in the test's ``tmp_path``."""
    return make_pki(tmp_path)


def tls_block(pki: Pki, *extra: str) -> str:
    """A listener's ``tls`` mapping with the default certificate; ``extra`` lines go inside it."""
    lines = ["tls:", f"  cert: {q(pki.cert_pem)}", f"  key: {q(pki.key_pem)}", *extra]
    return "\n".join("    " + line for line in lines)


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The bytes of a real ClientHello (made with a memory BIO, never sent anywhere else)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, hello[:16]
    return hello


async def tls_connect(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None = "localhost", *, prefix: bytes = b""
) -> trio.SSLStream[trio.SocketStream]:
    """A TCP connection to ``port`` (``prefix`` sent in the clear first), then a TLS handshake."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if prefix:
        await tcp.send_all(prefix)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def upgrade_over_tls(
    port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost", request: bytes = UPGRADE_REQUEST
) -> tuple[str, bytes]:
    """Handshake, send ``request``, read the answer: ("ok", head) or ("refused", what happened)."""
    try:
        stream = await tls_connect(port, ctx, server_hostname)
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        return "refused", _why(exc)
    buf = b""
    async with stream:
        try:
            await stream.send_all(request)
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return "refused", b"EOF after " + buf
                buf += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            return "refused", _why(exc) + b" after " + buf
        return "ok", buf


def _why(exc: BaseException) -> bytes:
    """An exception and its cause (trio wraps the ssl.SSLError in BrokenResourceError)."""
    return (repr(exc) + (f" from {exc.__cause__!r}" if exc.__cause__ else "")).encode()
