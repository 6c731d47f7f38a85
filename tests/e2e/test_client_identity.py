"""The identity of a client certificate (``listeners[].tls.client_identity``) and
Envoy's X-Forwarded-Client-Cert (``routes[].client_cert_header``), end to end.

Real TLS on loopback: the proxy's certificate from a trustme CA, client
certificates issued with ``cryptography`` by another trustme CA (trustme has
no URI subjectAltNames, which is where SPIFFE IDs live), raw backends that
record the request head they received.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kit.backends import header_values, start_holding_backend as start_recording_backend
from tests.kit.process import write_config
from tests.kit.servers import start_proxy_from
from tests.kit.tls import Pki, make_pki, q, tls_block, upgrade_over_tls
from tests.kit.wait import wait_for_log
from wsproxy.log import parse_pairs
from wsproxy.proto.client_cert import xfcc_element

SPIFFE = "spiffe://example.org/ns/chat/sa/alice"


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")


@dataclass
class Client:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    der: bytes

    def context(self, pki: Pki) -> ssl.SSLContext:
        ctx = pki.client_context()
        ctx.load_cert_chain(str(self.cert_pem), str(self.key_pem))
        return ctx


def issue_client(directory: Path, subject: list[x509.NameAttribute], sans: list[x509.GeneralName]) -> Client:
    """A client certificate for ``subject`` and ``sans``, signed by a fresh trustme CA."""
    ca = trustme.CA(organization_name="Clients")
    ca_pem = directory / "clients-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_pem, key_pem = directory / "client.pem", directory / "client.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Client(ca_pem, cert_pem, key_pem, cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture
def alice(tmp_path: Path) -> Client:
    return issue_client(
        tmp_path,
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"), x509.NameAttribute(NameOID.COMMON_NAME, "Alice Example")],
        [
            x509.RFC822Name("alice@example.org"),
            x509.DNSName("alice.clients.example"),
            x509.UniformResourceIdentifier(SPIFFE),
            x509.DNSName("second.clients.example"),
        ],
    )


def request(path: str, *headers: bytes) -> bytes:
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


def config(backend: int, pki: Pki, client: Client, *, identity: str | None = None) -> str:
    extra = [f"  client_ca: {q(client.ca_pem)}", "  client_cert: optional"]
    if identity is not None:
        extra.append(f"  client_identity: {identity}")
    return (
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\n" + tls_block(pki, *extra) + "\n"
        "  - name: plain\n    bind: 127.0.0.1:0\n"
        "routes:\n"
        "  - {path: /xfcc, pool: main, client_cert_header: X-Forwarded-Client-Cert}\n"
        "  - {path: /, pool: main}\n"
        f"pools:\n  main:\n    backends:\n      - address: 127.0.0.1:{backend}\n"
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (None, "Alice Example"),  # subject_cn is the default
        ("subject_cn", "Alice Example"),
        ("san_uri", SPIFFE),
        ("san_dns", "alice.clients.example"),  # the first DNS name
        ("san_email", "alice@example.org"),
    ],
)
async def test_the_listener_chooses_which_name_is_the_identity(
    nursery: trio.Nursery, tmp_path: Path, alice: Client, caplog: pytest.LogCaptureFixture, kind: str | None, expected: str
) -> None:
    pki = make_pki(tmp_path)
    with trio.fail_after(10):
        port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, config(port, pki, alice, identity=kind)))
        spoofed = b"X-Auth-Subject: root"
        outcome, head = await upgrade_over_tls(ports["public"], alice.context(pki), request=request("/", spoofed))
        assert outcome == "ok" and head.startswith(b"HTTP/1.1 101 "), head
        opened = await wait_for_log(caplog, "event=open")
    assert parse_pairs(opened)["identity"] == expected
    # The route has no auth: the certificate's identity goes upstream in X-Auth-Subject,
    # the client's own copy never does.
    assert header_values(recorder.last, b"x-auth-subject") == [expected.encode()]


async def test_a_certificate_without_the_chosen_name_has_no_identity(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path)
    bare = issue_client(tmp_path, [x509.NameAttribute(NameOID.COMMON_NAME, "bare")], [x509.DNSName("bare.example")])
    with trio.fail_after(10):
        port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, config(port, pki, bare, identity="san_uri")))
        outcome, head = await upgrade_over_tls(ports["public"], bare.context(pki), request=request("/"))
        assert outcome == "ok", head
        opened = await wait_for_log(caplog, "event=open")
    assert opened.endswith("identity=-"), opened
    assert header_values(recorder.last, b"x-auth-subject") == []


async def test_xfcc_in_envoys_format_and_the_clients_copy_removed(
    nursery: trio.Nursery, tmp_path: Path, alice: Client
) -> None:
    pki = make_pki(tmp_path)
    forged = b'X-Forwarded-Client-Cert: Hash=00;Subject="CN=root"'
    forged_underscore = b"X_Forwarded_Client_Cert: By=evil"
    with trio.fail_after(10):
        port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, config(port, pki, alice)))
        outcome, head = await upgrade_over_tls(ports["public"], alice.context(pki), request=request("/xfcc", forged, forged_underscore))
        assert outcome == "ok", head
        xfcc_head = recorder.last
        # Every route removes a client's copy: one without client_cert_header...
        outcome, head = await upgrade_over_tls(ports["public"], alice.context(pki), request=request("/", forged, forged_underscore))
        assert outcome == "ok", head
        other_head = recorder.last
        # ...and the same route reached without a client certificate, or over plain TCP.
        outcome, head = await upgrade_over_tls(ports["public"], pki.client_context(), request=request("/xfcc", forged))
        assert outcome == "ok", head
        anonymous_head = recorder.last
        stream = await trio.open_tcp_stream("127.0.0.1", ports["plain"])
        async with stream:
            await stream.send_all(request("/xfcc", forged))
            with trio.fail_after(5):
                while len(recorder.heads) < 4:
                    await trio.sleep(0.01)
        plain_head = recorder.last
    digest = hashlib.sha256(alice.der).hexdigest()
    expected = (
        f'Hash={digest};Subject="CN=Alice Example,O=Example Org";URI={SPIFFE};'
        "DNS=alice.clients.example;DNS=second.clients.example"
    ).encode()
    assert header_values(xfcc_head, b"x-forwarded-client-cert") == [expected]
    for head in (xfcc_head, other_head, anonymous_head, plain_head):
        assert b"evil" not in head and b"CN=root" not in head, head
    for head in (other_head, anonymous_head, plain_head):
        assert header_values(head, b"x-forwarded-client-cert") == [], head


def test_xfcc_quotes_and_escapes_values(tmp_path: Path) -> None:
    """Envoy: the Subject is always double-quoted; other values when they hold , ; = or
    a quote; a quote (and a backslash) inside is escaped with a backslash."""
    odd = issue_client(
        tmp_path,
        [x509.NameAttribute(NameOID.COMMON_NAME, 'Bob "the builder", Jr')],
        [x509.UniformResourceIdentifier("https://example.org/a;b=c"), x509.DNSName("plain.example")],
    )
    value = xfcc_element(odd.der).decode()
    digest = hashlib.sha256(odd.der).hexdigest()
    # RFC 4514 escapes the quotes and the comma in the CN (\" and \,); XFCC then escapes each backslash and quote.
    assert value == (
        f'Hash={digest};Subject="CN=Bob \\\\\\"the builder\\\\\\"\\\\, Jr";URI="https://example.org/a;b=c";DNS=plain.example'
    )
