"""Subprotocol policy and routing per route, end to end.

The client is the ``websockets`` library (its trio client); the backends are
trio-websocket servers that record the Sec-WebSocket-Protocol offer they
received and choose as each test says. The config goes through the real
loader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect as ws_connect

from wsproxy.app import App
from wsproxy.config.load import load_config

from tests.kit.servers import raw_request, start_tcp_backend, status_of
from wsproxy.proto.handshake import accept_key


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")


@dataclass
class Backend:
    """A backend that records each offer and answers with ``choose(offer)`` (None: no subprotocol)."""

    name: str
    choose: Callable[[list[str]], str | None] = lambda offer: offer[0] if offer else None
    offers: list[list[str]] = field(default_factory=list)
    port: int = 0

    async def handler(self, request: WebSocketRequest) -> None:
        offer = list(request.proposed_subprotocols)
        self.offers.append(offer)
        ws = await request.accept(subprotocol=self.choose(offer))
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(f"{self.name}:{message}")
        except ConnectionClosed:
            pass


async def start(nursery: trio.Nursery, backend: Backend) -> Backend:
    server = await nursery.start(serve_websocket, backend.handler, "127.0.0.1", 0, None)
    backend.port = server.port
    return backend


async def run_proxy(nursery: trio.Nursery, tmp_path: Path, routes: list[dict[str, Any]], pools: dict[str, Backend]) -> int:
    document = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "routes": routes,
        "pools": {name: {"backends": [{"address": f"127.0.0.1:{b.port}"}]} for name, b in pools.items()},
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    app = App(load_config(str(path)))
    addresses = await nursery.start(app.serve)
    return int(addresses["edge"][0][1])


async def talk(port: int, path: str, offer: list[str] | None) -> tuple[str | None, str]:
    """Open a session offering ``offer``; the negotiated subprotocol and the answer to "hi"."""
    async with ws_connect(
        f"ws://127.0.0.1:{port}{path}", subprotocols=offer,  # type: ignore[arg-type]
        proxy=None, compression=None, open_timeout=5, close_timeout=2,
    ) as ws:
        await ws.send("hi")
        return ws.subprotocol, str(await ws.recv())


async def refused_status(port: int, path: str, offer: list[str] | None) -> int:
    with pytest.raises(InvalidStatus) as info:
        await talk(port, path, offer)
    return int(info.value.response.status_code)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=refused" in r.getMessage()]


async def test_graphql_protocols_on_one_path_go_to_different_pools(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(15):
        modern = await start(nursery, Backend("modern"))
        legacy = await start(nursery, Backend("legacy"))
        rest = await start(nursery, Backend("rest"))
        port = await run_proxy(
            nursery,
            tmp_path,
            [
                {"path": "/graphql", "subprotocol": "graphql-transport-ws", "pool": "modern"},
                {"path": "/graphql", "subprotocol": "graphql-ws", "pool": "legacy"},
                {"path": "/", "pool": "rest"},
            ],
            {"modern": modern, "legacy": legacy, "rest": rest},
        )
        assert await talk(port, "/graphql", ["graphql-transport-ws"]) == ("graphql-transport-ws", "modern:hi")
        assert await talk(port, "/graphql", ["graphql-ws"]) == ("graphql-ws", "legacy:hi")
        # An offer of both goes to the first route that matches (config order), with the whole offer.
        assert await talk(port, "/graphql", ["graphql-ws", "graphql-transport-ws"]) == ("graphql-ws", "modern:hi")
        assert await talk(port, "/graphql", None) == (None, "rest:hi")
        assert modern.offers == [["graphql-transport-ws"], ["graphql-ws", "graphql-transport-ws"]]
        assert legacy.offers == [["graphql-ws"]]
        assert rest.offers == [[]]


async def test_the_offer_is_filtered_in_the_clients_order(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(15):
        chat = await start(nursery, Backend("chat"))
        port = await run_proxy(
            nursery, tmp_path, [{"path": "/chat", "subprotocols": ["chat.v1", "chat.v2"], "pool": "chat"}], {"chat": chat}
        )
        assert await talk(port, "/chat", ["chat.v3", "chat.v2", "x-debug", "chat.v1"]) == ("chat.v2", "chat:hi")
        assert await talk(port, "/chat", None) == (None, "chat:hi")  # not required: an empty offer passes
        assert chat.offers == [["chat.v2", "chat.v1"], []]


async def test_an_offer_with_nothing_allowed_is_400_and_reaches_no_backend(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(15):
        chat = await start(nursery, Backend("chat"))
        port = await run_proxy(
            nursery, tmp_path, [{"path": "/chat", "subprotocols": ["chat.v2", "chat.v1"], "pool": "chat"}], {"chat": chat}
        )
        assert await refused_status(port, "/chat", ["chat.v3", "Chat.V2"]) == 400
        assert chat.offers == []
        (line,) = refusals(caplog)
        assert "kind=subprotocol status=400" in line
        assert 'reason="none of the 2 offered subprotocol(s) is allowed on this route (allowed: chat.v2, chat.v1)"' in line


async def test_subprotocol_required_refuses_an_empty_offer(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(15):
        mqtt = await start(nursery, Backend("mqtt"))
        port = await run_proxy(
            nursery,
            tmp_path,
            [{"path": "/mqtt", "subprotocols": ["mqtt", "mqttv3.1"], "subprotocol_required": True, "pool": "mqtt"}],
            {"mqtt": mqtt},
        )
        assert await refused_status(port, "/mqtt", None) == 400
        assert await talk(port, "/mqtt", ["mqttv3.1"]) == ("mqttv3.1", "mqtt:hi")
        assert mqtt.offers == [["mqttv3.1"]]
        (line,) = refusals(caplog)
        assert 'reason="no subprotocol offered; the route requires one (allowed: mqtt, mqttv3.1)"' in line


async def test_the_backend_must_choose_from_what_was_forwarded(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client offered chat.v3 but the route filtered it out: a backend that picks it
    anyway picks something it was never offered (RFC 6455 §4.1): 502. (A raw backend:
    WebSocket libraries refuse to answer with a subprotocol that was not offered.)"""
    heads: list[bytes] = []

    async def sneaky(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        heads.append(head)
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\nSec-WebSocket-Protocol: chat.v3\r\n\r\n"
        )
        await trio.sleep(5)

    with trio.fail_after(15):
        backend = Backend("sneaky", port=await start_tcp_backend(nursery, sneaky))
        port = await run_proxy(nursery, tmp_path, [{"path": "/", "subprotocols": ["chat.v1"], "pool": "sneaky"}], {"sneaky": backend})
        assert await refused_status(port, "/", ["chat.v3", "chat.v1"]) == 502
        (head,) = heads
        assert b"\r\nSec-WebSocket-Protocol: chat.v1\r\n" in head and b"chat.v3" not in head
        assert any("backend chose a subprotocol the client did not offer: chat.v3" in line for line in refusals(caplog))


