"""End to end: JWT keys from ``routes[].auth.jwt.jwks_url`` (issue 17 item 4).

A real HTTPS JWKS server runs on loopback (trio, h11, a trustme certificate);
the proxy runs in-process on a YAML config (the loader, the fetcher, the gate);
clients send real upgrade requests with tokens signed by ``pyjwt``. What is
checked: keys fetched at start; a key rotation (a new ``kid`` signs tokens)
accepted after one on-demand fetch; unknown kids fetch at most once per
``jwks_min_refresh``; a failed refresh keeps the last good keys (logged,
counted); a start-up without keys fails with one clear line, with a
``jwks_file`` it starts; an untrusted certificate, a status other than 200
and an oversized body are failures; config errors are located.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import jwt as pyjwt
import pytest
import trio
import trustme
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.kit.servers import closed_port, start_ws_backend, status_of
from wsproxy.app import App, ListenError
from wsproxy.config.load import load_config
from wsproxy.edge.jwks import JwksFetchFailed, client_ssl_context, fetch_jwks
from wsproxy.errors import ConfigErrors


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return {**entry, "kid": kid, "use": "sig", "alg": "ES256"}


def token(key: ec.EllipticCurvePrivateKey, kid: str, sub: str = "alice") -> str:
    return pyjwt.encode({"sub": sub, "exp": int(time.time()) + 300}, key, algorithm="ES256", headers={"kid": kid})


@dataclass
class JwksServer:
    """An HTTPS server of one JWKS document, which the test changes; it counts and can fail."""

    document: bytes = b'{"keys": []}'
    status: int = 200
    requests: int = 0
    port: int = 0
    hang: bool = False
    seen: list[str] = field(default_factory=list)

    def publish(self, *entries: dict[str, Any]) -> None:
        self.document = json.dumps({"keys": list(entries)}).encode()

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    self.requests += 1
                    self.seen.append(event.target.decode())
                    if self.hang:
                        await trio.sleep_forever()
                    body = self.document
                    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
                    await stream.send_all(conn.send(h11.Response(status_code=self.status, headers=headers)) or b"")
                    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)


async def start_jwks_server(nursery: trio.Nursery, ca: trustme.CA) -> JwksServer:
    server = JwksServer()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server.handle, 0, server_ctx, host="127.0.0.1"))
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


@dataclass
class Setup:
    tmp_path: Path
    ca: trustme.CA
    ca_pem: Path
    backend: int

    def config(self, url: str, *jwt_lines: str) -> Path:
        jwt = "\n".join(f"          {line}" for line in (f"jwks_url: {url}", f'jwks_ca: "{self.ca_pem}"', "algorithms: [ES256]", *jwt_lines))
        path = self.tmp_path / "wsproxy.yaml"
        path.write_text(
            "listeners:\n"
            "  - name: public\n"
            "    bind: 127.0.0.1:0\n"
            "routes:\n"
            "  - pool: main\n"
            "    auth:\n"
            "      jwt:\n"
            f"{jwt}\n"
            "pools:\n"
            "  main:\n"
            "    backends:\n"
            f"      - address: 127.0.0.1:{self.backend}\n"
        )
        return path


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> Setup:
    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    return Setup(tmp_path, ca, ca_pem, await start_ws_backend(nursery))


async def start(nursery: trio.Nursery, path: Path) -> tuple[App, int]:
    app = App(load_config(str(path)))
    addresses = await nursery.start(app.serve)
    return app, addresses["public"][0][1]


def request(tok: str) -> bytes:
    return (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {tok}\r\n\r\n"
    ).encode()


async def status(port: int, tok: str) -> int:
    """Send an upgrade with ``tok``; the status of the answer (the connection is closed once the head is in)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request(tok))
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                assert data, head
                head += data
    return status_of(head)


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


async def test_keys_from_the_url_and_a_rotation_accepted_after_one_fetch(
    nursery: trio.Nursery, setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20):
        server = await start_jwks_server(nursery, setup.ca)
        old, new = new_key(), new_key()
        server.publish(jwk(old, "k1"))
        url = f"https://127.0.0.1:{server.port}/jwks.json?api=secret"
        app, port = await start(nursery, setup.config(url, "jwks_min_refresh: 10s"))
        assert server.requests == 1  # fetched at start, before listening
        assert await status(port, token(old, "k1")) == 101

        server.publish(jwk(old, "k1"), jwk(new, "k2"))  # the provider rotates: k2 signs from now on
        assert await status(port, token(new, "k2")) == 101  # unknown kid: one fetch, then accepted
        assert server.requests == 2
        assert await status(port, token(new, "k2")) == 101 and server.requests == 2  # known now

        # another unknown kid within jwks_min_refresh: refused at once, no fetch
        assert await status(port, token(new_key(), "k3")) == 401
        assert server.requests == 2
        fetched = lines(caplog, "event=jwks_fetched")
        assert len(fetched) == 2 and "why=unknown_kid" in fetched[1], fetched
        assert all("api=secret" not in line for line in caplog.messages)  # the query is never logged


