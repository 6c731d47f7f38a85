"""End to end: Origin checks and authentication at the gate, through a real proxy on loopback.

Every test writes its config as YAML in ``tmp_path`` and loads it with
``load_config`` (so the loader, key files included, is part of what is tested),
then runs ``App`` in-process. The backend is a raw TCP server that *records
every byte it receives*, completes a correct 101 (choosing a subprotocol when
asked to), echoes text frames and answers a close: a test can show exactly
what reached upstream, and that nothing did for a refused request. Clients
write exact bytes, or are the real ``websockets`` client where only a real
client proves the point (the subprotocol forms). Forward auth talks to a real
HTTP auth service (trio + h11, port 0) defined here.

Keys and tokens are made here; every credential is searched for in every log
record (DEBUG included) and in every byte the backend received.

What is not here: the pure decisions (``tests/proto/test_auth.py``,
``test_origin.py``), forward auth without the session (``test_forward_auth.py``),
limits (``test_limits.py``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import jwt
import pytest
import trio
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.trio.client import connect as ws_connect

from tests.kit.authservice import AuthService, start_auth_service
from tests.kit.ws import accept_for, frame, read_frame
from wsproxy.app import App
from wsproxy.config.load import load_config
from wsproxy.config.schema import Config
from wsproxy.log import logfmt_value
from wsproxy.errors import ConfigErrors

#: Bound on every test.
TEST_TIMEOUT_S = 10.0
INVALID_TOKEN = b'Bearer error="invalid_token"'
ISSUER = "https://issuer.e2e.test"
AUDIENCE = "wsproxy-e2e"


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    """Every record of the proxy, DEBUG included: the credential checks search them all."""
    caplog.set_level(logging.DEBUG, logger="wsproxy")


# --- config and proxy ---------------------------------------------------------------------


def load(tmp_path: Path, backend_port: int, routes: list[dict[str, Any]], **top: Any) -> Config:
    """Write a one-listener ("edge"), one-pool ("main") config as YAML and load it."""
    document: dict[str, Any] = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "pools": {"main": {"backends": [{"address": f"127.0.0.1:{backend_port}"}]}},
        "routes": [{"pool": "main", **route} for route in routes],
        **top,
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(str(path))


async def run_proxy(nursery: trio.Nursery, config: Config) -> tuple[App, int]:
    app = App(config)
    addresses = await nursery.start(app.serve)
    return app, addresses["edge"][0][1]


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def header_values(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.partition(b":")[2].strip()
        for line in head.split(b"\r\n")[1:]
        if line.partition(b":")[0].strip().lower() == name.lower()
    ]


# --- the recording backend ----------------------------------------------------------------


@dataclass
class Seen:
    """One upstream request as the backend parsed it (h11)."""

    target: bytes
    headers: list[tuple[bytes, bytes]]  # raw names, in order

    def values(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower().encode()]

    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}


@dataclass
class Upstream:
    """Everything the recording backend received, over all its connections."""

    connections: int = 0
    received: bytearray = field(default_factory=bytearray)
    heads: list[bytes] = field(default_factory=list)

    def request(self, index: int = -1) -> Seen:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(self.heads[index])
        event = conn.next_event()
        assert isinstance(event, h11.Request), event
        return Seen(event.target, list(event.headers.raw_items()))


async def start_recording_backend(nursery: trio.Nursery, *, choose: str | None = None) -> tuple[int, Upstream]:
    """A raw backend: records every byte, answers a correct 101 (naming ``choose`` when the
    offer has it), echoes text frames, answers a close frame with one and hangs up."""
    upstream = Upstream()

    async def handler(stream: trio.SocketStream) -> None:
        upstream.connections += 1
        buf = bytearray()
        try:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                upstream.received += data
                buf += data
            end = buf.index(b"\r\n\r\n") + 4
            head = bytes(buf[:end])
            del buf[:end]
            upstream.heads.append(head)
            (key,) = header_values(head, b"sec-websocket-key")
            offered = [p.strip().decode() for v in header_values(head, b"sec-websocket-protocol") for p in v.split(b",")]
            protocol = b"Sec-WebSocket-Protocol: %s\r\n" % choose.encode() if choose in offered else b""
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n" + protocol + b"\r\n"
            )
            while True:
                got = await read_frame(_Recording(stream, upstream), buf)
                if got is None:
                    return
                opcode, payload = got.opcode, got.payload
                if opcode == 0x1:
                    await stream.send_all(frame(0x1, payload, mask=False))
                elif opcode == 0x8:
                    await stream.send_all(frame(0x8, payload[:2], mask=False))
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1]), upstream


class _Recording(trio.abc.ReceiveStream):
    """Receives from ``stream`` and appends every byte to ``upstream.received``."""

    def __init__(self, stream: trio.SocketStream, upstream: Upstream) -> None:
        self.stream, self.upstream = stream, upstream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.upstream.received += data
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- clients --------------------------------------------------------------------------------


def upgrade(target: str = "/", *headers: str, host: str = "127.0.0.1") -> bytes:
    """A valid upgrade request for ``target`` with ``headers`` ("Name: value") added."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes

    def values(self, name: str) -> list[bytes]:
        return header_values(self.head, name.encode())