async def test_a_subprotocol_route_without_a_matching_offer_is_404(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(15):
        v2 = await start(nursery, Backend("v2"))
        port = await run_proxy(nursery, tmp_path, [{"path": "/chat", "subprotocol": "chat.v2", "pool": "v2"}], {"v2": v2})
        request = (
            b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: chat.v1\r\n\r\n"
        )
        assert status_of(await raw_request(port, request)) == 404
        assert v2.offers == []


async def test_credentials_offered_as_subprotocols_are_taken_out_before_the_policy(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """auth.sources: [subprotocol] — the access_token.<token> entry is a credential, not a
    subprotocol: it never counts against the list, and never reaches the backend."""
    import hashlib

    token = "t0k3n-for-the-chat-bot"
    with trio.fail_after(15):
        chat = await start(nursery, Backend("chat"))
        auth = {"sources": ["subprotocol"], "tokens": [{"name": "bot", "sha256": hashlib.sha256(token.encode()).hexdigest()}]}
        port = await run_proxy(
            nursery,
            tmp_path,
            [{"path": "/", "subprotocols": ["chat.v1"], "subprotocol_required": True, "auth": auth, "pool": "chat"}],
            {"chat": chat},
        )
        assert await talk(port, "/", [f"access_token.{token}", "chat.v9", "chat.v1"]) == ("chat.v1", "chat:hi")
        # Only the credential: the offer is empty once it is out, and the route requires one.
        assert await refused_status(port, "/", [f"access_token.{token}"]) == 400
        assert chat.offers == [["chat.v1"]]
    assert all(token not in r.getMessage() for r in caplog.records)
