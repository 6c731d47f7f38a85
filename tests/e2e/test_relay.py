"""End to end: the established-session data path, over loopback with real peers.

Every test runs the proxy in-process (``start_proxy``) between a real client
(trio-websocket, the ``websockets`` sync client in a worker thread, or a raw
TCP client that writes frames built here by hand) and a real backend
(trio-websocket, a ``websockets`` server in a thread, or a raw TCP backend
that does the RFC 6455 server handshake by hand). Results are asserted
exactly: payloads, close codes and reasons, who saw what.

The raw peers use the test kit's frame codec (``tests.kit.ws``: ``frame`` / ``FrameReader``),
not the proxy's, so a bug in ``proto.frames`` cannot hide itself.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
import websockets.exceptions
import websockets.sync.client
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

from tests.kit.servers import (
    Recorder,
    make_config,
    start_proxy,
    start_tcp_backend,
    start_ws_backend,
    websockets_backend,
    with_timeouts,
)
from tests.kit.wait import until
from tests.kit.ws import (
    Frame,
    FrameReader,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_for,
    client_frame,
    close_payload,
    frame,
    header,
    raw_accept,
    raw_client,
    read_head_rest,
)
from wsproxy.config.schema import Config, DrainConfig, LimitsConfig, PoolName, RouteConfig, ShutdownConfig

pytestmark = pytest.mark.usefixtures("relay_driver")  # every test with the engine and with trio pumps


MIB = 1024 * 1024


# -- recording backends and small helpers ------------------------------------------------------


def url(port: int, path: str = "/") -> str:
    return f"ws://127.0.0.1:{port}{path}"


async def echo_once(port: int, message: str | bytes = "still here") -> None:
    async with open_websocket_url(url(port)) as ws:
        await ws.send_message(message)
        assert await ws.get_message() == message


async def closed_with(ws: Any) -> tuple[int, str | None]:
    """Read a trio-websocket connection until it is closed; the close reason it got."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    return reason.code, reason.reason


async def send_then_closed(ws: Any, message: str | bytes) -> tuple[int, str | None]:
    """Send ``message``; the close reason the connection got (during or after the send)."""
    try:
        await ws.send_message(message)
    except ConnectionClosed as exc:
        assert exc.reason is not None
        return exc.reason.code, exc.reason.reason
    return await closed_with(ws)


def ws_connect(port: int, **kw: Any) -> websockets.sync.client.ClientConnection:
    """The websockets sync client, with bounded timeouts and no environment proxy."""
    kw.setdefault("open_timeout", 5)
    kw.setdefault("close_timeout", 5)
    return websockets.sync.client.connect(url(port), proxy=None, **kw)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


def the_session(app: Any) -> Any:
    assert len(app.sessions) == 1, app.sessions
    return next(iter(app.sessions.values()))


# -- 1. echo ---------------------------------------------------------------------------------


ECHO_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 200_000]


async def test_text_and_binary_echo_trio_websocket(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        backend = await start_ws_backend(nursery)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as ws:
            for size in ECHO_SIZES:
                text = "".join(chr(0x41 + i % 26) for i in range(size - 1)) + ("é" if size else "")
                await ws.send_message(text)
                assert await ws.get_message() == text
                data = os.urandom(size)
                await ws.send_message(data)
                assert await ws.get_message() == data


async def test_text_and_binary_echo_websockets_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        backend = await start_ws_backend(nursery)
        app, port = await start_proxy(nursery, make_config([backend]))

        def client() -> list[tuple[str | bytes, str | bytes]]:
            pairs: list[tuple[str | bytes, str | bytes]] = []
            with ws_connect(port, compression=None) as ws:
                for size in ECHO_SIZES:
                    text = "ü" * size
                    ws.send(text)
                    pairs.append((text, ws.recv(timeout=5)))
                    data = os.urandom(size)
                    ws.send(data)
                    pairs.append((data, ws.recv(timeout=5)))
            return pairs

        for sent, got in await in_thread(client):
            assert type(got) is type(sent)
            assert got == sent


# -- 2. fragmentation with interleaved pings ---------------------------------------------------


async def test_fragmented_message_with_interleaved_pings(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        # Each piece in its own send so the proxy sees them as separate chunks too.
        for piece in (
            client_frame(OP_TEXT, b"hello ", fin=False),
            client_frame(OP_PING, b"p1"),
            client_frame(OP_CONT, b"fragmented ", fin=False),
            client_frame(OP_PING, b"p2"),
            client_frame(OP_CONT, "wörld".encode(), fin=True),
        ):
            await stream.send_all(piece)
            await trio.sleep(0.01)
        seen = []
        while True:
            f = await reader.read()
            assert f is not None, "proxy closed the connection"
            seen.append(f)
            if f.opcode == OP_TEXT:
                break
        assert [(f.opcode, f.payload) for f in seen] == [
            (OP_PONG, b"p1"),
            (OP_PONG, b"p2"),
            (OP_TEXT, "hello fragmented wörld".encode()),
        ]
        assert all(f.fin and not f.masked and f.rsv == 0 for f in seen)
        assert rec.received == [["hello fragmented wörld"]]
        # And the same message split byte by byte on the wire.
        wire = (
            client_frame(OP_BINARY, b"ab", fin=False)
            + client_frame(OP_PING, b"p3")
            + client_frame(OP_CONT, b"cd", fin=True)
        )
        for i in range(len(wire)):
            await stream.send_all(wire[i : i + 1])
        got = [await reader.read(), await reader.read()]
        assert [(f.opcode, f.payload) for f in got if f] == [(OP_PONG, b"p3"), (OP_BINARY, b"abcd")]
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1000)))
        _, close = await reader.read_until_close()
        assert close is not None and close.close == (1000, "")
        await stream.aclose()
        await until(lambda: rec.closes == [(1000, "")], what="backend close", show=lambda: rec.closes)


