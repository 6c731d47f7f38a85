"""Certificates and TLS bytes for tests: a throwaway PKI (trustme) and a real ClientHello.

What is not here: TLS clients and servers (the tests open them with ``ssl``
and ``trio.SSLStream``, as a real peer would).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


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