async def ask(port: int, request: bytes) -> Reply:
    """Send ``request``; the response head (and body, unless 101); then hang up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            assert data, f"the proxy closed after {buf!r}"
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            (length,) = header_values(head, b"content-length")
            while len(body) < int(length):
                data = await stream.receive_some(65536)
                assert data, "the proxy closed inside the body"
                body += data
        return Reply(status, head, body)


# --- log helpers -------------------------------------------------------------------------------


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def refused(caplog: pytest.LogCaptureFixture, status: int) -> list[str]:
    return [m for m in messages(caplog) if "event=refused" in m and f"status={status} " in m]


def opened(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(caplog) if "event=open " in m]


def assert_never_logged(caplog: pytest.LogCaptureFixture, *secrets_: str) -> None:
    """Search every record: the message, its arguments, any traceback, the formatted text."""
    for record in caplog.records:
        text = "\n".join((record.getMessage(), repr(record.args), record.exc_text or "", repr(record.msg)))
        for secret in secrets_:
            assert secret not in text, f"credential in a log record: {text}"
    for secret in secrets_:
        assert secret not in caplog.text


def assert_refused_quietly(reply: Reply, status: int, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """``status`` with a body that names no check; the log line does."""
    reasons = {401: b"Unauthorized\n", 403: b"Forbidden\n", 503: b"Service Unavailable\n"}
    assert reply.status == status, reply
    assert reply.body == reasons[status], reply.body
    lines = refused(caplog, status)
    assert any(reason in line for line in lines), (reason, lines)


async def assert_nothing_reached(upstream: Upstream) -> None:
    await trio.sleep(0.1)  # anything in flight would have landed by now
    assert upstream.connections == 0 and upstream.received == b"", bytes(upstream.received)


# --- 1. credential sources (static tokens) ---------------------------------------------------


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKEN_A = "tA-" + secrets.token_urlsafe(24)
TOKEN_B = "tB-" + secrets.token_urlsafe(24)

TOKENS_ROUTE = {
    "path": "/tokens",
    "auth": {
        "sources": ["header", "cookie:access", "query:access_token", "subprotocol"],
        "tokens": [{"name": "svc-a", "sha256": digest(TOKEN_A)}, {"name": "svc-b", "sha256": digest(TOKEN_B)}],
    },
}


async def tokens_proxy(nursery: trio.Nursery, tmp_path: Path, *, choose: str | None = None) -> tuple[int, Upstream]:
    backend, upstream = await start_recording_backend(nursery, choose=choose)
    _, port = await run_proxy(nursery, load(tmp_path, backend, [TOKENS_ROUTE]))
    return port, upstream


SOURCES = {
    "header": ("/tokens?room=1", f"Authorization: Bearer {TOKEN_A}"),
    "header, scheme in lower case": ("/tokens?room=1", f"Authorization: bearer {TOKEN_A}"),
    "cookie": ("/tokens?room=1", f"Cookie: theme=dark; access={TOKEN_A}; lang=en"),
    "query": (f"/tokens?room=1&access_token={TOKEN_A}&x=2", None),
    "subprotocol bearer": ("/tokens?room=1", f"Sec-WebSocket-Protocol: bearer, {TOKEN_A}"),
    "subprotocol access_token": ("/tokens?room=1", f"Sec-WebSocket-Protocol: access_token.{TOKEN_A}, chat"),
}


@pytest.mark.parametrize(("target", "header"), list(SOURCES.values()), ids=list(SOURCES))
async def test_each_source_admits_and_the_credential_never_goes_upstream(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str, header: str | None
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path, choose="chat")
        reply = await ask(port, upgrade(target, *([header] if header else []), "X-Keep: yes"))
        assert reply.status == 101, reply
        await trio.sleep(0.1)  # the client's EOF → 1001 to the backend → its close back

    seen = upstream.request()
    assert seen.values("X-Auth-Subject") == [b"svc-a"]
    assert seen.values("X-Keep") == [b"yes"]
    # The target loses only the credential parameter; every other parameter stays, in order.
    assert seen.target == (b"/tokens?room=1&x=2" if "access_token=" in target else b"/tokens?room=1")
    assert TOKEN_A.encode() not in upstream.received
    assert b"authorization" not in seen.names()
    if "Cookie" in (header or ""):
        assert seen.values("Cookie") == [b"theme=dark; lang=en"]
    if "access_token." in (header or ""):
        assert seen.values("Sec-WebSocket-Protocol") == [b"chat"]
        assert reply.values("Sec-WebSocket-Protocol") == [b"chat"]
    if "bearer," in (header or ""):
        assert "sec-websocket-protocol" not in {n.decode() for n in seen.names()}
        assert reply.values("Sec-WebSocket-Protocol") == [b"bearer"]
    assert any("identity=svc-a" in line for line in opened(caplog)), opened(caplog)
    assert_never_logged(caplog, TOKEN_A)


async def test_real_client_offering_bearer_and_token_completes_the_handshake(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The offer goes upstream empty, the backend names nothing, and the proxy's 101
    names "bearer": a real client, which fails a 101 that names a protocol it did
    not offer, accepts it."""
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path)
        async with ws_connect(
            f"ws://127.0.0.1:{port}/tokens", subprotocols=["bearer", TOKEN_B],  # type: ignore[list-item]
            proxy=None, compression=None, open_timeout=5, close_timeout=2,
        ) as ws:
            assert ws.subprotocol == "bearer"
            await ws.send("hello through bearer")
            assert await ws.recv() == "hello through bearer"
    seen = upstream.request()
    assert seen.values("Sec-WebSocket-Protocol") == []
    assert seen.values("X-Auth-Subject") == [b"svc-b"]
    assert TOKEN_B.encode() not in upstream.received
    assert any("identity=svc-b" in line for line in opened(caplog))
    assert_never_logged(caplog, TOKEN_B)