# -- 3. message size limit ---------------------------------------------------------------------


async def test_16_mib_message_echoed_intact_with_default_limit(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        rec = Recorder()
        server = await nursery.start(partial(serve_websocket, rec.handler, "127.0.0.1", 0, None, max_message_size=32 * MIB))
        app, port = await start_proxy(nursery, make_config([server.port]))
        assert app.generation.config.limits.max_message_bytes == 16 * MIB

        def client() -> tuple[bool, bool, int]:
            payload = os.urandom(16 * MIB)
            with ws_connect(port, compression=None, max_size=32 * MIB) as ws:
                ws.send(payload)
                back = ws.recv(timeout=20)
                return back == payload, isinstance(back, bytes), len(back)

        assert await in_thread(client) == (True, True, 16 * MIB)
        assert rec.errors == []


async def test_16_mib_plus_one_is_refused_with_default_limit(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        rec = Recorder()
        server = await nursery.start(partial(serve_websocket, rec.handler, "127.0.0.1", 0, None, max_message_size=32 * MIB))
        app, port = await start_proxy(nursery, make_config([server.port]))
        async with open_websocket_url(url(port), max_message_size=32 * MIB) as ws:
            # The proxy answers from the header: the close may arrive while we are still sending.
            assert await send_then_closed(ws, b"x" * (16 * MIB + 1)) == (1009, f"message of more than {16 * MIB} bytes (at least {16 * MIB + 1})")
        await until(lambda: rec.closes == [(1001, "peer sent a message too big")], what="backend close", show=lambda: rec.closes)
        assert rec.received == [[]]


def small_limit_config(backend: int) -> Any:
    return make_config([backend], limits=LimitsConfig(max_message_bytes=1000))


async def test_message_over_limit_from_client(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, small_limit_config(backend))
        async with open_websocket_url(url(port)) as healthy, open_websocket_url(url(port)) as ws:
            await ws.send_message(b"a" * 1000)  # exactly the limit: fine
            assert await ws.get_message() == b"a" * 1000
            await ws.send_message(b"b" * 1001)
            assert await closed_with(ws) == (1009, "message of more than 1000 bytes (at least 1001)")
            await until(lambda: (1001, "peer sent a message too big") in rec.closes, what="backend close", show=lambda: rec.closes)
            await healthy.send_message("ok")
            assert await healthy.get_message() == "ok"
        assert sorted(map(len, rec.received[1])) == [1000]  # the offending message never reached it
        # Logged as what it is (issue 17 item 8), not as a protocol error.
        def closes() -> list[str]:
            return [r.getMessage() for r in caplog.records if "event=close " in r.getMessage() and "by=proxy" in r.getMessage()]

        await until(lambda: bool(closes()), what="close logged", show=closes)
        assert 'reason="client sent a message of more than 1000 bytes (at least 1001)"' in closes()[0], closes()


async def test_fragmented_message_over_limit_from_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, small_limit_config(backend))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_BINARY, b"x" * 600, fin=False))
        await stream.send_all(client_frame(OP_CONT, b"y" * 401, fin=True))
        frames, close = await reader.read_until_close()
        assert frames == []
        assert close is not None and close.close == (1009, "message of more than 1000 bytes (at least 1001)")
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1009)))
        await until(lambda: rec.closes == [(1001, "peer sent a message too big")], what="backend close", show=lambda: rec.closes)
        assert await reader.read_eof() == b""
        assert rec.received == [[]]