async def test_a_failed_refresh_keeps_the_last_good_keys(
    nursery: trio.Nursery, setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20):
        server = await start_jwks_server(nursery, setup.ca)
        key = new_key()
        server.publish(jwk(key, "k1"))
        app, port = await start(nursery, setup.config(f"https://127.0.0.1:{server.port}/jwks", "jwks_refresh: 1s", "jwks_min_refresh: 1s"))
        server.status = 500
        with trio.fail_after(5):
            while not lines(caplog, "event=jwks_fetch_failed"):
                await trio.sleep(0.05)
        server.status, server.document = 200, b"not json"  # a bad document is a failure too
        with trio.fail_after(5):
            while len(lines(caplog, "event=jwks_fetch_failed")) < 2:
                await trio.sleep(0.05)
        failed = lines(caplog, "event=jwks_fetch_failed")
        assert 'reason="status 500"' in failed[0] and "kept_keys=1" in failed[0], failed
        assert "jwks_url: not JSON" in failed[1], failed
        assert await status(port, token(key, "k1")) == 101  # the last good set still verifies
        assert app.jwks.failures[f"https://127.0.0.1:{server.port}/jwks"] >= 2
        from wsproxy.control.exposition import collector_registry

        scraped = {s.labels.get("url"): s.value for m in collector_registry(app).collect() for s in m.samples}
        assert scraped.get(f"https://127.0.0.1:{server.port}/jwks", 0) >= 2


async def test_start_fails_without_keys_and_starts_with_a_jwks_file(
    nursery: trio.Nursery, setup: Setup, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{closed_port()}/jwks"
    app = App(load_config(str(setup.config(url))))
    with pytest.raises(ListenError, match=r"routes\[0\]\.auth\.jwt\.jwks_url: cannot fetch .*ConnectError.*proxy cannot start"):
        with trio.fail_after(10):
            await app.serve()

    key = new_key()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk(key, "k1")]}))
    with trio.fail_after(10):
        _app, port = await start(nursery, setup.config(url, f'jwks_file: "{jwks_file}"'))
        assert await status(port, token(key, "k1")) == 101


async def test_an_untrusted_certificate_is_refused(nursery: trio.Nursery, setup: Setup) -> None:
    with trio.fail_after(10):
        server = await start_jwks_server(nursery, trustme.CA())  # signed by another CA
        with pytest.raises(JwksFetchFailed, match="TLS verification failed"):
            await fetch_jwks(f"https://127.0.0.1:{server.port}/", client_ssl_context(str(setup.ca_pem)))
        app = App(load_config(str(setup.config(f"https://127.0.0.1:{server.port}/"))))
        with pytest.raises(ListenError, match="TLS verification failed"):
            await app.serve()


async def test_size_cap_and_status(nursery: trio.Nursery, setup: Setup) -> None:
    with trio.fail_after(10):
        server = await start_jwks_server(nursery, setup.ca)
        url, ctx = f"https://127.0.0.1:{server.port}/", client_ssl_context(str(setup.ca_pem))
        server.document = b"x" * 5000
        with pytest.raises(JwksFetchFailed, match="over 4096 bytes"):
            await fetch_jwks(url, ctx, max_bytes=4096)
        server.status = 404
        with pytest.raises(JwksFetchFailed, match="status 404"):
            await fetch_jwks(url, ctx)
        server.status, server.hang = 200, True
        with pytest.raises(JwksFetchFailed, match="timed out after 0.3s"):
            await fetch_jwks(url, ctx, timeout_s=0.3)


@pytest.mark.parametrize(
    ("lines_", "message"),
    [
        (["jwks_url: http://idp.example/jwks"], 'jwks_url: expected an https:// URL with a host, got "http://idp.example/jwks"'),
        (["jwks_url: https://u:p@idp.example/jwks"], "a URL with credentials in it"),
        (["jwks_refresh: 1m", "keys: []"], "jwks_refresh applies to jwks_url, which is not given"),
    ],
)
def test_config_errors_are_located(tmp_path: Path, lines_: list[str], message: str) -> None:
    jwt = "\n".join(f"          {line}" for line in ("algorithms: [ES256]", *lines_))
    path = tmp_path / "w.yaml"
    path.write_text(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nroutes:\n  - pool: main\n    auth:\n      jwt:\n"
        f"{jwt}\npools:\n  main:\n    backends:\n      - address: 127.0.0.1:9\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    text = str(info.value)
    assert message in text and f"{path}:9:" in text, text
