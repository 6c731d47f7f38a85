"""Strict WebSocket conformance through the proxy, end to end (issue: UTF-8, close frames, backend faults).

Both sides are the ``websockets`` library (its sync client in a worker thread, its sync server in a
thread) wherever it can produce the input; a raw peer (``tests.kit.ws``) plays the shapes it refuses to
send (invalid close codes, a long frame whose bad byte arrives late). Each test also checks that a second,
healthy session through the same proxy is untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import websockets.exceptions
import websockets.sync.client

from tests.kit.servers import make_config, start_proxy, start_tcp_backend, websockets_backend
from tests.kit.wait import until
from tests.kit.ws import OP_CLOSE, OP_TEXT, frame, random_key, raw_accept, read_frame, read_head_rest, upgrade_request
from wsproxy.config.schema import PoolName, RouteConfig

pytestmark = pytest.mark.usefixtures("relay_driver")  # every test with the engine and with trio pumps

BAD_TEXT = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"  # Autobahn 6.3.1


def routes(**route: Any) -> tuple[RouteConfig, ...]:
    return (RouteConfig(pool=PoolName("main"), **route),)


class Backend:
    """A websockets echo backend that records the close code each connection received."""

    def __init__(self) -> None:
        self.closes: list[int | None] = []
        self.received: list[Any] = []

    def handler(self, ws: Any) -> None:
        try:
            for message in ws:
                self.received.append(message)
                if message == "send bad text":
                    ws.send(BAD_TEXT, text=True)  # websockets sends bytes as a text frame, unchecked
                else:
                    ws.send(message)
        except websockets.exceptions.ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        self.closes.append(rcvd.code if rcvd is not None else None)


def client_session(port: int, actions: Any) -> tuple[int | None, str | None]:
    """Run ``actions(ws)`` on a websockets client; the close frame it received (code, reason).

    Without permessage-deflate: compressed messages are not checked by the proxy (README).
    """
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/", open_timeout=5, close_timeout=5, compression=None) as ws:
        try:
            actions(ws)
            while True:
                ws.recv(timeout=5)
        except websockets.exceptions.ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)


def healthy_round_trip(port: int) -> str:
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/", open_timeout=5) as ws:
        ws.send("still fine \u00e9")
        return str(ws.recv(timeout=5))


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def test_client_sending_invalid_utf8_gets_1007_and_the_backend_1001(nursery: trio.Nursery) -> None:
    rec = Backend()
    with trio.fail_after(15), websockets_backend(rec.handler) as backend:
        app, port = await start_proxy(nursery, make_config([backend]))
        code, reason = await in_thread(client_session, port, lambda ws: ws.send(BAD_TEXT, text=True))
        assert (code, reason) == (1007, "invalid UTF-8 in a text message")
        await until(lambda: rec.closes == [1001], what="backend close")
        assert rec.received == []  # the offending message never reached the backend
        assert await in_thread(healthy_round_trip, port) == "still fine \u00e9"


@pytest.mark.parametrize("failure_code", [None, 1011])
async def test_backend_sending_invalid_utf8_gets_1007_and_the_client_the_failure_code(
    nursery: trio.Nursery, failure_code: int | None
) -> None:
    rec = Backend()
    route = routes() if failure_code is None else routes(backend_failure_close_code=failure_code)
    with trio.fail_after(15), websockets_backend(rec.handler) as backend:
        app, port = await start_proxy(nursery, make_config([backend], routes=route))
        code, reason = await in_thread(client_session, port, lambda ws: ws.send("send bad text"))
        assert (code, reason) == (failure_code or 1014, "backend protocol error: invalid UTF-8 in a text message")
        await until(lambda: rec.closes == [1007], what="backend close")
        assert await in_thread(healthy_round_trip, port) == "still fine \u00e9"


async def test_a_code_point_split_across_fragments_passes(nursery: trio.Nursery) -> None:
    rec = Backend()
    text = "\U0001f600 ok \u20ac"
    encoded = text.encode()

    def actions(ws: Any) -> None:
        ws.send([encoded[:2], encoded[2:5], encoded[5:]], text=True)  # fragments split inside code points
        assert ws.recv(timeout=5) == text
        ws.close(1000, "done")

    with trio.fail_after(15), websockets_backend(rec.handler) as backend:
        app, port = await start_proxy(nursery, make_config([backend]))
        assert await in_thread(client_session, port, actions) == (1000, "done")
        assert rec.received == [text]


async def test_validation_off_forwards_invalid_text(nursery: trio.Nursery) -> None:
    """``validate_utf8: false``: the proxy passes the text on; here the backend itself answers 1007."""
    rec = Backend()
    with trio.fail_after(15), websockets_backend(rec.handler) as backend:
        app, port = await start_proxy(nursery, make_config([backend], routes=routes(validate_utf8=False)))
        code, _ = await in_thread(client_session, port, lambda ws: ws.send(BAD_TEXT, text=True))
        assert code == 1007  # relayed from the backend, which closed with 1007 itself
        await until(lambda: bool(rec.closes), what="backend end")


async def raw_session(port: int) -> tuple[trio.SocketStream, bytearray]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(upgrade_request(b"/", key=random_key()))
    head, rest = await read_head_rest(stream)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream, bytearray(rest)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999])
async def test_client_close_with_a_code_not_allowed_on_the_wire_gets_1002(nursery: trio.Nursery, code: int) -> None:
    """Autobahn 7.9.x: the proxy answers 1002 itself; the backend is told 1001."""
    rec = Backend()
    with trio.fail_after(15), websockets_backend(rec.handler) as backend:
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, buf = await raw_session(port)
        await stream.send_all(frame(OP_CLOSE, code.to_bytes(2, "big"), mask=True))
        close = await read_frame(stream, buf)
        assert close is not None and close.opcode == OP_CLOSE
        assert close.code == 1002
        assert close.payload[2:] == f"close code {code} is not allowed on the wire".encode()
        await until(lambda: rec.closes == [1001], what="backend close")
        await stream.aclose()
        assert await in_thread(healthy_round_trip, port) == "still fine \u00e9"


async def test_invalid_byte_late_in_a_long_frame_fails_both_connections(nursery: trio.Nursery) -> None:
    """The frame's valid start has reached the backend: it cannot get a close frame, only TCP's end."""
    backend_saw: list[bytes] = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        _, reader = await raw_accept(stream)  # then everything the proxy sends, raw, until TCP's end
        backend_saw.append(await reader.read_eof())

    with trio.fail_after(15):
        backend = await start_tcp_backend(nursery, backend_handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        stream, buf = await raw_session(port)
        whole = frame(OP_TEXT, b"a" * 50_000 + b"\xff" + b"b" * 50_000, mask=True)
        await stream.send_all(whole[:20_000])
        await trio.sleep(0.1)
        await stream.send_all(whole[20_000:])
        close = await read_frame(stream, buf)
        assert close is not None and close.opcode == OP_CLOSE and close.code == 1007
        await until(lambda: bool(backend_saw), what="backend EOF")
        # The backend got the frame's valid start and then the end of TCP: no close frame, no bad byte.
        assert 0 < len(backend_saw[0]) < len(whole) and b"\x88" not in backend_saw[0][:2]
        await stream.aclose()