async def test_message_over_limit_from_backend(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        # trio-websocket (wsproto 1.3) refuses 1014 as reserved: the route sends 1011 instead.
        config = small_limit_config(backend)
        config = dataclasses.replace(config, routes=(RouteConfig(pool=PoolName("main"), backend_failure_close_code=1011),))
        app, port = await start_proxy(nursery, config)
        async with open_websocket_url(url(port)) as healthy, open_websocket_url(url(port)) as ws:
            await ws.send_message("big please")
            assert await closed_with(ws) == (1011, "backend sent a message of more than 1000 bytes (at least 1001)")
            await until(lambda: (1009, "message of more than 1000 bytes (at least 1001)") in rec.closes, what="backend close", show=lambda: rec.closes)
            await healthy.send_message("ok")
            assert await healthy.get_message() == "ok"


# -- 4. ping/pong ------------------------------------------------------------------------------


async def test_ping_pong_both_ways_trio_websocket(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as ws:
            await ws.ping(b"from-client")  # returns once the backend's pong came back
            await ws.send_message("ping me")  # the backend pings us, waits for our pong, then answers
            assert await ws.get_message() == "pong ok"
        assert rec.received == [["ping me"]]


async def test_ping_pong_both_ways_raw_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_PING, b"raw-ping"))
        f = await reader.read()
        assert f is not None and (f.opcode, f.payload) == (OP_PONG, b"raw-ping")
        await stream.send_all(client_frame(OP_TEXT, b"ping me"))
        f = await reader.read()
        assert f is not None and (f.opcode, f.payload, f.masked) == (OP_PING, b"from-backend", False)
        await stream.send_all(client_frame(OP_PONG, f.payload))
        f = await reader.read()
        assert f is not None and (f.opcode, f.payload) == (OP_TEXT, b"pong ok")
        await stream.aclose()


async def test_ping_pong_websockets_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        backend = await start_ws_backend(nursery, Recorder().handler)
        app, port = await start_proxy(nursery, make_config([backend]))

        def client() -> tuple[bool, str | bytes]:
            with ws_connect(port) as ws:
                ponged = ws.ping(b"abc").wait(timeout=3)
                ws.send("ping me")
                return ponged, ws.recv(timeout=3)

        assert await in_thread(client) == (True, "pong ok")


# -- 5. close codes and reasons ----------------------------------------------------------------


async def test_client_close_code_and_reason_reach_backend(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            await ws.aclose(4000, "bye")
            assert ws.closed is not None and ws.closed.code == 4000  # the backend echoed it
        await until(lambda: rec.closes == [(4000, "bye")], what="backend close", show=lambda: rec.closes)
        await until(lambda: not app.sessions, what="session end")
    closes = [r.getMessage() for r in caplog.records if "event=close " in r.getMessage()]
    assert len(closes) == 1, closes
    assert "by=client" in closes[0] and "reason=close" in closes[0]
    assert "client_code=4000" in closes[0] and "backend_code=4000" in closes[0]
    assert "up_msgs=1 down_msgs=1" in closes[0]


async def test_backend_close_code_and_reason_reach_client(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as ws:
            await ws.send_message("close me")
            assert await closed_with(ws) == (4001, "later")
        await until(lambda: not app.sessions, what="session end")
    closes = [r.getMessage() for r in caplog.records if "event=close " in r.getMessage()]
    assert len(closes) == 1, closes
    assert "by=backend" in closes[0] and "backend_code=4001" in closes[0] and "client_code=4001" in closes[0]


async def test_close_codes_both_ways_websockets_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))

        def client_closes() -> tuple[int, str | None] | None:
            with ws_connect(port) as ws:
                ws.send("x")
                ws.recv(timeout=3)
                ws.close(4000, "bye")
                return (ws.close_code, ws.close_reason) if ws.close_code is not None else None

        def backend_closes() -> tuple[int, str]:
            with ws_connect(port) as ws:
                ws.send("close me")
                with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                    ws.recv(timeout=3)
                assert info.value.rcvd is not None
                return info.value.rcvd.code, info.value.rcvd.reason

        assert await in_thread(client_closes) == (4000, "bye")
        await until(lambda: (4000, "bye") in rec.closes, what="backend close", show=lambda: rec.closes)
        assert await in_thread(backend_closes) == (4001, "later")


# -- 6. permessage-deflate end to end ----------------------------------------------------------