async def test_real_client_offering_access_token_and_chat_gets_chat(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path, choose="chat")
        async with ws_connect(
            f"ws://127.0.0.1:{port}/tokens", subprotocols=[f"access_token.{TOKEN_A}", "chat"],  # type: ignore[list-item]
            proxy=None, compression=None, open_timeout=5, close_timeout=2,
        ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("hello chat")
            assert await ws.recv() == "hello chat"
    seen = upstream.request()
    assert seen.values("Sec-WebSocket-Protocol") == [b"chat"]
    assert seen.values("X-Auth-Subject") == [b"svc-a"]
    assert TOKEN_A.encode() not in upstream.received
    assert_never_logged(caplog, TOKEN_A)


async def test_every_configured_source_is_emptied_not_only_the_one_used(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Header first in ``sources`` wins; the second credential (cookie, query, subprotocol) is removed too."""
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path, choose="chat")
        reply = await ask(port, upgrade(
            f"/tokens?access_token={TOKEN_B}",
            f"Authorization: Bearer {TOKEN_A}",
            f"Cookie: access={TOKEN_B}",
            f"Sec-WebSocket-Protocol: chat, access_token.{TOKEN_B}",
        ))
        assert reply.status == 101
    seen = upstream.request()
    assert seen.values("X-Auth-Subject") == [b"svc-a"]
    assert seen.target == b"/tokens"
    assert seen.values("Cookie") == []
    assert seen.values("Sec-WebSocket-Protocol") == [b"chat"]
    assert TOKEN_A.encode() not in upstream.received and TOKEN_B.encode() not in upstream.received
    assert_never_logged(caplog, TOKEN_A, TOKEN_B)


TOKEN_REFUSALS = {
    "wrong token": (f"Authorization: Bearer {TOKEN_A}x", INVALID_TOKEN, "unknown token"),
    "wrong cookie": ("Cookie: access=not-a-token", INVALID_TOKEN, "unknown token"),
    "missing": (None, b"Bearer", "missing credentials"),
    "empty bearer": ("Authorization: Bearer ", b"Bearer", "missing credentials"),
    "basic is not bearer": ("Authorization: Basic dXNlcjpwYXNz", b"Bearer", "missing credentials"),
}


@pytest.mark.parametrize(("header", "challenge", "reason"), list(TOKEN_REFUSALS.values()), ids=list(TOKEN_REFUSALS))
async def test_token_refusals(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, header: str | None, challenge: bytes, reason: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade("/tokens", *([header] if header else [])))
        assert_refused_quietly(reply, 401, caplog, reason)
        assert reply.values("WWW-Authenticate") == [challenge]
        await assert_nothing_reached(upstream)
    assert_never_logged(caplog, TOKEN_A + "x", "not-a-token", "dXNlcjpwYXNz")


async def test_spoofed_identity_headers_from_the_client_never_reach_the_backend(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await tokens_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade(
            "/tokens",
            "X-Auth-Subject: mallory",
            "x-auth-subject: mallory2",
            "X_Auth_Subject: mallory3",
            "X-Auth-Claim-Role: root",
            "X_Auth_Claim_Tenant: evil-corp",
            f"Authorization: Bearer {TOKEN_A}",
        ))
        assert reply.status == 101
    seen = upstream.request()
    assert seen.values("X-Auth-Subject") == [b"svc-a"]
    assert not [n for n in seen.names() if n.replace(b"_", b"-").startswith(b"x-auth-claim-")]
    assert b"x_auth_subject" not in seen.names()
    for spoof in (b"mallory", b"root", b"evil-corp"):
        assert spoof not in upstream.received


# --- 2. JWT ------------------------------------------------------------------------------


@functools.cache  # called positionally only: cache keys on the call's spelling
def rsa_key(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


HS_SECRET = b"hs256-" + secrets.token_hex(24).encode()  # 54 bytes, over RFC 7518's 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice", "email": "alice@example.com", "iss": ISSUER, "aud": AUDIENCE,
        "iat": now, "exp": now + 300, "role": "admin", "tenant_id": "t-42",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: bytes = HS_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def rs256(payload: dict[str, Any], key: int = 0, kid: str | None = None) -> str:
    return jwt.encode(payload, rsa_key(key), algorithm="RS256", headers={"kid": kid} if kid else None)


def es256(payload: dict[str, Any], key: int = 0, kid: str | None = None) -> str:
    return jwt.encode(payload, ec_key(key), algorithm="ES256", headers={"kid": kid} if kid else None)


def unsigned(payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(payload).encode())}."


def hs256_with_the_rsa_public_key(payload: dict[str, Any]) -> str:
    """The RS/HS confusion: an HS256 token whose secret is the server's public RSA PEM
    (made by hand: pyjwt refuses to sign it)."""
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(payload).encode())}"
    mac = hmac.new(public_pem(rsa_key(0)), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def jwt_routes(tmp_path: Path) -> list[dict[str, Any]]:
    rsa_pem = write(tmp_path, "rsa.pub.pem", public_pem(rsa_key(0)))
    ec_pem = write(tmp_path, "ec.pub.pem", public_pem(ec_key(0)))
    secret = write(tmp_path, "hs.secret", HS_SECRET + b"\n")
    jwks = {
        "keys": [
            {**RSAAlgorithm.to_jwk(rsa_key(1).public_key(), as_dict=True), "kid": "a", "use": "sig"},
            {**ECAlgorithm.to_jwk(ec_key(1).public_key(), as_dict=True), "kid": "b", "use": "sig"},
        ]
    }
    jwks_file = write(tmp_path, "jwks.json", json.dumps(jwks))
    return [
        {
            "path": "/jwt",
            "auth": {
                "jwt": {
                    "algorithms": ["HS256", "RS256", "ES256"],
                    "keys": [rsa_pem, ec_pem],
                    "secret_file": secret,
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "leeway": "5s",
                    "pass_claims": ["role", "tenant_id"],
                }
            },
        },
        {
            "path": "/jwks",
            "auth": {
                "identity_header": "X-User-Id",
                "jwt": {"algorithms": ["RS256", "ES256"], "jwks_file": jwks_file, "identity_claim": "email", "audience": AUDIENCE},
            },
        },
        {"path": "/confusion", "auth": {"jwt": {"algorithms": ["RS256", "HS256"], "keys": [rsa_pem]}}},
    ]


async def jwt_proxy(nursery: trio.Nursery, tmp_path: Path) -> tuple[int, Upstream]:
    backend, upstream = await start_recording_backend(nursery)
    _, port = await run_proxy(nursery, load(tmp_path, backend, jwt_routes(tmp_path)))
    return port, upstream


JWT_ACCEPTED: dict[str, Callable[[], tuple[str, str, str, str]]] = {
    # name: () -> (path, token, identity header, identity)
    "HS256 secret_file": lambda: ("/jwt", hs256(claims()), "X-Auth-Subject", "alice"),
    "RS256 PEM key": lambda: ("/jwt", rs256(claims()), "X-Auth-Subject", "alice"),
    "ES256 PEM key": lambda: ("/jwt", es256(claims()), "X-Auth-Subject", "alice"),
    "expired within leeway": lambda: ("/jwt", rs256(claims(exp=int(time.time()) - 2)), "X-Auth-Subject", "alice"),
    "JWKS kid a (RSA)": lambda: ("/jwks", rs256(claims(), key=1, kid="a"), "X-User-Id", "alice@example.com"),
    "JWKS kid b (EC)": lambda: ("/jwks", es256(claims(), key=1, kid="b"), "X-User-Id", "alice@example.com"),
}


@pytest.mark.parametrize("make", list(JWT_ACCEPTED.values()), ids=list(JWT_ACCEPTED))
async def test_jwt_accepted(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Callable[[], tuple[str, str, str, str]]
) -> None:
    path, token, identity_header, identity = make()
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await jwt_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade(
            path, f"Authorization: Bearer {token}", f"{identity_header}: mallory", "X-Auth-Claim-Role: root"
        ))
        assert reply.status == 101, (reply, messages(caplog))
    seen = upstream.request()
    assert seen.values(identity_header) == [identity.encode()]
    if path == "/jwt":
        assert seen.values("X-Auth-Claim-Role") == [b"admin"]
        assert seen.values("X-Auth-Claim-Tenant-Id") == [b"t-42"]
    else:
        assert not [n for n in seen.names() if n.startswith(b"x-auth-claim-")]
    assert token.encode() not in upstream.received and b"mallory" not in upstream.received
    assert any(f"identity={logfmt_value(identity)}" in line for line in opened(caplog))
    assert_never_logged(caplog, token, token.rsplit(".", 1)[1])


JWT_REFUSED: dict[str, Callable[[], tuple[str, str, str]]] = {
    # name: () -> (path, token, what the log reason says)
    "expired": lambda: ("/jwt", rs256(claims(exp=int(time.time()) - 3600)), "jwt expired"),
    "no exp": lambda: ("/jwt", rs256(claims(exp=None)), "jwt has no exp claim"),
    "not yet valid": lambda: ("/jwt", es256(claims(nbf=int(time.time()) + 3600)), "jwt not valid yet"),
    "wrong aud": lambda: ("/jwt", hs256(claims(aud="someone-else")), "jwt audience mismatch"),
    "wrong iss": lambda: ("/jwt", rs256(claims(iss="https://evil.test")), "jwt issuer mismatch"),
    "alg none": lambda: ("/jwt", unsigned(claims()), "alg none not allowed"),
    "alg not listed": lambda: ("/jwt", jwt.encode(claims(), HS_SECRET + HS_SECRET, algorithm="HS512"), "alg HS512 not allowed"),
    "HS256 wrong secret": lambda: ("/jwt", hs256(claims(), secret=b"x" * 40), "jwt signature invalid"),
    "RS256 other key": lambda: ("/jwt", rs256(claims(), key=2), "jwt signature invalid"),
    "RS/HS key confusion": lambda: ("/confusion", hs256_with_the_rsa_public_key(claims()), "no key for alg HS256"),
    "JWKS unknown kid": lambda: ("/jwks", rs256(claims(), key=1, kid="c"), "not in jwks"),
    "JWKS kid a, other key": lambda: ("/jwks", rs256(claims(), key=2, kid="a"), "jwt signature invalid"),
    "JWKS kid b for RS256": lambda: ("/jwks", rs256(claims(), key=1, kid="b"), "cannot verify alg RS256"),
    "garbage": lambda: ("/jwt", "garbage" + secrets.token_hex(8), "jwt malformed"),
    "three garbage parts": lambda: ("/jwt", "not." + secrets.token_hex(8) + ".jwt", "jwt malformed"),
}


@pytest.mark.parametrize("make", list(JWT_REFUSED.values()), ids=list(JWT_REFUSED))
async def test_jwt_refused_with_401_invalid_token_and_the_reason_only_in_the_log(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Callable[[], tuple[str, str, str]]
) -> None:
    path, token, reason = make()
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await jwt_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade(path, f"Authorization: Bearer {token}"))
        assert_refused_quietly(reply, 401, caplog, reason)
        assert reply.values("WWW-Authenticate") == [INVALID_TOKEN]
        await assert_nothing_reached(upstream)
    assert_never_logged(caplog, token)


@pytest.mark.parametrize("path", ["/jwt", "/jwks", "/confusion"])
async def test_jwt_missing_is_a_bare_bearer_challenge(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream = await jwt_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade(path))
        assert_refused_quietly(reply, 401, caplog, "missing credentials")
        assert reply.values("WWW-Authenticate") == [b"Bearer"]
        await assert_nothing_reached(upstream)


async def test_jwt_through_the_access_token_subprotocol_with_a_real_client(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = jwt_routes(tmp_path)
    routes[0]["auth"]["sources"] = ["subprotocol"]
    token = es256(claims())
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, upstream = await start_recording_backend(nursery)
        _, port = await run_proxy(nursery, load(tmp_path, backend, routes))
        async with ws_connect(
            f"ws://127.0.0.1:{port}/jwt", subprotocols=[f"access_token.{token}"],  # type: ignore[list-item]
            proxy=None, compression=None, open_timeout=5, close_timeout=2,
        ) as ws:
            assert ws.subprotocol == f"access_token.{token}"  # the only entry it offered
            await ws.send("jwt ok")
            assert await ws.recv() == "jwt ok"
    seen = upstream.request()
    assert seen.values("Sec-WebSocket-Protocol") == []
    assert seen.values("X-Auth-Subject") == [b"alice"]
    assert token.encode() not in upstream.received
    assert_never_logged(caplog, token)


def test_an_hmac_secret_file_holding_a_public_key_is_refused_at_load(tmp_path: Path) -> None:
    """The confusion closed at load time too: a PEM public key is not an HMAC secret."""
    pem = write(tmp_path, "rsa.pub.pem", public_pem(rsa_key(0)))
    with pytest.raises(ConfigErrors, match="looks like a public key"):
        load(tmp_path, 9, [{"path": "/", "auth": {"jwt": {"algorithms": ["HS256"], "secret_file": pem}}}])


# --- 3. forward auth -------------------------------------------------------------------------


DENY_401_CHALLENGE = b'Bearer realm="e2e", error="invalid_token"'


def auth_verdict(request: h11.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    cookies = b"; ".join(v for n, v in request.headers if n == b"cookie")
    match = re.search(rb"(?:^|;\s*)sid=([^;]*)", cookies)
    sid = match.group(1) if match else b""
    if sid.startswith(b"alice"):
        return 200, [(b"X-User", sid), (b"X-Scope", b"chat"), (b"X-Not-Copied", b"nope")], b""
    if sid == b"scope-only":
        return 200, [(b"X-Scope", b"read")], b""
    if sid == b"banned":
        return 403, [(b"Content-Type", b"text/plain")], b"you are banned\n"
    if sid == b"broken":
        return 500, [], b"oops\n"
    if sid == b"slow":
        return None
    return 401, [(b"WWW-Authenticate", DENY_401_CHALLENGE), (b"Content-Type", b"text/plain")], b"log in first\n"


async def forward_proxy(nursery: trio.Nursery, tmp_path: Path) -> tuple[int, Upstream, AuthService]:
    service = await start_auth_service(nursery, auth_verdict)
    backend, upstream = await start_recording_backend(nursery)

    def route(path: str, cache: str) -> dict[str, Any]:
        return {
            "path": path,
            "origins": ["https://app.example.com"],
            "auth": {
                "sources": ["cookie:sid"],
                "forward": {
                    "url": f"http://127.0.0.1:{service.port}/check",
                    "send_headers": ["Cookie"],
                    "copy_headers": ["X-User", "X-Scope"],
                    "timeout": "300ms",
                    "cache": cache,
                },
            },
        }

    config = load(tmp_path, backend, [route("/fwd-cached", "30s"), route("/fwd", "0s")])
    _, port = await run_proxy(nursery, config)
    return port, upstream, service


async def test_forward_allow_copies_headers_and_strips_client_copies(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream, service = await forward_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade(
            "/fwd?room=7", "Cookie: theme=dark; sid=alice-1", "X-User: mallory", "X-Scope: admin", "X-Auth-Subject: mallory"
        ))
        assert reply.status == 101, messages(caplog)
        # The service names no X-User this time: the client's own still never passes.
        reply = await ask(port, upgrade("/fwd", "Cookie: sid=scope-only", "X-User: mallory"))
        assert reply.status == 101
    assert len(service.asked_for("/fwd")) == 2
    first = service.requests[0]
    assert (b"cookie", b"theme=dark; sid=alice-1") in list(first.headers)
    assert (b"x-forwarded-uri", b"/fwd?room=7") in list(first.headers)

    allowed, scope_only = upstream.request(0), upstream.request(1)
    assert allowed.values("X-User") == [b"alice-1"]
    assert allowed.values("X-Scope") == [b"chat"]
    assert allowed.values("X-Not-Copied") == []
    assert allowed.values("X-Auth-Subject") == []
    assert allowed.values("Cookie") == [b"theme=dark"]  # the credential cookie stays here
    assert scope_only.values("X-User") == []
    assert scope_only.values("X-Scope") == [b"read"]
    assert scope_only.values("Cookie") == []
    assert b"mallory" not in upstream.received and b"sid=" not in upstream.received
    assert_never_logged(caplog, "alice-1", "scope-only")


FORWARD_DENIALS = {
    "401 passed with its challenge": ("sid=nobody", 401, [DENY_401_CHALLENGE], b"log in first\n"),
    "no cookie at all": (None, 401, [DENY_401_CHALLENGE], b"log in first\n"),
    "403 passed": ("sid=banned", 403, [], b"you are banned\n"),
}


@pytest.mark.parametrize(("cookie", "status", "challenge", "body"), list(FORWARD_DENIALS.values()), ids=list(FORWARD_DENIALS))
async def test_forward_denial_is_passed_to_the_client(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    cookie: str | None, status: int, challenge: list[bytes], body: bytes,
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream, service = await forward_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade("/fwd", *([f"Cookie: {cookie}"] if cookie else [])))
        assert reply.status == status
        assert reply.values("WWW-Authenticate") == challenge
        assert reply.body == body
        await assert_nothing_reached(upstream)
    assert len(service.requests) == 1
    assert any(f"answered {status}" in line for line in refused(caplog, status))


@pytest.mark.parametrize(("cookie", "reason"), [("sid=slow", "did not answer within 0.3s"), ("sid=broken", "answered 500")])
async def test_forward_timeout_or_failure_is_503(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, cookie: str, reason: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream, _ = await forward_proxy(nursery, tmp_path)
        start = trio.current_time()
        reply = await ask(port, upgrade("/fwd", f"Cookie: {cookie}"))
        elapsed = trio.current_time() - start
        assert_refused_quietly(reply, 503, caplog, reason)
        assert elapsed < 0.3 + 1.0, elapsed
        await assert_nothing_reached(upstream)


async def test_forward_cache_one_subrequest_for_two_sessions_with_the_same_cookie(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream, service = await forward_proxy(nursery, tmp_path)
        for _ in range(2):
            assert (await ask(port, upgrade("/fwd-cached", "Cookie: sid=alice-c"))).status == 101
        assert len(service.asked_for("/fwd-cached")) == 1
        assert [upstream.request(i).values("X-User") for i in range(2)] == [[b"alice-c"], [b"alice-c"]]
        # Other credentials are another key; denials are never cached; the uncached route always asks.
        assert (await ask(port, upgrade("/fwd-cached", "Cookie: sid=alice-d"))).status == 101
        for _ in range(2):
            assert (await ask(port, upgrade("/fwd-cached", "Cookie: sid=nobody"))).status == 401
        assert len(service.asked_for("/fwd-cached")) == 4
        for _ in range(2):
            assert (await ask(port, upgrade("/fwd", "Cookie: sid=alice-c"))).status == 101
        assert len(service.asked_for("/fwd")) == 2


async def test_forward_bad_origin_is_refused_before_the_auth_service_is_asked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstream, service = await forward_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade("/fwd", "Origin: https://evil.example", "Cookie: sid=alice-1"))
        assert reply.status == 403
        await assert_nothing_reached(upstream)
        assert service.requests == []


def identity_verdict(request: h11.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """alice-* and bob-* cookies are alice and bob; "nameless" is allowed without X-User."""
    cookies = b"; ".join(v for n, v in request.headers if n == b"cookie")
    match = re.search(rb"(?:^|;\s*)sid=([^;]*)", cookies)
    sid = match.group(1) if match else b""
    if sid == b"nameless":
        return 200, [(b"X-Scope", b"chat")], b""
    if sid == b"twice":
        return 200, [(b"X-User", b"alice"), (b"X-User", b"bob")], b""
    user = sid.partition(b"-")[0]
    if user in (b"alice", b"bob"):
        return 200, [(b"X-User", user)], b""
    return 401, [(b"WWW-Authenticate", b"Bearer")], b""


async def identity_proxy(
    nursery: trio.Nursery, tmp_path: Path, backends: int = 1
) -> tuple[int, list[Upstream], AuthService]:
    service = await start_auth_service(nursery, identity_verdict)
    started = [await start_recording_backend(nursery) for _ in range(backends)]
    forward = {
        "url": f"http://127.0.0.1:{service.port}/check",
        "send_headers": ["Cookie"],
        "identity_from": "X-User",
        "timeout": "2s",
    }
    document: dict[str, Any] = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "routes": [
            {"path": "/cached", "pool": "main", "auth": {"sources": ["cookie:sid"], "identity_header": "X-Identity", "forward": {**forward, "cache": "30s"}}},
            {"path": "/", "pool": "main", "auth": {"sources": ["cookie:sid"], "forward": {**forward, "cache": "0s"}}},
        ],
        "pools": {
            "main": {
                "sticky": {"key": "identity"},
                "backends": [{"address": f"127.0.0.1:{port}"} for port, _ in started],
            }
        },
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    _, port = await run_proxy(nursery, load_config(str(path)))
    return port, [upstream for _, upstream in started], service


async def test_forward_identity_goes_upstream_and_into_the_log(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        port, (upstream,), service = await identity_proxy(nursery, tmp_path)
        reply = await ask(port, upgrade("/cached", "Cookie: sid=alice-1", "X-Identity: mallory", "X-Auth-Subject: mallory"))
        assert reply.status == 101, messages(caplog)
        # A cached allow keeps its identity: no second subrequest, the same identity.
        reply = await ask(port, upgrade("/cached", "Cookie: sid=alice-1"))
        assert reply.status == 101
        assert len(service.asked_for("/cached")) == 1
        reply = await ask(port, upgrade("/", "Cookie: sid=bob-1", "X-Auth-Subject: mallory"))
        assert reply.status == 101
    assert [upstream.request(i).values("X-Identity") for i in range(2)] == [[b"alice"], [b"alice"]]
    assert upstream.request(2).values("X-Auth-Subject") == [b"bob"]  # the default identity_header
    assert b"mallory" not in upstream.received
    identities = [m.rsplit("identity=", 1)[1] for m in opened(caplog)]
    assert identities == ["alice", "alice", "bob"]


@pytest.mark.parametrize(
    ("cookie", "reason"),
    [
        ("sid=nameless", "allowed without exactly one X-User header (got 0)"),
        ("sid=twice", "allowed without exactly one X-User header (got 2)"),
    ],
)
async def test_forward_allow_without_one_identity_is_503(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, cookie: str, reason: str
) -> None:
    """identity_from is a contract: a backend must never get an anonymous session where
    it expects a named one. Not cached either (only allows with an identity are)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        port, (upstream,), service = await identity_proxy(nursery, tmp_path)
        for _ in range(2):
            reply = await ask(port, upgrade("/cached", f"Cookie: {cookie}"))
            assert_refused_quietly(reply, 503, caplog, reason)
        await assert_nothing_reached(upstream)
        assert len(service.asked_for("/cached")) == 2
    assert any("kind=auth_unavailable" in line for line in refused(caplog, 503))


async def test_sticky_by_forward_identity(nursery: trio.Nursery, tmp_path: Path) -> None:
    """sticky.key: identity pins a user, not a credential: alice on three devices (three
    cookies) lands on one backend, where round robin alone would spread them."""
    with trio.fail_after(TEST_TIMEOUT_S):
        port, upstreams, _ = await identity_proxy(nursery, tmp_path, backends=3)
        for device in ("phone", "laptop", "tablet", "watch"):
            assert (await ask(port, upgrade("/", f"Cookie: sid=alice-{device}"))).status == 101
        counts = sorted(len(u.heads) for u in upstreams)
        assert counts == [0, 0, 4], counts


# --- 4. Origin ---------------------------------------------------------------------------------

ORIGIN_ROUTES: list[dict[str, Any]] = [
    {
        "path": "/strict",
        "origins": ["https://app.example.com", "https://*.example.org", "http://localhost:8080"],
        "allow_missing_origin": False,
    },
    {"path": "/lenient", "origins": ["https://app.example.com"], "allow_missing_origin": True},
    {"path": "/any"},  # no origins key: any origin
    {
        "path": "/both",
        "origins": ["https://app.example.com"],
        "auth": {"tokens": [{"name": "svc-a", "sha256": digest(TOKEN_A)}]},
    },
]

ORIGINS = {
    "exact": ("/strict", "https://app.example.com", 101),
    "exact, upper case": ("/strict", "HTTPS://APP.EXAMPLE.COM", 101),
    "exact, default port spelled": ("/strict", "https://app.example.com:443", 101),
    "port mismatch": ("/strict", "https://app.example.com:8443", 403),
    "scheme mismatch": ("/strict", "http://app.example.com", 403),
    "other host": ("/strict", "https://evil.example", 403),
    "suffix trick": ("/strict", "https://app.example.com.evil.test", 403),
    "wildcard one label": ("/strict", "https://a.example.org", 101),
    "wildcard two labels": ("/strict", "https://a.b.example.org", 101),
    "wildcard needs a label": ("/strict", "https://example.org", 403),
    "wildcard not a substring": ("/strict", "https://evil-example.org", 403),
    "explicit port": ("/strict", "http://localhost:8080", 101),
    "explicit port, default given": ("/strict", "http://localhost", 403),
    "null": ("/strict", "null", 403),
    "malformed": ("/strict", "app.example.com", 403),
    "missing, not allowed": ("/strict", None, 403),
    "missing, allowed": ("/lenient", None, 101),
    "refused on lenient": ("/lenient", "https://evil.example", 403),
    "no origins key, any": ("/any", "https://whatever.example", 101),
    "no origins key, missing": ("/any", None, 101),
}


@pytest.mark.parametrize(("path", "origin", "status"), list(ORIGINS.values()), ids=list(ORIGINS))
async def test_origin(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str, origin: str | None, status: int
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, upstream = await start_recording_backend(nursery)
        _, port = await run_proxy(nursery, load(tmp_path, backend, ORIGIN_ROUTES))
        reply = await ask(port, upgrade(path, *([f"Origin: {origin}"] if origin else [])))
        assert reply.status == status, (reply, messages(caplog))
        if status == 403:
            assert reply.body == b"Forbidden\n"
            await assert_nothing_reached(upstream)
            lines = refused(caplog, 403)
            assert len(lines) == 1
            assert (origin or "missing Origin") in lines[0], lines
        else:
            assert upstream.connections == 1
            assert upstream.request().values("Origin") == ([origin.encode()] if origin else [])


@pytest.mark.parametrize("path", ["/strict", "/lenient", "/any"])
async def test_duplicated_origin_is_403_whatever_the_policy(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, upstream = await start_recording_backend(nursery)
        _, port = await run_proxy(nursery, load(tmp_path, backend, ORIGIN_ROUTES))
        reply = await ask(port, upgrade(path, "Origin: https://app.example.com", "Origin: https://app.example.com"))
        assert reply.status == 403
        await assert_nothing_reached(upstream)
        assert any("more than one Origin" in line for line in refused(caplog, 403))


ORDER = {
    "bad Origin + bad token": ("https://evil.example", TOKEN_A + "x", 403, "Origin not allowed"),
    "bad Origin + no token": ("https://evil.example", None, 403, "Origin not allowed"),
    "bad Origin + good token": ("https://evil.example", TOKEN_A, 403, "Origin not allowed"),
    "good Origin + bad token": ("https://app.example.com", TOKEN_A + "x", 401, "unknown token"),
    "good Origin + good token": ("https://app.example.com", TOKEN_A, 101, ""),
}


@pytest.mark.parametrize(("origin", "token", "status", "reason"), list(ORDER.values()), ids=list(ORDER))
async def test_origin_is_checked_before_credentials(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    origin: str, token: str | None, status: int, reason: str,
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        backend, upstream = await start_recording_backend(nursery)
        _, port = await run_proxy(nursery, load(tmp_path, backend, ORIGIN_ROUTES))
        reply = await ask(port, upgrade("/both", f"Origin: {origin}", *([f"Authorization: Bearer {token}"] if token else [])))
        assert reply.status == status
        if status == 101:
            return
        assert reply.values("WWW-Authenticate") == ([INVALID_TOKEN] if status == 401 else [])
        assert any(reason in line for line in refused(caplog, status))
        await assert_nothing_reached(upstream)
    assert_never_logged(caplog, TOKEN_A)
