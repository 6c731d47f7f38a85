"""End-to-end tests of TLS: termination on listeners, SNI, mTLS, wss:// backends.

Certificates are made in the test (trustme, and ``cryptography`` for an
expired one) and written to ``tmp_path``; configs are YAML files loaded with
``load_checked``, so the loader and the certificate checks run too; the proxy
runs in-process (``App.serve``) on 127.0.0.1. Clients are trio-websocket, the
``websockets`` sync client in a thread, and raw ``ssl`` clients where a test
needs to see the handshake itself. Backends are real trio-websocket servers
(plain or TLS) or raw recorders that keep every request head they receive.

The helpers other modules share (the ``pki`` fixture, ``tls_block``,
``upgrade_over_tls``, ``simple_config``) are in ``tests.kit.tls`` and
``tests.kit.servers``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url, serve_websocket, wrap_server_stream

from tests.kit.backends import header_values, start_holding_backend as start_recording_backend
from tests.kit.process import write_config
from tests.kit.servers import echo_handler, simple_config, start_proxy_from, start_ws_backend, status_of, websockets_backend
from tests.kit.tls import (  # noqa: F401 (pki is a fixture)
    Pki,
    client_hello,
    make_pki,
    pki,
    q,
    tls_block,
    tls_connect,
    upgrade_over_tls,
    write_leaf,
)
from tests.kit.wait import SLACK_S, wait_for_log
from tests.kit.ws import UPGRADE_REQUEST, read_head, read_until_eof
from wsproxy.app import App
from wsproxy.edge.contexts import load_checked
from wsproxy.errors import ConfigErrors
from wsproxy.log import parse_pairs


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    """Keep the proxy's INFO lines: some tests assert on them, every failure shows them."""
    caplog.set_level(logging.INFO, logger="wsproxy")


# --- backends ----------------------------------------------------------------------


async def start_tls_ws_backend(nursery: trio.Nursery, cert: trustme.LeafCert) -> int:
    """A trio-websocket echo server over TLS with ``cert``; returns its port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = await nursery.start(serve_websocket, echo_handler, "127.0.0.1", 0, ctx)
    return int(server.port)


# --- clients ---------------------------------------------------------------------------------


def echo_roundtrip_sync(url: str, ctx: ssl.SSLContext, text: str) -> str:
    """The ``websockets`` sync client, for ``trio.to_thread``: send ``text``, return the echo."""
    from websockets.sync.client import connect

    with connect(url, ssl=ctx, open_timeout=5, close_timeout=2, proxy=None) as ws:
        ws.send(text)
        answer = ws.recv(timeout=5)
        assert isinstance(answer, str)
        return answer


def san_of(stream: trio.SSLStream[trio.SocketStream]) -> set[str]:
    """The DNS names and IP addresses in the served certificate's subjectAltName."""
    cert = stream.getpeercert()
    assert cert, "no verified peer certificate"
    return {value for _kind, value in cert.get("subjectAltName", ())}


# === 1. termination ================================================================================


async def test_wss_through_the_proxy_with_trio_websocket_and_websockets(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(15):
        echo_port = await start_ws_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([echo_port], listener=tls_block(pki))))
        url = f"wss://localhost:{ports['public']}/chat"
        async with open_websocket_url(url, ssl_context=pki.client_context()) as ws:
            await ws.send_message("hello over TLS")
            assert await ws.get_message() == "hello over TLS"
            await ws.send_message(b"\x00\xffbinary")
            assert await ws.get_message() == b"\x00\xffbinary"
        echoed = await trio.to_thread.run_sync(echo_roundtrip_sync, url, pki.client_context(), "from a thread")
        assert echoed == "from a thread"