async def test_permessage_deflate_end_to_end(nursery: trio.Nursery) -> None:
    backend_saw: list[tuple[str | None, str | None]] = []  # (offered, accepted)

    def handler(ws: Any) -> None:
        backend_saw.append(
            (ws.request.headers.get("Sec-WebSocket-Extensions"), ws.response.headers.get("Sec-WebSocket-Extensions"))
        )
        try:
            for msg in ws:
                ws.send(msg)
        except websockets.exceptions.ConnectionClosed:
            pass

    text = "compress me please " * 5000  # 95 kB, very compressible
    data = bytes(200_000)
    fragments = ["frag-" * 1000, "ment-" * 1000, "ed"]
    counters: list[tuple[int, int]] = []

    def read_counters() -> None:
        relay = the_session(app).relay
        counters.append((relay.bytes_up, relay.bytes_down))

    def client() -> tuple[str | None, list[Any]]:
        echoed = []
        with ws_connect(port) as ws:  # compression="deflate" is the default
            for msg in (text, data):
                ws.send(msg)
                echoed.append(ws.recv(timeout=5))
                trio.from_thread.run_sync(read_counters)
            # A fragmented compressed message: RSV1 on its first frame only (RFC 7692 §6).
            ws.send(iter(fragments))
            echoed.append(ws.recv(timeout=5))
            trio.from_thread.run_sync(read_counters)
            assert ws.response is not None
            return ws.response.headers.get("Sec-WebSocket-Extensions"), echoed

    with trio.fail_after(10), websockets_backend(handler, compression="deflate") as backend:
        app, port = await start_proxy(nursery, make_config([backend]))
        extensions, echoed = await in_thread(client)
        assert extensions is not None and extensions.startswith("permessage-deflate")
        assert echoed == [text, data, "".join(fragments)]
        assert len(backend_saw) == 1
        offered, accepted = backend_saw[0]
        assert offered is not None and "permessage-deflate" in offered
        assert accepted == extensions  # the client got the backend's choice as it was
        # Compressed on the wire, both ways: far fewer bytes relayed than the payloads hold.
        (up1, down1), (up2, down2), (up3, down3) = counters
        assert 0 < up1 < len(text) // 20 and 0 < down1 < len(text) // 20, counters[0]
        assert up2 - up1 < len(data) // 20 and down2 - down1 < len(data) // 20, counters[1]
        assert up3 - up2 < 10_002 // 5 and down3 - down2 < 10_002 // 5, counters[2]
        await until(lambda: not app.sessions, what="session end")


# -- 7. subprotocols ---------------------------------------------------------------------------


async def test_subprotocol_negotiated(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder(subprotocol="b")
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port), subprotocols=["a", "b"]) as ws:
            assert ws.subprotocol == "b"
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"

        def client() -> str | None:
            with ws_connect(port, subprotocols=["a", "b"]) as c:
                return c.subprotocol

        assert await in_thread(client) == "b"
        assert rec.offered == [["a", "b"], ["a", "b"]]


# -- 8. data in the same segment as the 101 ----------------------------------------------------


async def test_backend_message_in_same_segment_as_101(nursery: trio.Nursery) -> None:
    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream, then=frame(OP_TEXT, b"first") + frame(OP_BINARY, b"\x00second"))
        while (f := await reader.read()) is not None:
            if f.opcode == OP_CLOSE:
                await stream.send_all(frame(OP_CLOSE, f.payload))
                break
            await stream.send_all(frame(f.opcode, f.payload))
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as ws:
            assert await ws.get_message() == "first"
            assert await ws.get_message() == b"\x00second"
            await ws.send_message("then echo")
            assert await ws.get_message() == "then echo"

        def client() -> list[str | bytes]:
            with ws_connect(port, compression=None) as c:
                return [c.recv(timeout=3), c.recv(timeout=3)]

        assert await in_thread(client) == ["first", b"\x00second"]


# -- 9. hostile frames -------------------------------------------------------------------------


HOSTILE_CLIENT_FRAMES = {
    "unmasked frame": lambda: frame(OP_TEXT, b"naked"),
    "reserved data opcode": lambda: client_frame(0x3, b"x"),
    "reserved control opcode": lambda: client_frame(0xB, b"x"),
    "RSV1 without extension": lambda: client_frame(OP_TEXT, b"x", rsv=0x40),
    "RSV2 without extension": lambda: client_frame(OP_TEXT, b"x", rsv=0x20),
    "control frame over 125 bytes": lambda: client_frame(OP_PING, b"p" * 126),
    "fragmented ping": lambda: client_frame(OP_PING, b"p", fin=False),
    "64-bit length with top bit": lambda: bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + os.urandom(4),
    "close with a 1-byte payload": lambda: client_frame(OP_CLOSE, b"\x03"),
    "continuation without a message": lambda: client_frame(OP_CONT, b"x"),
    "new message inside a fragmented one": lambda: client_frame(OP_TEXT, b"a", fin=False)
    + client_frame(OP_TEXT, b"b"),
}


