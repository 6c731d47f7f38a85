"""TLS pieces of the benchmark: test certificates, SSL contexts, and a memory-BIO TLS layer.

    python bench/tlsutil.py DIR          # writes DIR/{ec,rsa}.{crt,key,pem} and prints them

Certificates: self-signed, for DNS:localhost and IP:127.0.0.1, valid 30 days; ECDSA P-256
(``ec``) and RSA 2048 (``rsa``); ``*.pem`` = certificate + key in one file (haproxy's ``crt``).
Made with the ``openssl`` CLI when it is on PATH, else with ``cryptography`` when importable.

``TlsLayer`` is what echo server and load generator use on a non-blocking socket: an
``ssl.SSLObject`` between two ``MemoryBIO``s. The caller does the socket I/O itself (one
256 KiB ``recv`` for many TLS records, output through the same ``OutBuffer`` as plain data)
and passes ciphertext in and out; that keeps the plain and TLS paths of the epoll loops the
same, and it measured cheaper than a non-blocking ``ssl.SSLSocket`` here (bench/README.md,
"TLS workloads").

The client context verifies nothing (CERT_NONE, no host name check): verification would cost
only the client, which is already the bottleneck of handshake rates. No session is ever
reused (every connection starts from a new ``SSLObject`` with no session) and the client
asks for no tickets (``OP_NO_TICKET``). The server context mirrors wsproxy's listener
(TLS 1.2 minimum, Mozilla intermediate ciphers for 1.2, ALPN http/1.1, no tickets), so the
direct TLS baseline does the same cryptographic work per handshake as the proxy.
"""

from __future__ import annotations

import datetime
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

#: certificate kinds: name -> openssl ``req -newkey`` arguments
CERT_KINDS = {
    "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-newkey", "rsa:2048"],
}
SERVER_NAME = "localhost"  # the SNI the load generator sends
READ_SIZE = 65536  # per SSLObject.read; a TLS record holds at most 16 KiB of plaintext

#: Mozilla "intermediate" TLS 1.2 suites, as wsproxy's listeners use them
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))


# ---------------------------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------------------------


def make_certs(directory: Path, use_openssl: bool | None = None) -> tuple[dict[str, tuple[Path, Path]], str]:
    """Write ``{ec,rsa}.{crt,key,pem}`` into ``directory``.

    Returns ({kind: (cert, key)}, how they were made). Raises RuntimeError when neither the
    openssl CLI nor the cryptography package is available, or when generation fails.
    """
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if use_openssl is None:
        use_openssl = openssl is not None
    out: dict[str, tuple[Path, Path]] = {}
    for kind in CERT_KINDS:
        crt, key = directory / f"{kind}.crt", directory / f"{kind}.key"
        if use_openssl:
            _openssl_cert(openssl or "openssl", kind, crt, key)
        else:
            _cryptography_cert(kind, crt, key)
        key.chmod(0o600)
        pem = directory / f"{kind}.pem"
        pem.write_bytes(crt.read_bytes() + key.read_bytes())
        pem.chmod(0o600)
        out[kind] = (crt, key)
    how = "openssl CLI" if use_openssl else "cryptography package"
    return out, how


def _openssl_cert(openssl: str, kind: str, crt: Path, key: Path) -> None:
    argv = [openssl, "req", "-x509", *CERT_KINDS[kind], "-nodes", "-sha256", "-days", "30",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(crt)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not crt.exists() or not key.exists():
        raise RuntimeError(f"openssl req failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def _cryptography_cert(kind: str, crt: Path, key: Path) -> None:
    try:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise RuntimeError("cannot make test certificates: no openssl CLI on PATH and "
                           "the cryptography package is not importable") from None
    private = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


# ---------------------------------------------------------------------------------------------
# contexts
# ---------------------------------------------------------------------------------------------


def client_context() -> ssl.SSLContext:
    """The load generator's context: no verification, no tickets, OpenSSL defaults otherwise."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The TLS echo server's context: the same policy as a wsproxy TLS listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.num_tickets = 0
    ctx.load_cert_chain(cert, key)
    return ctx


# ---------------------------------------------------------------------------------------------
# the TLS layer of one connection
# ---------------------------------------------------------------------------------------------


class TlsLayer:
    """TLS state of one connection over memory BIOs; the caller moves the ciphertext.

    ``handshake(raw)`` and ``decrypt(raw)`` take ciphertext received from the socket;
    ``encrypt(data)`` returns ciphertext to send. ``ssl.SSLError`` means a broken peer.
    """

    __slots__ = ("obj", "inc", "out")

    def __init__(self, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side,
                                server_hostname=None if server_side else SERVER_NAME)

    def handshake(self, raw: bytes) -> tuple[bool, bytes]:
        """Feed ``raw``; return (handshake complete, ciphertext to send now)."""
        if raw:
            self.inc.write(raw)
        try:
            self.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        return done, self.out.read()

    def decrypt(self, raw: bytes) -> tuple[bytes, bool]:
        """Feed ``raw``; return (all plaintext now available, the peer sent close_notify).

        Reads record by record until the incoming BIO is empty, so the common case raises no
        exception; an incomplete record left in OpenSSL waits for the next ``raw``.
        """
        inc, obj = self.inc, self.obj
        if raw:
            inc.write(raw)
        parts: list[bytes] = []
        eof = False
        while inc.pending or obj.pending():
            try:
                data = obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            if not data:  # close_notify
                eof = True
                break
            parts.append(data)
        if len(parts) == 1:
            return parts[0], eof
        return b"".join(parts), eof

    def encrypt(self, data: bytes | memoryview) -> bytes:
        self.obj.write(data)
        return self.out.read()

    def close_notify(self) -> bytes:
        """Ciphertext of our close_notify alert (we do not wait for the peer's)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        return self.out.read()

    def describe(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384`` (after the handshake)."""
        cipher = self.obj.cipher()
        return f"{self.obj.version()} {cipher[0] if cipher else '?'}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python bench/tlsutil.py DIR", file=sys.stderr)
        return 2
    certs, how = make_certs(Path(args[0]))
    for kind, (crt, key) in certs.items():
        print(f"{kind}: {crt} {key} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