async def test_tls_version_is_1_2_or_later_and_alpn_is_http_1_1(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([rec_port], listener=tls_block(pki))))
        for offered in (["h2", "http/1.1"], ["http/1.1"]):
            ctx = pki.client_context()
            ctx.set_alpn_protocols(offered)
            stream = await tls_connect(ports["public"], ctx)
            async with stream:
                assert stream.version() in ("TLSv1.2", "TLSv1.3")
                assert stream.selected_alpn_protocol() == "http/1.1"
        # A client pinned to TLS 1.2 (and no later) gets through with an intermediate suite.
        ctx = pki.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        stream = await tls_connect(ports["public"], ctx)
        async with stream:
            assert stream.version() == "TLSv1.2"
            cipher = stream.cipher()
            assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0]), cipher
            await stream.send_all(UPGRADE_REQUEST)
            assert (await read_head(stream)).startswith(b"HTTP/1.1 101 ")
        assert len(recorder.heads) == 1


async def test_a_tls_1_1_client_is_refused(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([rec_port], listener=tls_block(pki))))
        ctx = pki.client_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1 at all
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        outcome, what = await upgrade_over_tls(ports["public"], ctx)
        assert outcome == "refused", what
        # The server said no (a protocol_version alert), not our own client.
        assert b"PROTOCOL_VERSION" in what.upper(), what
        await wait_for_log(caplog, "event=tls_failed", "UNSUPPORTED_PROTOCOL")
        assert recorder.connections == 0


# === 2. SNI =======================================================================================


@pytest.fixture
def sni_certs(tmp_path: Path, pki: Pki) -> dict[str, tuple[Path, Path, set[str]]]:
    """Certificates of the same CA for SNI entries, with the SAN each one carries."""
    made = {}
    for stem, names in {
        "chat": ("chat.example.com", "*.chat.example.com"),
        "exact": ("exact.chat.example.com",),
    }.items():
        cert = pki.ca.issue_cert(*names)
        cert_pem, key_pem = write_leaf(cert, tmp_path, stem)
        made[stem] = (cert_pem, key_pem, set(names))
    return made


async def test_sni_chooses_the_certificate(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, sni_certs: dict[str, tuple[Path, Path, set[str]]]
) -> None:
    chat_pem, chat_key, chat_names = sni_certs["chat"]
    exact_pem, exact_key, exact_names = sni_certs["exact"]
    # The wildcard entry comes first, yet the exact name of the second wins for its name.
    listener = tls_block(
        pki,
        "  sni:",
        '    - names: ["chat.example.com", "*.chat.example.com"]',
        f"      cert: {q(chat_pem)}",
        f"      key: {q(chat_key)}",
        '    - names: ["EXACT.chat.example.com"]',
        f"      cert: {q(exact_pem)}",
        f"      key: {q(exact_key)}",
    )
    default_names = {"localhost", "127.0.0.1", "chat.example.com"}
    expected = {
        "localhost": default_names,
        "chat.example.com": chat_names,  # the SNI entry, not the default that also names it
        "a.chat.example.com": chat_names,
        "B.Chat.Example.COM": chat_names,  # server names compare without case
        "exact.chat.example.com": exact_names,
        "example.com": default_names,  # nothing matches: the default
        # RFC 6125 §6.4.3: the wildcard covers exactly one label (issue 17 item 8).
        "a.b.chat.example.com": default_names,
        None: default_names,  # no SNI at all
    }
    with trio.fail_after(15):
        rec_port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([rec_port], listener=listener)))
        served = {}
        for name in expected:
            ctx = pki.client_context()
            ctx.check_hostname = False  # verified against the CA; the name is compared below
            stream = await tls_connect(ports["public"], ctx, name)
            async with stream:
                served[name] = san_of(stream)
                if name == "a.chat.example.com":  # a session on an SNI certificate works
                    await stream.send_all(UPGRADE_REQUEST)
                    assert (await read_head(stream)).startswith(b"HTTP/1.1 101 ")
        assert served == expected
        assert len(recorder.heads) == 1


# === 3. mTLS ======================================================================================


@dataclass
class ClientPki:
    ca_pem: Path
    alice: trustme.LeafCert  # from the client CA
    mallory: trustme.LeafCert  # same names, from another CA