@pytest.mark.parametrize("segment", ["same", "separate"])
@pytest.mark.parametrize("kind", list(HOSTILE_CLIENT_FRAMES))
async def test_hostile_frame_from_client(nursery: trio.Nursery, kind: str, segment: str) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as healthy:
            await healthy.send_message("warm")
            assert await healthy.get_message() == "warm"
            stream, reader, _ = await raw_client(port)
            hostile = HOSTILE_CLIENT_FRAMES[kind]()
            if segment == "same":
                # A valid message and the hostile frame in one segment: the first must pass.
                await stream.send_all(client_frame(OP_TEXT, b"before") + hostile)
                frames, close = await reader.read_until_close()
                # The echo of "before" may or may not beat the proxy's close frame.
                assert [(f.opcode, f.payload) for f in frames] in ([], [(OP_TEXT, b"before")])
            else:
                await stream.send_all(client_frame(OP_TEXT, b"before"))
                echo = await reader.read()
                assert echo is not None and echo.payload == b"before"
                await stream.send_all(hostile)
                frames, close = await reader.read_until_close()
                assert frames == []
            assert close is not None and not close.masked
            assert close.close[0] == 1002, close
            await stream.send_all(client_frame(OP_CLOSE, close_payload(1002)))
            await until(lambda: (1001, "peer protocol error") in rec.closes, what="backend close", show=lambda: rec.closes)
            assert await reader.read_eof() == b""
            await stream.aclose()
            assert rec.received[1] == ["before"]
            await healthy.send_message("after")
            assert await healthy.get_message() == "after"
        await echo_once(port)
        await until(lambda: not app.sessions, what="sessions end")


HOSTILE_BACKEND_FRAMES = {
    "masked frame": lambda: frame(OP_TEXT, b"masked", mask=os.urandom(4)),
    "reserved data opcode": lambda: frame(0x4, b"x"),
    "reserved control opcode": lambda: frame(0xC, b"x"),
    "RSV1 without extension": lambda: frame(OP_BINARY, b"x", rsv=0x40),
    "control frame over 125 bytes": lambda: frame(OP_PONG, b"p" * 200),
    "fragmented ping": lambda: frame(OP_PING, b"p", fin=False),
    "close with a 1-byte payload": lambda: frame(OP_CLOSE, b"\x03"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_BACKEND_FRAMES))
async def test_hostile_frame_from_backend(nursery: trio.Nursery, kind: str) -> None:
    backend_saw: list[tuple[list[Frame], Frame | None]] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        head, reader = await raw_accept(stream)
        if b"GET /raw " not in head:  # the healthy sessions: echo
            while (f := await reader.read()) is not None and f.opcode != OP_CLOSE:
                await stream.send_all(frame(f.opcode, f.payload))
            if f is not None:
                await stream.send_all(frame(OP_CLOSE, f.payload))
            await stream.aclose()
            return
        await stream.send_all(frame(OP_TEXT, b"before") + HOSTILE_BACKEND_FRAMES[kind]())
        backend_saw.append(await reader.read_until_close())
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        async with open_websocket_url(url(port)) as healthy:
            await healthy.send_message("warm")
            assert await healthy.get_message() == "warm"
            stream, reader, _ = await raw_client(port)
            frames, close = await reader.read_until_close()
            assert [(f.opcode, f.payload) for f in frames] == [(OP_TEXT, b"before")]
            assert close is not None and close.close[0] == 1014, close
            assert close.close[1].startswith("backend protocol error: "), close
            await stream.send_all(client_frame(OP_CLOSE, close_payload(1014)))
            assert await reader.read_eof() == b""
            await stream.aclose()
            await until(lambda: bool(backend_saw), what="backend read")
            seen, backend_close = backend_saw[0]
            assert seen == []
            assert backend_close is not None and backend_close.masked
            assert backend_close.close[0] == 1002, backend_close.close
            await healthy.send_message("after")
            assert await healthy.get_message() == "after"
        await echo_once(port)


async def test_hostile_frame_from_backend_trio_websocket_client(nursery: trio.Nursery) -> None:
    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream, then=frame(OP_TEXT, b"hello") + frame(OP_TEXT, b"x", mask=b"abcd"))
        await reader.read_until_close()
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        routes = (RouteConfig(pool=PoolName("main"), backend_failure_close_code=1011),)
        app, port = await start_proxy(nursery, make_config([backend], routes=routes))
        async with open_websocket_url(url(port)) as ws:
            assert await ws.get_message() == "hello"
            assert await closed_with(ws) == (1011, "backend protocol error: masked frame from the server")


# -- 10. a side that dies ----------------------------------------------------------------------


async def test_backend_closes_tcp_without_close_frame(nursery: trio.Nursery) -> None:
    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream, then=frame(OP_TEXT, b"last words"))
        await reader.read()  # the client's "go"
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        f = await reader.read()
        assert f is not None and (f.opcode, f.payload) == (OP_TEXT, b"last words")
        await stream.send_all(client_frame(OP_TEXT, b"go"))
        with trio.fail_after(1):
            frames, close = await reader.read_until_close()
        assert frames == []
        assert close is not None and not close.masked and close.close == (1014, "backend went away")
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1014)))
        assert await reader.read_eof() == b""
        await stream.aclose()
        await until(lambda: not app.sessions, what="session end")

        # The same with the websockets client, which knows 1014 (trio-websocket's wsproto
        # rejects it as an unknown reserved code and answers 1002).
        def client() -> tuple[str | bytes, int, str]:
            with ws_connect(port) as ws:
                first = ws.recv(timeout=3)
                ws.send("go")
                with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                    ws.recv(timeout=1)
                assert info.value.rcvd is not None
                return first, info.value.rcvd.code, info.value.rcvd.reason

        assert await in_thread(client) == ("last words", 1014, "backend went away")


