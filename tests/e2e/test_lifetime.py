"""End to end: sessions ended by their token's expiry, a revocation, forward auth's lifetime or their age.

A real proxy (``App``, config loaded from YAML in ``tmp_path``) on loopback,
real ``websockets`` clients, a trio-websocket backend that records the close
frame it gets, a real HTTP auth service for forward auth, and the reload flow
SIGHUP uses (``App.reload_from``) for revocations. Each test is bounded.

What is not here: the jitter rules and the revoked file's syntax
(``tests/proto/test_lifetime.py``), rebalancing (``test_rebalance.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed as BackendClosed
from trio_websocket import WebSocketRequest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import connect as ws_connect

from tests.authservice import start_auth_service
from tests.support import start_ws_backend
from wsproxy.app import App
from wsproxy.config.load import load_config
from wsproxy.config.schema import Config

SECRET = b"s" * 32
TEST_TIMEOUT_S = 15.0

pytestmark = pytest.mark.usefixtures("relay_driver")


class Backend:
    """An echo backend that remembers the close frames the proxy sent it: (code, reason)."""

    def __init__(self) -> None:
        self.closes: list[tuple[int | None, str | None]] = []

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except BackendClosed as exc:
            self.closes.append((exc.reason.code, exc.reason.reason))


def load(tmp_path: Path, backend_port: int, route: dict[str, Any]) -> tuple[Config, str]:
    document = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "pools": {"main": {"backends": [{"address": f"127.0.0.1:{backend_port}"}]}},
        "routes": [{"pool": "main", **route}],
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(str(path)), str(path)


async def start(nursery: trio.Nursery, config: Config) -> tuple[App, int]:
    app = App(config)
    addresses = await nursery.start(app.serve)
    return app, addresses["edge"][0][1]


def token(sub: str, jti: str, lifetime_s: float) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "jti": jti, "iat": int(now), "exp": now + lifetime_s}, SECRET, algorithm="HS256")


def jwt_route(tmp_path: Path, **auth: Any) -> dict[str, Any]:
    (tmp_path / "hs.key").write_bytes(SECRET)
    return {"auth": {"jwt": {"algorithms": ["HS256"], "secret_file": "hs.key", "leeway": "0s"}, **auth}}


def connect(port: int, bearer: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
    return ws_connect(
        f"ws://127.0.0.1:{port}/", additional_headers=headers, proxy=None, compression=None, open_timeout=5, close_timeout=2
    )


async def closed_by_proxy(ws: Any) -> tuple[int, str, float]:
    """Wait until the proxy closes ``ws``: (code, reason, time.time() when it came)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason, time.time()


def closed_count(app: App, outcome: str) -> int:
    return sum(n for key, n in app.metrics.sessions_closed.items() if key[3] == outcome)


async def test_expired_token_closes_the_session_with_1008(nursery: trio.Nursery, tmp_path: Path) -> None:
    """exp 1.5 s ahead, no leeway: the close comes between exp and exp + 10 % + one sweep."""
    backend = Backend()
    backend_port = await start_ws_backend(nursery, backend.handler)
    app, port = await start(nursery, load(tmp_path, backend_port, jwt_route(tmp_path, enforce_expiry=True))[0])
    with trio.fail_after(TEST_TIMEOUT_S):
        bearer = token("alice", "t-1", 1.5)
        exp = jwt.decode(bearer, options={"verify_signature": False})["exp"]
        async with connect(port, bearer) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            code, reason, at = await closed_by_proxy(ws)
        assert (code, reason) == (1008, "token expired")
        assert exp <= at <= exp + 0.15 + 1.0 + 0.5  # jitter window, the sweep period, a busy machine
        with trio.fail_after(3):
            while not backend.closes:
                await trio.sleep(0.01)
        assert backend.closes == [(1001, "token expired")]
        assert closed_count(app, "token_expired") == 1


async def test_without_enforce_expiry_the_session_outlives_its_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend_port = await start_ws_backend(nursery, Backend().handler)
    _app, port = await start(nursery, load(tmp_path, backend_port, jwt_route(tmp_path))[0])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with connect(port, token("alice", "t-1", 0.5)) as ws:
            await trio.sleep(1.8)
            await ws.send("still here")
            assert await ws.recv() == "still here"