@pytest.fixture
def client_pki(tmp_path: Path) -> ClientPki:
    client_ca = trustme.CA(organization_name="Clients")
    ca_pem = tmp_path / "clients-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_pem))
    alice = client_ca.issue_cert("alice.clients.example", common_name="alice")
    mallory = trustme.CA().issue_cert("alice.clients.example", common_name="alice")
    return ClientPki(ca_pem, alice, mallory)


def mtls_listener(pki: Pki, client_pki: ClientPki, mode: str) -> str:
    return tls_block(pki, f"  client_ca: {q(client_pki.ca_pem)}", f"  client_cert: {mode}")


async def test_mtls_required_accepts_a_client_certificate_and_logs_its_identity(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, client_pki: ClientPki, caplog: pytest.LogCaptureFixture
) -> None:
    """The identity is the subject's common name by default (``tls.client_identity: subject_cn``)."""
    with trio.fail_after(10):
        echo_port = await start_ws_backend(nursery)
        config = simple_config([echo_port], listener=mtls_listener(pki, client_pki, "required"))
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        ctx = pki.client_context()
        client_pki.alice.configure_cert(ctx)
        async with open_websocket_url(f"wss://localhost:{ports['public']}/", ssl_context=ctx) as ws:
            await ws.send_message("it is me")
            assert await ws.get_message() == "it is me"
        opened = await wait_for_log(caplog, "event=open")
        closed = await wait_for_log(caplog, "event=close")
    for line in (opened, closed):
        assert parse_pairs(line).get("identity") == "alice", line