async def test_backend_dies_inside_a_frame(nursery: trio.Nursery) -> None:
    """No boundary to place a close frame at: the client's TCP is closed without one (§7.1.7)."""

    async def backend_handler(stream: trio.SocketStream) -> None:
        await raw_accept(stream, then=frame(OP_BINARY, length=100)[:2] + b"0123456789")
        await trio.sleep(0.05)
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        with trio.fail_after(1):
            assert await reader.read_eof() == bytes([0x82, 100]) + b"0123456789"
        await stream.aclose()
        await until(lambda: not app.sessions, what="session end")


async def test_trio_websocket_backend_cancelled(nursery: trio.Nursery) -> None:
    backend_scope = trio.CancelScope()

    async def run_backend(*, task_status: trio.TaskStatus[int]) -> None:
        with backend_scope:
            async with trio.open_nursery() as backend_nursery:
                task_status.started(await start_ws_backend(backend_nursery))
                await trio.sleep_forever()

    with trio.fail_after(5):
        backend = await nursery.start(run_backend)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_TEXT, b"hi"))
        f = await reader.read()
        assert f is not None and (f.opcode, f.payload) == (OP_TEXT, b"hi")
        backend_scope.cancel()
        with trio.fail_after(1):
            frames, close = await reader.read_until_close()
        assert frames == []
        assert close is not None and close.close == (1014, "backend went away")
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1014)))
        assert await reader.read_eof() == b""
        await stream.aclose()
        await until(lambda: not app.sessions, what="session end")


async def test_client_vanishes(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_TEXT, b"hi"))
        f = await reader.read()
        assert f is not None and f.payload == b"hi"
        await stream.aclose()
        with trio.fail_after(1):
            await until(lambda: rec.closes == [(1001, "client went away")], what="backend close", show=lambda: rec.closes)
        await until(lambda: not app.sessions, what="session end")
        await echo_once(port)


async def test_client_vanishes_mid_frame(nursery: trio.Nursery) -> None:
    """No close frame can be placed inside a frame: the backend's TCP is closed (1006 there)."""
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_BINARY, b"z" * 100)[:50])
        await trio.sleep(0.05)
        await stream.aclose()
        with trio.fail_after(1):
            await until(lambda: len(rec.closes) == 1, what="backend close", show=lambda: rec.closes)
        assert rec.closes[0][0] == 1006
        await until(lambda: not app.sessions, what="session end")


# -- 11. idle timeout --------------------------------------------------------------------------


async def test_idle_timeout(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, with_timeouts(make_config([backend]), idle_s=0.3))
        async with open_websocket_url(url(port)) as ws:
            # Busy for 1 s (over three idle periods): never closed.
            for i in range(10):
                await trio.sleep(0.1)
                await ws.send_message(f"m{i}")
                assert await ws.get_message() == f"m{i}"
            start = trio.current_time()  # silence from here on
            assert rec.closes == []
            assert await closed_with(ws) == (1001, "idle timeout")
            elapsed = trio.current_time() - start
            assert 0.28 <= elapsed <= 0.7, elapsed
        await until(lambda: rec.closes == [(1001, "idle timeout")], what="backend close", show=lambda: rec.closes)
        await until(lambda: not app.sessions, what="session end")


# -- 12. graceful shutdown ---------------------------------------------------------------------