async def test_revoked_tokens_are_refused_and_open_sessions_closed_after_a_reload(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="wsproxy")
    revoked = tmp_path / "revoked"
    revoked.write_text("# revoked\nt-stolen\n")
    backend = Backend()
    backend_port = await start_ws_backend(nursery, backend.handler)
    config, path = load(tmp_path, backend_port, jwt_route(tmp_path, revoked_file="revoked"))
    app, port = await start(nursery, config)
    with trio.fail_after(TEST_TIMEOUT_S):
        stolen = token("mallory", "t-stolen", 600)
        with pytest.raises(InvalidStatus) as info:
            async with connect(port, stolen):
                pass
        assert info.value.response.status_code == 403
        assert any("kind=revoked" in r.getMessage() and "jti is listed" in r.getMessage() for r in caplog.records)
        assert all(stolen not in r.getMessage() for r in caplog.records)
        assert [key[1:] for key in app.metrics.refusals] == [("revoked", "403")]

        async with connect(port, token("alice", "t-1", 600)) as alice, connect(port, token("bob", "t-2", 600)) as bob:
            await bob.send("hi")
            assert await bob.recv() == "hi"
            revoked.write_text("t-stolen\nbob   # subject, after the incident\n")
            await app.reload_from(path, load_config)
            assert app.reloads == 1
            code, reason, _at = await closed_by_proxy(bob)
            assert (code, reason) == (1008, "token revoked")
            await alice.send("unaffected")
            assert await alice.recv() == "unaffected"
            with pytest.raises(InvalidStatus):
                async with connect(port, token("bob", "t-3", 600)):  # a new token for the same subject
                    pass
        assert closed_count(app, "revoked") == 1
        assert sum(n for key, n in app.metrics.refusals.items() if key[1] == "revoked") == 2


async def test_max_session_age_closes_with_1012_spread(nursery: trio.Nursery, tmp_path: Path) -> None:
    """20 sessions opened together with max_session_age 1s end between 0.9 s and 1.1 s (+ a sweep), not together."""
    backend_port = await start_ws_backend(nursery, Backend().handler)
    app, port = await start(nursery, load(tmp_path, backend_port, {"max_session_age": "1s"})[0])
    ends: list[tuple[int, str, float]] = []

    async def one() -> None:
        async with connect(port) as ws:
            opened = time.time()
            code, reason, at = await closed_by_proxy(ws)
            ends.append((code, reason, at - opened))

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as clients:
            for _ in range(20):
                clients.start_soon(one)
    assert {(code, reason) for code, reason, _ in ends} == {(1012, "session lifetime reached")}
    ages = sorted(age for _, _, age in ends)
    assert 0.85 <= ages[0] and ages[-1] <= 1.1 + 0.02 + 0.5, ages  # jitter, sweep period (1/50 of the age), a busy machine
    assert ages[-1] - ages[0] > 0.05, ages  # spread, not one instant
    assert closed_count(app, "lifetime") == 20


async def test_forward_auth_lifetime_bounds_the_session(nursery: trio.Nursery, tmp_path: Path) -> None:
    answers = {b"/ok": (200, [(b"X-Session-Lifetime", b"1")], b""), b"/broken": (200, [(b"X-Session-Lifetime", b"soon")], b"")}
    service = await start_auth_service(nursery, lambda request: answers[request.target])
    backend_port = await start_ws_backend(nursery, Backend().handler)

    def route(target: str) -> dict[str, Any]:
        return {"auth": {"forward": {"url": service.url(target), "lifetime_from": "X-Session-Lifetime"}}}

    app, port = await start(nursery, load(tmp_path, backend_port, route("/ok"))[0])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with connect(port, "whatever") as ws:
            opened = time.time()
            code, reason, at = await closed_by_proxy(ws)
        assert (code, reason) == (1008, "token expired")
        assert 1.0 - 0.05 <= at - opened <= 1.1 + 1.0 + 0.5
        assert closed_count(app, "token_expired") == 1

    _app, port = await start(nursery, load(tmp_path, backend_port, route("/broken"))[0])
    with trio.fail_after(TEST_TIMEOUT_S):
        with pytest.raises(InvalidStatus) as info:
            async with connect(port, "whatever"):
                pass
        assert info.value.response.status_code == 503