def key_values(line: str) -> list[tuple[str, str]]:
    """A key=value log line read the way log tools read it: values end at whitespace
    unless they are quoted (as the proxy's reason='...' values are)."""
    return re.findall(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""", line)


async def test_a_client_identity_with_spaces_stays_one_log_value(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, client_pki: ClientPki, caplog: pytest.LogCaptureFixture
) -> None:
    """Names often hold spaces ("Bob Example"). Logged bare, such a value ends
    at its first space for every key=value reader (wsproxy's own convention: values
    that may hold spaces are written with %r), and the rest reads as other keys:
    "identity=Bob Example by=proxy" gains a key "by" that no one logged."""
    client_ca = trustme.CA()
    ca_pem = tmp_path / "spaced-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_pem))
    bob = client_ca.issue_cert(
        "bob.clients.example", common_name="Bob Example by=proxy", organization_name="Example Inc"
    )
    with trio.fail_after(10):
        echo_port = await start_ws_backend(nursery)
        listener = tls_block(pki, f"  client_ca: {q(ca_pem)}", "  client_cert: required")
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([echo_port], listener=listener)))
        ctx = pki.client_context()
        bob.configure_cert(ctx)
        async with open_websocket_url(f"wss://localhost:{ports['public']}/", ssl_context=ctx) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
        opened = await wait_for_log(caplog, "event=open")
        closed = await wait_for_log(caplog, "event=close")
    open_keys = [key for key, _ in key_values(opened)]
    assert open_keys == ["event", "conn", "peer", "route", "pool", "backend", "sticky", "identity"], opened
    close_keys = [key for key, _ in key_values(closed)]
    assert len(close_keys) == len(set(close_keys)), f"the subject spilled into other keys: {closed}"
    for line in (opened, closed):
        identity = dict(key_values(line))["identity"].strip("'\"")
        assert identity == "Bob Example by=proxy", line


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA"])
async def test_mtls_required_refuses_other_clients(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    client_pki: ClientPki,
    caplog: pytest.LogCaptureFixture,
    client: str,
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        config = simple_config([rec_port], listener=mtls_listener(pki, client_pki, "required"))
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        ctx = pki.client_context()
        if client != "no certificate":
            client_pki.mallory.configure_cert(ctx)
        outcome, what = await upgrade_over_tls(ports["public"], ctx)
        assert outcome == "refused", what
        assert b"HTTP/" not in what
        await wait_for_log(caplog, "event=tls_failed")
        await trio.sleep(0.1)
        assert recorder.connections == 0


async def test_mtls_optional_accepts_a_client_without_a_certificate(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, client_pki: ClientPki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        config = simple_config([rec_port], listener=mtls_listener(pki, client_pki, "optional"))
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        outcome, head = await upgrade_over_tls(ports["public"], pki.client_context())
        assert outcome == "ok" and head.startswith(b"HTTP/1.1 101 "), head
        opened = await wait_for_log(caplog, "event=open")
        assert opened.endswith("identity=-"), opened
        # With a certificate, the same listener knows who it is.
        ctx = pki.client_context()
        client_pki.alice.configure_cert(ctx)
        outcome, head = await upgrade_over_tls(ports["public"], ctx)
        assert outcome == "ok" and head.startswith(b"HTTP/1.1 101 "), head
        await wait_for_log(caplog, "event=open", "identity=alice")
        assert len(recorder.heads) == 2


# === 4. slow and wrong clients ===================================================================


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
async def test_a_stalled_tls_handshake_is_closed_within_the_handshake_timeout(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, sent: str
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        config = simple_config([rec_port], listener=tls_block(pki), handshake="500ms")
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            start = trio.current_time()
            if sent != "nothing":
                hello = client_hello()
                await stream.send_all(hello[: len(hello) // 2])
            raw = await read_until_eof(stream)
            elapsed = trio.current_time() - start
        assert raw == b""
        assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
        await wait_for_log(caplog, "event=tls_failed")
        assert recorder.connections == 0
        # The listener still serves.
        outcome, head = await upgrade_over_tls(ports["public"], pki.client_context())
        assert outcome == "ok" and head.startswith(b"HTTP/1.1 101 "), head


async def test_the_tls_handshake_counts_inside_the_handshake_timeout(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """One deadline from accept: a client that waits 0.45 s before its ClientHello has
    only what is left of the 0.6 s for its request (408 or a close at ~0.6 s, not ~1.05 s)."""
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        config = simple_config([rec_port], listener=tls_block(pki), handshake="600ms")
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        tcp = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        start = trio.current_time()
        await trio.sleep(0.45)
        stream = trio.SSLStream(tcp, pki.client_context(), server_hostname="localhost")
        async with stream:
            await stream.do_handshake()
            await stream.send_all(UPGRADE_REQUEST[:30])
            raw = await read_until_eof(stream)
            elapsed = trio.current_time() - start
        assert raw == b"" or status_of(raw) == 408, raw
        assert 0.55 <= elapsed <= 0.6 + 0.35, elapsed
        assert recorder.connections == 0


async def test_plain_http_on_the_tls_port_gets_no_response(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([rec_port], listener=tls_block(pki))))
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            await stream.send_all(UPGRADE_REQUEST)
            with trio.fail_after(3):
                raw = await read_until_eof(stream)
        # At most a TLS alert record (content type 21), never HTTP.
        assert raw == b"" or raw[:1] == b"\x15", raw
        assert b"HTTP/" not in raw and b"101" not in raw
        await wait_for_log(caplog, "event=tls_failed")
        assert recorder.connections == 0


# === 5. config errors =============================================================================


def write_expired_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost that expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = directory / "expired.pem", directory / "expired.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_pem, key_pem


def _bad_tls(tmp_path: Path, pki: Pki, case: str) -> tuple[str, str, str]:
    """(listener or pool YAML, the file the message must name, a regex for the reason)."""

    def listener(cert: Path, key: Path, *extra: str) -> str:
        return "\n".join(["    tls:", f"      cert: {q(cert)}", f"      key: {q(key)}", *extra])

    if case == "expired certificate":
        cert, key = write_expired_cert(tmp_path)
        return listener(cert, key), cert.name, r"expired"
    if case == "key of another certificate":
        other = pki.ca.issue_cert("localhost")
        _, other_key = write_leaf(other, tmp_path, "other")
        return listener(pki.cert_pem, other_key), other_key.name, r"does not match|mismatch"
    if case == "missing certificate":
        return listener(tmp_path / "nope.pem", pki.key_pem), "nope.pem", r"No such file"
    if case == "missing key":
        return listener(pki.cert_pem, tmp_path / "nope.key"), "nope.key", r"No such file"
    if case == "not a certificate":
        junk = tmp_path / "junk.pem"
        junk.write_text("hello, I am not PEM\n")
        return listener(junk, pki.key_pem), "junk.pem", r"not a PEM certificate"
    if case == "missing client CA":
        extra: tuple[str, ...] = (f"      client_ca: {q(tmp_path / 'no-clients-ca.pem')}", "      client_cert: required")
        return listener(pki.cert_pem, pki.key_pem, *extra), "no-clients-ca.pem", r"No such file"
    if case == "expired SNI certificate":
        cert, key = write_expired_cert(tmp_path)
        extra = ("      sni:", '        - names: ["chat.example.com"]', f"          cert: {q(cert)}", f"          key: {q(key)}")
        return listener(pki.cert_pem, pki.key_pem, *extra), cert.name, r"expired"
    if case == "missing SNI key":
        extra = (
            "      sni:",
            '        - names: ["chat.example.com"]',
            f"          cert: {q(pki.cert_pem)}",
            f"          key: {q(tmp_path / 'sni-missing.key')}",
        )
        return listener(pki.cert_pem, pki.key_pem, *extra), "sni-missing.key", r"No such file"
    raise AssertionError(case)


TLS_CONFIG_ERRORS = [
    "expired certificate",
    "key of another certificate",
    "missing certificate",
    "missing key",
    "not a certificate",
    "missing client CA",
    "expired SNI certificate",
    "missing SNI key",
]


@pytest.mark.parametrize("case", TLS_CONFIG_ERRORS)
def test_a_bad_listener_certificate_is_a_config_error_with_file_and_reason(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    listener, file_name, reason = _bad_tls(tmp_path, pki, case)
    path = write_config(tmp_path, simple_config([9001], listener=listener))
    with pytest.raises(ConfigErrors) as info:
        load_checked(str(path))
    message = str(info.value)
    assert file_name in message, message
    assert re.search(reason, message, re.IGNORECASE), message
    assert message.startswith(f"{path}:"), message  # positioned in the config file
    assert "listeners[0].tls" in message, message


@pytest.mark.parametrize("case", ["missing CA", "not a CA bundle", "cert without key"])
def test_a_bad_backend_tls_mapping_is_a_config_error(tmp_path: Path, pki: Pki, case: str) -> None:
    if case == "missing CA":
        pool, file_name, reason = f"    tls:\n      ca: {q(tmp_path / 'no-ca.pem')}", "no-ca.pem", r"No such file"
    elif case == "not a CA bundle":
        junk = tmp_path / "junk-ca.pem"
        junk.write_text("not a CA\n")
        pool, file_name, reason = f"    tls:\n      ca: {q(junk)}", "junk-ca.pem", r"not a usable PEM CA bundle"
    else:
        pool, file_name, reason = f"    tls:\n      cert: {q(pki.cert_pem)}", "", r"cert and key go together"
    path = write_config(tmp_path, simple_config([9001], pool=pool))
    with pytest.raises(ConfigErrors) as info:
        load_checked(str(path))
    message = str(info.value)
    assert file_name in message and re.search(reason, message), message
    assert "pools.main.tls" in message, message


# === 6. wss:// backends ===========================================================================


@pytest.fixture
def backend_pki(tmp_path: Path) -> Pki:
    """The backends' own CA, distinct from the proxy's."""
    return make_pki(tmp_path, "backend")


def tls_backend_config(port: int, pool_tls: str, *, scheme: str = "", listener: str = "") -> str:
    text = simple_config([port], pool=pool_tls, listener=listener)
    return text.replace(f"address: 127.0.0.1:{port}", f'address: "{scheme}127.0.0.1:{port}"')


WORKING_BACKEND_TLS = {
    "pool tls with ca": ("", "    tls:\n      ca: {ca}"),
    "wss:// address with ca and server_name": ("wss://", "    tls:\n      ca: {ca}\n      server_name: localhost"),
}


@pytest.mark.parametrize(("scheme", "pool_tls"), list(WORKING_BACKEND_TLS.values()), ids=list(WORKING_BACKEND_TLS))
async def test_sessions_work_through_to_a_wss_backend(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, backend_pki: Pki, scheme: str, pool_tls: str
) -> None:
    with trio.fail_after(10):
        backend_port = await start_tls_ws_backend(nursery, backend_pki.cert)
        config = tls_backend_config(
            backend_port, pool_tls.format(ca=q(backend_pki.ca_pem)), scheme=scheme, listener=tls_block(pki)
        )
        ports = await start_proxy_from(nursery, write_config(tmp_path, config))
        async with open_websocket_url(f"wss://localhost:{ports['public']}/", ssl_context=pki.client_context()) as ws:
            for text in ("one", "two" * 1000):
                await ws.send_message(text)
                assert await ws.get_message() == text


async def start_mtls_ws_backend(nursery: trio.Nursery, cert: trustme.LeafCert, client_ca: trustme.CA) -> int:
    """A TLS echo backend that requires a client certificate from ``client_ca`` and
    hangs up at once when the handshake fails (as TLS servers do)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    client_ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def handler(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tcp)
            return
        async with trio.open_nursery() as connection:
            await echo_handler(await wrap_server_stream(connection, stream))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@pytest.mark.parametrize("with_cert", [True, False], ids=["proxy presents its cert", "no proxy cert"])
async def test_mtls_towards_a_backend(
    nursery: trio.Nursery, tmp_path: Path, backend_pki: Pki, caplog: pytest.LogCaptureFixture, with_cert: bool
) -> None:
    proxy_ca = trustme.CA()
    proxy_cert, proxy_key = write_leaf(proxy_ca.issue_cert("wsproxy.internal", common_name="wsproxy"), tmp_path, "proxy-client")
    pool = f"    tls:\n      ca: {q(backend_pki.ca_pem)}\n      server_name: localhost"
    if with_cert:
        pool += f"\n      cert: {q(proxy_cert)}\n      key: {q(proxy_key)}"
    with trio.fail_after(10):
        backend_port = await start_mtls_ws_backend(nursery, backend_pki.cert, proxy_ca)
        ports = await start_proxy_from(nursery, write_config(tmp_path, tls_backend_config(backend_port, pool)))
        if with_cert:
            async with open_websocket_url(f"ws://127.0.0.1:{ports['public']}/") as ws:
                await ws.send_message("mutual")
                assert await ws.get_message() == "mutual"
            return
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            await stream.send_all(UPGRADE_REQUEST)
            raw = await read_until_eof(stream)
        assert status_of(raw) == 502, raw
        await wait_for_log(caplog, "event=upstream_failed", "backend=127.0.0.1:")


async def test_a_backend_that_requires_a_client_certificate_the_pool_lacks_is_502_with_the_tls_reason(
    nursery: trio.Nursery, tmp_path: Path, backend_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend whose TLS stack sends its alert, as servers do (the ``websockets``
    server on Python's ssl module here; the trio backend above hangs up without one)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_pki.cert.configure_cert(ctx)
    trustme.CA().configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    pool = f"    tls:\n      ca: {q(backend_pki.ca_pem)}\n      server_name: localhost"
    with trio.fail_after(10), websockets_backend(lambda ws: None, ssl=ctx) as backend_port:
        ports = await start_proxy_from(nursery, write_config(tmp_path, tls_backend_config(backend_port, pool)))
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            await stream.send_all(UPGRADE_REQUEST)
            raw = await read_until_eof(stream)
        assert status_of(raw) == 502, raw
        line = await wait_for_log(caplog, "event=upstream_failed", "backend=127.0.0.1:")
    # TLS 1.3: the client's handshake completes before the server checks its certificate,
    # whose absence arrives as an alert on the first read. The log says so (issue 17 item 8),
    # not "closed without answering the upgrade".
    assert "CERTIFICATE_REQUIRED" in line and "without answering" not in line, line
    assert "requires a client certificate" in line, line


FAILING_BACKEND_TLS = {
    "wrong CA": ("", "    tls:\n      ca: {wrong_ca}", "unable to get local issuer certificate"),
    "server_name mismatch": ("wss://", "    tls:\n      ca: {ca}\n      server_name: other.example", "other.example"),
    "default trust store": ("wss://", "", "unable to get local issuer certificate"),
}


@pytest.mark.parametrize(
    ("scheme", "pool_tls", "why"), list(FAILING_BACKEND_TLS.values()), ids=list(FAILING_BACKEND_TLS)
)


async def test_a_backend_that_fails_verification_is_502_with_the_reason_logged(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    backend_pki: Pki,
    caplog: pytest.LogCaptureFixture,
    scheme: str,
    pool_tls: str,
    why: str,
) -> None:
    with trio.fail_after(10):
        backend_port = await start_tls_ws_backend(nursery, backend_pki.cert)
        pool = pool_tls.format(ca=q(backend_pki.ca_pem), wrong_ca=q(pki.ca_pem))
        ports = await start_proxy_from(nursery, write_config(tmp_path, tls_backend_config(backend_port, pool, scheme=scheme)))
        stream = await trio.open_tcp_stream("127.0.0.1", ports["public"])
        async with stream:
            await stream.send_all(UPGRADE_REQUEST)
            raw = await read_until_eof(stream)
        assert status_of(raw) == 502, raw
        line = await wait_for_log(caplog, "event=upstream_failed", "TLS verification failed")
        assert why in line, line
        await wait_for_log(caplog, "event=refused", "status=502")


# === 7. what the backend and the client learn on a TLS listener ========================================


async def test_forwarding_headers_say_https_on_a_tls_listener(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([rec_port], listener=tls_block(pki))))
        outcome, head = await upgrade_over_tls(ports["public"], pki.client_context())
        assert outcome == "ok" and head.startswith(b"HTTP/1.1 101 "), head
    upstream = recorder.last
    assert header_values(upstream, b"x-forwarded-proto") == [b"https"]
    assert header_values(upstream, b"x-forwarded-for") == [b"127.0.0.1"]
    (forwarded,) = header_values(upstream, b"forwarded")
    assert b"proto=https" in forwarded and b"for=127.0.0.1" in forwarded, forwarded


async def test_sticky_cookie_is_secure_on_tls_listeners_only(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    secret = tmp_path / "cookie.key"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    pool = "\n".join(
        [
            "    sticky:",
            '      key: "cookie:wsp_main"',
            "      cookie:",
            f"        secret_file: {q(secret)}",
        ]
    )
    with trio.fail_after(10):
        rec_port, _ = await start_recording_backend(nursery)
        text = simple_config([rec_port], listener=tls_block(pki), pool=pool)
        text = text.replace("routes:", "  - name: plain\n    bind: 127.0.0.1:0\nroutes:", 1)
        ports = await start_proxy_from(nursery, write_config(tmp_path, text))
        outcome, tls_head = await upgrade_over_tls(ports["public"], pki.client_context())
        assert outcome == "ok", tls_head
        plain = await trio.open_tcp_stream("127.0.0.1", ports["plain"])
        async with plain:
            await plain.send_all(UPGRADE_REQUEST)
            plain_head = await read_head(plain)
    (tls_cookie,) = header_values(tls_head, b"set-cookie")
    (plain_cookie,) = header_values(plain_head, b"set-cookie")
    tls_attributes = [a.strip().lower() for a in tls_cookie.split(b";")]
    plain_attributes = [a.strip().lower() for a in plain_cookie.split(b";")]
    assert tls_cookie.startswith(b"wsp_main=") and b"secure" in tls_attributes, tls_cookie
    assert plain_cookie.startswith(b"wsp_main=") and b"secure" not in plain_attributes, plain_cookie


# === 5. TLS relayed by the epoll engine ==============================================================
# The engine moves ciphertext itself (edge/engine.py); the same tests run with the trio pumps
# (WSPROXY_RELAY=trio), which must behave the same.


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (masked), any length."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("driver", ["engine", "trio"])
async def test_tls_on_both_sides_with_back_pressure_keeps_every_byte(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, backend_pki: Pki, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """A burst of messages up to 1 MB each way, 3 MB in flight (many records, partial sends, back-pressure),
    wss:// client → TLS listener → TLS backend; everything comes back intact and in order."""
    from wsproxy.edge.engine import EngineRelay

    monkeypatch.setenv("WSPROXY_RELAY", driver)
    sizes = [0, 1, 125, 126, 16383, 16384, 16385, 65535, 65536, 1_000_000, 1_000_000, 999_999, 7]  # the echo backend takes up to 1 MiB
    with trio.fail_after(30):
        backend_port = await start_tls_ws_backend(nursery, backend_pki.cert)
        config = tls_backend_config(backend_port, f"    tls:\n      ca: {q(backend_pki.ca_pem)}", listener=tls_block(pki))
        app = App(load_checked(str(write_config(tmp_path, config))))
        port = (await nursery.start(app.serve))["public"][0][1]
        async with open_websocket_url(
            f"wss://localhost:{port}/", ssl_context=pki.client_context(), max_message_size=4_000_000
        ) as ws:
            messages = [bytes([n % 251]) * n for n in sizes]
            for message in messages:
                await ws.send_message(message)
            for message in messages:
                assert await ws.get_message() == message
            [session] = app.sessions.values()
            assert isinstance(session.relay, EngineRelay) is (driver == "engine")


class MemoryTlsClient:
    """A TLS client on a memory BIO over a trio socket, so a test decides which records
    travel in which TCP segment."""

    def __init__(self, sock: trio.socket.SocketType, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> MemoryTlsClient:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        client = cls(sock, ctx)
        while True:
            try:
                client.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client.flush()
                data = await sock.recv(65536)
                assert data, "closed during the handshake"
                client.incoming.write(data)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.outgoing.read()
        while data:
            sent = await self.sock.send(data)
            data = data[sent:]

    async def receive(self) -> bytes:
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                data = await self.sock.recv(65536)
                assert data, "closed by the proxy"
                self.incoming.write(data)


async def test_a_frame_in_the_same_tcp_segment_as_the_upgrade_request_is_relayed(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """The request and the client's first frame are two TLS records sent in one TCP write:
    the proxy reads both, decrypts the first for the request, and the engine must take the
    second over from OpenSSL's buffer (epoll will never say it is readable)."""
    with trio.fail_after(10):
        backend_port = await start_ws_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([backend_port], listener=tls_block(pki))))
        client = await MemoryTlsClient.connect(ports["public"], pki.client_context())
        with client.sock:
            client.obj.write(UPGRADE_REQUEST)
            client.obj.write(masked_frame(0x1, b"early bird"))  # a record of its own
            await client.flush()  # both records in one send
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await client.receive()
            head, rest = buf.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101")
            expected = b"\x81\x0aearly bird"
            while len(rest) < len(expected):
                rest += await client.receive()
            assert rest[: len(expected)] == expected


async def test_garbage_instead_of_tls_records_ends_that_session_only(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """After the handshakes a client writes bytes that are not TLS records: its session ends
    (the backend is told, 1001), another TLS session carries on."""
    with trio.fail_after(10):
        backend_port = await start_ws_backend(nursery)
        ports = await start_proxy_from(nursery, write_config(tmp_path, simple_config([backend_port], listener=tls_block(pki))))
        url = f"wss://localhost:{ports['public']}/"
        async with open_websocket_url(url, ssl_context=pki.client_context()) as bystander:
            stream = await tls_connect(ports["public"], pki.client_context())
            await stream.send_all(UPGRADE_REQUEST)
            assert (await read_head(stream)).startswith(b"HTTP/1.1 101")
            raw = stream.transport_stream
            await raw.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an application-data record that does not decrypt
            line = await wait_for_log(caplog, "event=close", within_s=5)
            assert "by=client" in line, line  # an unreadable TLS stream is the client gone
            await trio.aclose_forcefully(stream)
            await bystander.send_message("still here")
            assert await bystander.get_message() == "still here"