async def test_graceful_shutdown(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        client_closes: list[tuple[int, str | None]] = []
        async with trio.open_nursery() as proxy_nursery:
            # No spread: the closes go out at once (test_ops covers the spread).
            config = dataclasses.replace(make_config([backend]), shutdown=ShutdownConfig(spread_s=0))
            app, port = await start_proxy(proxy_nursery, config)

            async def client(i: int, ready: trio.Event) -> None:
                async with open_websocket_url(url(port)) as ws:
                    await ws.send_message(f"c{i}")
                    assert await ws.get_message() == f"c{i}"
                    ready.set()
                    client_closes.append(await closed_with(ws))

            async with trio.open_nursery() as clients:
                readies = [trio.Event() for _ in range(3)]
                for i, ready in enumerate(readies):
                    clients.start_soon(client, i, ready)
                for ready in readies:
                    await ready.wait()
                assert len(app.sessions) == 3
                app.shutdown()
                shutdown_at = trio.current_time()
            # leaving proxy_nursery means app.serve returned
        assert trio.current_time() - shutdown_at < 1.0  # the close handshakes, not the drain deadline
        assert client_closes == [(1001, "proxy shutting down")] * 3
        assert rec.closes == [(1001, "proxy shutting down")] * 3
        assert app.sessions == {}
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    messages = [r.getMessage() for r in caplog.records]
    assert "event=shutdown sessions=3 spread_s=0.0 timeout_s=30.0" in messages
    assert messages[-1] == "event=stopped"


# -- boundaries, deadlines and early data --------------------------------------------------------


async def test_client_violation_waits_for_the_frame_in_flight_to_the_client(nursery: trio.Nursery) -> None:
    """The 1002 for the client goes after the backend's frame that is half-way to it, not inside it."""
    payload = os.urandom(100_000)
    backend_saw: list[tuple[list[Frame], Frame | None]] = []
    go_on = trio.Event()

    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream)
        whole = frame(OP_BINARY, payload)
        await stream.send_all(whole[:30_000])
        await go_on.wait()
        await stream.send_all(whole[30_000:])
        backend_saw.append(await reader.read_until_close())
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        while len(reader.buf) < 30_000:  # the first part of the frame has reached us
            await reader.fill(len(reader.buf) + 1)
        await stream.send_all(client_frame(0x3, b"bad"))
        await trio.sleep(0.1)
        go_on.set()
        frames, close = await reader.read_until_close()
        assert [(f.opcode, f.payload) for f in frames] == [(OP_BINARY, payload)]
        assert close is not None and close.close[0] == 1002
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1002)))
        await until(lambda: bool(backend_saw), what="backend read")
        seen, backend_close = backend_saw[0]
        assert seen == [] and backend_close is not None and backend_close.close == (1001, "peer protocol error")
        assert await reader.read_eof() == b""
        await stream.aclose()


async def test_client_data_in_same_segment_as_the_upgrade(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + client_frame(OP_TEXT, b"eager") + client_frame(OP_BINARY, b"\x01\x02")
        )
        head, rest = await read_head_rest(stream)
        assert head.startswith(b"HTTP/1.1 101 ") and header(head, b"sec-websocket-accept") == accept_for(key)
        reader = FrameReader(stream, rest)
        got = [await reader.read(), await reader.read()]
        assert [(f.opcode, f.payload) for f in got if f] == [(OP_TEXT, b"eager"), (OP_BINARY, b"\x01\x02")]
        assert rec.received == [["eager", b"\x01\x02"]]
        await stream.aclose()


def close_timeout(config: Config, seconds: float) -> Config:
    """``config`` with the pools' drain.close_timeout set to ``seconds``."""
    pools = {
        name: dataclasses.replace(pool, drain=DrainConfig(close_timeout_s=seconds)) for name, pool in config.pools.items()
    }
    return dataclasses.replace(config, pools=pools)


async def test_close_handshake_deadline_client_never_answers(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backend closes, the client never answers: its TCP is closed once close_timeout_s is over."""
    with trio.fail_after(5):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, close_timeout(make_config([backend]), 0.3))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_TEXT, b"close me"))
        frames, close = await reader.read_until_close()
        start = trio.current_time()
        assert frames == [] and close is not None and close.close == (4001, "later")
        assert await reader.read_eof() == b""  # we never answered
        elapsed = trio.current_time() - start
        assert 0.2 <= elapsed <= 1.0, elapsed
        await stream.aclose()
        await until(lambda: not app.sessions, what="session end")


async def test_close_handshake_deadline_backend_never_answers(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client closes, the backend never answers nor closes TCP: both are closed after close_timeout_s."""
    backend_saw: list[tuple[Frame | None, bytes, float]] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream)
        _, close = await reader.read_until_close()
        start = trio.current_time()
        rest = await reader.read_eof()  # ignore the close: wait for the proxy to give up
        backend_saw.append((close, rest, trio.current_time() - start))
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, close_timeout(make_config([backend]), 0.3))
        stream, reader, _ = await raw_client(port)
        await stream.send_all(client_frame(OP_CLOSE, close_payload(4000, "bye")))
        start = trio.current_time()
        assert await reader.read_eof() == b""  # no answer ever came to relay
        elapsed = trio.current_time() - start
        assert 0.2 <= elapsed <= 1.0, elapsed
        await stream.aclose()
        await until(lambda: bool(backend_saw), what="backend EOF")
        close, rest, backend_elapsed = backend_saw[0]
        assert close is not None and close.masked and close.close == (4000, "bye")
        assert rest == b"" and backend_elapsed <= 1.0
        await until(lambda: not app.sessions, what="session end")


async def test_idle_timeout_not_while_only_the_backend_talks(nursery: trio.Nursery) -> None:
    backend_saw: list[Frame | None] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream)
        for i in range(10):
            await trio.sleep(0.1)
            await stream.send_all(frame(OP_TEXT, b"tick %d" % i))
        _, close = await reader.read_until_close()
        backend_saw.append(close)
        if close is not None:
            await stream.send_all(frame(OP_CLOSE, close.payload))
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, with_timeouts(make_config([backend]), idle_s=0.3))
        stream, reader, _ = await raw_client(port)
        ticks = []
        while (f := await reader.read()) is not None and f.opcode == OP_TEXT:
            ticks.append(f.payload)
            last_tick = trio.current_time()
        # The client never spoke, yet over 1 s of ticks nothing closed; the close came after
        # about idle_s of silence.
        assert ticks == [b"tick %d" % i for i in range(10)]
        assert f is not None and f.close == (1001, "idle timeout")
        silence = trio.current_time() - last_tick
        assert 0.28 <= silence <= 0.7, silence
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1001)))
        await until(lambda: bool(backend_saw), what="backend close")
        assert backend_saw[0] is not None and backend_saw[0].close == (1001, "idle timeout")
        assert await reader.read_eof() == b""
        await stream.aclose()


# -- RSV bits once permessage-deflate is negotiated ----------------------------------------------


def deflate(payload: bytes) -> bytes:
    """RFC 7692 §7.2.1: raw DEFLATE, sync-flushed, without the trailing 00 00 ff ff."""
    c = zlib.compressobj(wbits=-15)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


DEFLATE_VIOLATIONS = {
    "RSV1 on a ping": lambda: client_frame(OP_PING, b"p", rsv=0x40),
    "RSV1 on a continuation": lambda: client_frame(OP_TEXT, deflate(b"ab"), fin=False, rsv=0x40)
    + client_frame(OP_CONT, b"c", rsv=0x40),
    "RSV2 with only deflate negotiated": lambda: client_frame(OP_TEXT, b"x", rsv=0x20),
}


@pytest.mark.parametrize("kind", list(DEFLATE_VIOLATIONS))
async def test_rsv_rules_with_permessage_deflate(nursery: trio.Nursery, kind: str) -> None:
    backend_closes: list[tuple[int | None, str | None]] = []

    def handler(ws: Any) -> None:
        try:
            for msg in ws:
                ws.send(msg)
        except websockets.exceptions.ConnectionClosed:
            pass
        backend_closes.append((ws.close_code, ws.close_reason))

    with trio.fail_after(5), websockets_backend(handler, compression="deflate") as backend:
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, head = await raw_client(port, b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
        extensions = header(head, b"sec-websocket-extensions")
        assert extensions is not None and extensions.startswith(b"permessage-deflate")
        # A compressed message (RSV1 on its first frame) is fine, and so is the compressed echo.
        text = "squeeze " * 100
        await stream.send_all(client_frame(OP_TEXT, deflate(text.encode()), rsv=0x40))
        echo = await reader.read()
        assert echo is not None and echo.opcode == OP_TEXT and echo.rsv == 0x40
        assert inflate(echo.payload).decode() == text
        await stream.send_all(DEFLATE_VIOLATIONS[kind]())
        frames, close = await reader.read_until_close()
        assert frames == []
        assert close is not None and close.close[0] == 1002, close
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1002)))
        await until(lambda: bool(backend_closes), what="backend close")
        assert backend_closes == [(1001, "peer protocol error")]
        assert await reader.read_eof() == b""
        await stream.aclose()


async def test_backend_violation_waits_for_the_frame_in_flight_to_the_backend(nursery: trio.Nursery) -> None:
    """The 1002 for the backend goes after the client's frame that is half-way to it, not inside it."""
    payload = os.urandom(100_000)
    backend_saw: list[tuple[list[Frame], Frame | None]] = []
    partial_arrived = trio.Event()

    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream)
        await reader.fill(30_000)
        partial_arrived.set()
        await stream.send_all(frame(OP_TEXT, b"x", mask=b"abcd"))  # hostile
        backend_saw.append(await reader.read_until_close())
        await stream.aclose()

    with trio.fail_after(5):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, reader, _ = await raw_client(port)
        whole = client_frame(OP_BINARY, payload)
        await stream.send_all(whole[:30_000])
        await partial_arrived.wait()
        frames, close = await reader.read_until_close()
        assert frames == [] and close is not None
        assert close.close == (1014, "backend protocol error: masked frame from the server")
        await trio.sleep(0.1)
        assert backend_saw == []  # still inside our frame: no close frame for the backend yet
        await stream.send_all(whole[30_000:])
        await stream.send_all(client_frame(OP_CLOSE, close_payload(1014)))
        await until(lambda: bool(backend_saw), what="backend read")
        seen, backend_close = backend_saw[0]
        assert [(f.opcode, f.payload) for f in seen] == [(OP_BINARY, payload)]
        assert backend_close is not None and backend_close.masked and backend_close.close[0] == 1002
        assert await reader.read_eof() == b""
        await stream.aclose()
