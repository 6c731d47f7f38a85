"""End-to-end tests of the opening handshake, through a real proxy on loopback.

Clients send exact bytes (or are real ``websockets`` / trio-websocket clients);
backends are raw TCP servers that *record every byte they receive*, so a test
can show that nothing of a refused request reached a backend, and can stage a
backend that misbehaves in one precise way (silent, hanging up, refusing, a
wrong 101). What is not here: relaying frames (``test_relay``), the CLI and
signals (``test_cli``).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from dataclasses import dataclass

import h11
import pytest
import trio
from trio_websocket import open_websocket_url
from websockets.trio.client import connect as ws_connect

from tests.kit.backends import Answer, Recorder, answer_101, fixed, start_recording_backend
from tests.kit.servers import (
    closed_port,
    make_config,
    raw_request,
    start_proxy,
    start_ws_backend,
    status_of,
    with_timeouts,
)
from tests.kit.wait import SLACK_S
from tests.kit.ws import UPGRADE_REQUEST, accept_for, read_head, read_until_eof
from wsproxy.config.schema import LimitsConfig, PoolName, RouteConfig


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    """Keep the proxy's INFO lines: some tests assert on them, every failure shows them."""
    caplog.set_level(logging.INFO, logger="wsproxy")


# --- clients -----------------------------------------------------------------


def with_headers(*lines: bytes, request: bytes = UPGRADE_REQUEST) -> bytes:
    """``request`` with header ``lines`` added before its blank line."""
    assert request.endswith(b"\r\n\r\n")
    return request[:-2] + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@dataclass
class Response:
    status: int
    headers: dict[bytes, list[bytes]]  # lower-case names
    body: bytes


def parse_response(raw: bytes) -> Response:
    """Parse one complete HTTP/1.1 response strictly (h11), and nothing after it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response), (response, raw)
    headers: dict[bytes, list[bytes]] = {}
    for name, value in response.headers:
        headers.setdefault(name, []).append(value)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), (event, raw)
            break
    trailing, _ = conn.trailing_data
    assert trailing == b"", f"bytes after the response: {bytes(trailing)!r}"
    assert response.status_code == status_of(raw)
    return Response(response.status_code, headers, body)


def connection_tokens(response: Response) -> list[bytes]:
    return [t.strip().lower() for v in response.headers.get(b"connection", []) for t in v.split(b",")]


async def read_response(stream: trio.SocketStream) -> bytes:
    """Read exactly one response (head and Content-Length body) off ``stream``."""
    buf = await read_head(stream)
    head, _, body = buf.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        data = await stream.receive_some(65536)
        assert data, "connection closed in the middle of the body"
        body += data
    return head + b"\r\n\r\n" + body


async def exchange(port: int, data: bytes, *, within_s: float = 5.0) -> bytes:
    """``raw_request`` that fails (instead of returning) when the proxy does not close."""
    with trio.move_on_after(within_s):
        return await raw_request(port, data, read_timeout_s=30)
    raise AssertionError(f"the proxy did not answer and close within {within_s:g}s")


async def assert_serves(port: int, *, host: str = "127.0.0.1", path: str = "/good") -> None:
    """A real client (websockets) gets through and its message comes back."""
    async with ws_connect(
        f"ws://{host}{path}", host="127.0.0.1", port=port, proxy=None, open_timeout=5, close_timeout=2
    ) as ws:
        await ws.send("still serving")
        assert await ws.recv() == "still serving"


async def assert_nothing_reached(recorder: Recorder) -> None:
    await trio.sleep(0.2)  # anything in flight would have landed by now
    assert recorder.connections == 0
    assert recorder.received == b""


def refused_lines(caplog: pytest.LogCaptureFixture, status: int) -> list[str]:
    messages = (r.getMessage() for r in caplog.records)
    return [m for m in messages if "event=refused" in m and f"status={status}" in m]


# --- 1. every downstream rejection --------------------------------------------

KEY_15_BYTES = base64.b64encode(b"x" * 15)
KEY_17_BYTES = base64.b64encode(b"x" * 17)

REJECTIONS = {
    "plain GET": (b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426),
    "Upgrade: h2c": (UPGRADE_REQUEST.replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426),
    "POST upgrade": (UPGRADE_REQUEST.replace(b"GET ", b"POST ", 1), 400),
    "HTTP/1.0": (UPGRADE_REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    "missing Host": (UPGRADE_REQUEST.replace(b"Host: 127.0.0.1\r\n", b""), 400),
    "two Host": (with_headers(b"Host: other.example"), 400),
    "Connection without upgrade": (UPGRADE_REQUEST.replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400),
    "version 8": (UPGRADE_REQUEST.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    "no version": (UPGRADE_REQUEST.replace(b"Sec-WebSocket-Version: 13\r\n", b""), 426),
    "key of 15 bytes": (UPGRADE_REQUEST.replace(b"dGhlIHNhbXBsZSBub25jZQ==", KEY_15_BYTES), 400),
    "key of 17 bytes": (UPGRADE_REQUEST.replace(b"dGhlIHNhbXBsZSBub25jZQ==", KEY_17_BYTES), 400),
    "key not base64": (UPGRADE_REQUEST.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"not*base64*at*all!!!!!!"), 400),
    "no key": (UPGRADE_REQUEST.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400),
    "Content-Length + Transfer-Encoding": (
        with_headers(b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding + Content-Length": (
        with_headers(b"Transfer-Encoding: chunked", b"Content-Length: 0") + b"0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding alone": (with_headers(b"Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    "two equal Content-Length": (with_headers(b"Content-Length: 0", b"Content-Length: 0"), 400),
    "two different Content-Length": (with_headers(b"Content-Length: 0", b"Content-Length: 3") + b"abc", 400),
    "obs-fold (space)": (with_headers(b"X-Foo: a", b" b"), 400),
    "obs-fold (tab)": (with_headers(b"X-Foo: a", b"\tb"), 400),
    "a body": (with_headers(b"Content-Length: 10") + b"0123456789", 400),
    "bare LF everywhere": (UPGRADE_REQUEST.replace(b"\r\n", b"\n"), 400),
    "bare LF on one line": (UPGRADE_REQUEST.replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket\n"), 400),
    "bare LF before the blank line": (UPGRADE_REQUEST[:-4] + b"\n\r\n", 400),
    "header block over the limit": (with_headers(b"X-Pad: " + b"a" * 1100), 431),
    "unterminated header block over the limit": (UPGRADE_REQUEST[:-2] + b"X-Pad: " + b"a" * 2000, 431),
    "absolute-form target": (UPGRADE_REQUEST.replace(b"GET /chat", b"GET http://127.0.0.1/chat"), 400),
}


async def start_guarded_proxy(nursery: trio.Nursery, *, routes: tuple[RouteConfig, ...] | None = None) -> tuple[int, Recorder]:
    """A proxy whose catch-all pool is a recording backend; /good goes to a real echo backend.

    ``limits.max_header_bytes`` is 1024, the smallest the config allows.
    """
    rec_port, recorder = await start_recording_backend(nursery, answer_101())
    echo_port = await start_ws_backend(nursery)
    config = make_config(
        [rec_port],
        routes=routes
        or (RouteConfig(path="/good", pool=PoolName("good")), RouteConfig(pool=PoolName("main"))),
        extra_pools={"good": [echo_port]},
        limits=LimitsConfig(max_header_bytes=1024),
    )
    _, port = await start_proxy(nursery, config)
    return port, recorder


@pytest.mark.parametrize(("request_bytes", "status"), list(REJECTIONS.values()), ids=list(REJECTIONS))
async def test_rejected_request_gets_its_status_and_reaches_no_backend(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(15):
        port, recorder = await start_guarded_proxy(nursery)
        await assert_serves(port)  # the good path works before...

        raw = await exchange(port, request_bytes)

        response = parse_response(raw)
        assert response.status == status, raw
        assert b"close" in connection_tokens(response)
        assert int(response.headers[b"content-length"][0]) == len(response.body)
        if status == 426:  # RFC 6455 §4.4, RFC 9110 §15.5.22
            assert response.headers[b"sec-websocket-version"] == [b"13"]
            assert response.headers[b"upgrade"] == [b"websocket"]
        assert b"HTTP/1.1 101" not in raw
        assert refused_lines(caplog, status), "no event=refused line with the status"
        await assert_nothing_reached(recorder)
        await assert_serves(port)  # ...and after


async def test_request_split_byte_by_byte_is_still_judged_whole(nursery: trio.Nursery) -> None:
    """The checks see the whole head, however it was cut into segments."""
    with trio.fail_after(15):
        port, recorder = await start_guarded_proxy(nursery)
        request = with_headers(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for i in range(len(request)):
                await stream.send_all(request[i : i + 1])
            raw = await read_until_eof(stream)
        assert status_of(raw) == 400
        await assert_nothing_reached(recorder)
        await assert_serves(port)


async def test_no_route_is_404_and_reaches_no_backend(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        port, recorder = await start_guarded_proxy(
            nursery,
            routes=(
                RouteConfig(host="only.example", path="/good", pool=PoolName("good")),
                RouteConfig(host="only.example", pool=PoolName("main")),
            ),
        )
        raw = await exchange(port, UPGRADE_REQUEST)  # Host: 127.0.0.1
        assert parse_response(raw).status == 404
        raw = await exchange(port, UPGRADE_REQUEST.replace(b"Host: 127.0.0.1", b"Host: other.example"))
        assert parse_response(raw).status == 404
        await assert_nothing_reached(recorder)
        await assert_serves(port, host="only.example")


# --- 2. slowloris --------------------------------------------------------------


async def test_half_a_request_then_silence_gets_408_on_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port, recorder = await start_guarded_proxy_with_handshake_timeout(nursery, 0.5)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            await stream.send_all(UPGRADE_REQUEST[:40])
            raw = await read_until_eof(stream)
            elapsed = trio.current_time() - start
        assert parse_response(raw).status == 408
        assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
        await assert_nothing_reached(recorder)
        await assert_serves(port)


async def test_a_trickling_request_gets_408_on_time(nursery: trio.Nursery) -> None:
    """The handshake timeout covers the whole request, not the gap between two bytes."""
    with trio.fail_after(10):
        port, recorder = await start_guarded_proxy_with_handshake_timeout(nursery, 0.5)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()

            async def trickle() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for i in range(len(UPGRADE_REQUEST) - 2):
                        await stream.send_all(UPGRADE_REQUEST[i : i + 1])
                        await trio.sleep(0.05)

            async with trio.open_nursery() as inner:
                inner.start_soon(trickle)
                raw = await read_until_eof(stream)
                inner.cancel_scope.cancel()
            elapsed = trio.current_time() - start
        assert parse_response(raw).status == 408
        assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
        await assert_nothing_reached(recorder)


async def test_a_client_that_sends_nothing_is_closed_without_a_response(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port, recorder = await start_guarded_proxy_with_handshake_timeout(nursery, 0.5)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            raw = await read_until_eof(stream)
            elapsed = trio.current_time() - start
        assert raw == b""
        assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
        await assert_nothing_reached(recorder)
        await assert_serves(port)


async def start_guarded_proxy_with_handshake_timeout(nursery: trio.Nursery, handshake_s: float) -> tuple[int, Recorder]:
    rec_port, recorder = await start_recording_backend(nursery, answer_101())
    echo_port = await start_ws_backend(nursery)
    config = make_config(
        [rec_port],
        routes=(RouteConfig(path="/good", pool=PoolName("good")), RouteConfig(pool=PoolName("main"))),
        extra_pools={"good": [echo_port]},
    )
    _, port = await start_proxy(nursery, with_timeouts(config, handshake_s=handshake_s))
    return port, recorder


# --- 3. backends ----------------------------------------------------------------


async def test_refused_backend_alone_is_502(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10):
        _, port = await start_proxy(nursery, make_config([closed_port()]))
        raw = await exchange(port, UPGRADE_REQUEST)
        assert parse_response(raw).status == 502
        assert refused_lines(caplog, 502)


async def test_failover_past_a_refused_backend_every_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        echo_port = await start_ws_backend(nursery)
        _, port = await start_proxy(nursery, make_config([closed_port(), echo_port]))
        for i in range(6):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/chat") as ws:
                await ws.send_message(f"hello {i}")
                assert await ws.get_message() == f"hello {i}"


async def test_silent_backend_is_504_on_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery, answer=None)
        config = with_timeouts(make_config([rec_port]), upstream_handshake_s=0.5)
        _, port = await start_proxy(nursery, config)
        start = trio.current_time()
        raw = await exchange(port, UPGRADE_REQUEST)
        elapsed = trio.current_time() - start
        assert parse_response(raw).status == 504
        assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
        assert recorder.connections == 1
        await trio.sleep(0.1)
        assert recorder.closed_by_peer == 1  # the proxy let go of the silent backend


async def test_backend_that_hangs_up_without_answering_is_502(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        rec_port, _ = await start_recording_backend(nursery, hang_up=True)
        _, port = await start_proxy(nursery, make_config([rec_port]))
        raw = await exchange(port, UPGRADE_REQUEST)
        assert parse_response(raw).status == 502


BACKEND_REFUSALS = {
    "200 with a body": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n",
        200,
        b"hello, world\n",
    ),
    "400 with a body": (
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 8\r\nX-Backend: yes\r\n\r\nno way!\n",
        400,
        b"no way!\n",
    ),
    "403 chunked": (
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nnope\n\r\n0\r\n\r\n",
        403,
        b"nope\n",
    ),
}


@pytest.mark.parametrize(("answer", "status", "body"), list(BACKEND_REFUSALS.values()), ids=list(BACKEND_REFUSALS))
async def test_backend_refusal_is_relayed_as_it_was(
    nursery: trio.Nursery, answer: bytes, status: int, body: bytes
) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery, fixed(answer))
        _, port = await start_proxy(nursery, make_config([rec_port]))
        raw = await exchange(port, UPGRADE_REQUEST)  # fails if the proxy does not close
        response = parse_response(raw)
        assert response.status == status
        assert response.body == body
        assert b"close" in connection_tokens(response)
        assert b"HTTP/1.1 101" not in raw
        if b"X-Backend" in answer:
            assert response.headers[b"x-backend"] == [b"yes"]


SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Smuggled: 1\r\n\r\n"


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-the-answer", "pipelined"])
@pytest.mark.parametrize("answer", [BACKEND_REFUSALS["200 with a body"][0], BACKEND_REFUSALS["400 with a body"][0]], ids=["200", "400"])
async def test_no_second_request_reaches_a_backend_that_refused(
    nursery: trio.Nursery, answer: bytes, pipelined: bool
) -> None:
    """THE smuggling hole: after a non-101 answer, the connection must not turn into a tunnel.

    The backend keeps its side open and records everything; the client sends a
    second request on the same connection, either after the answer or right
    behind the first one.
    """
    with trio.fail_after(15):
        rec_port, recorder = await start_recording_backend(nursery, fixed(answer))
        _, port = await start_proxy(nursery, make_config([rec_port]))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(UPGRADE_REQUEST + (SMUGGLED if pipelined else b""))
            first = await read_response(stream)
            if not pipelined:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(SMUGGLED)
            with trio.fail_after(3):
                rest = await read_until_eof(stream)  # the proxy closes its side
        assert status_of(first) == status_of(answer)
        assert rest == b"", f"the proxy answered the second request: {rest!r}"
        await trio.sleep(0.5)
        assert recorder.connections == 1
        received = recorder.received
        assert received.startswith(b"GET /chat HTTP/1.1\r\n")
        assert received.count(b"\r\n\r\n") == 1 and received.endswith(b"\r\n\r\n"), received
        assert b"/admin" not in received and b"X-Smuggled" not in received
        assert recorder.closed_by_peer == 1  # and the proxy closed the backend connection


BAD_101 = {
    "wrong Sec-WebSocket-Accept": fixed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(b"some other key==") + b"\r\n\r\n"
    ),
    "no Sec-WebSocket-Accept": fixed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ),
    "subprotocol not offered": answer_101(b"Sec-WebSocket-Protocol: superchat"),
    "extension not offered": answer_101(b"Sec-WebSocket-Extensions: x-evil"),
    "no Upgrade header": fixed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\n\r\n"
    ),
    "not HTTP at all": fixed(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
}


@pytest.mark.parametrize("answer", list(BAD_101.values()), ids=list(BAD_101))
async def test_bad_101_from_backend_is_502(nursery: trio.Nursery, answer: Answer) -> None:
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery, answer)
        _, port = await start_proxy(nursery, make_config([rec_port]))
        raw = await exchange(port, with_headers(b"Sec-WebSocket-Protocol: chat"))
        assert parse_response(raw).status == 502
        assert b"101" not in raw.split(b"\r\n", 1)[0]
        await trio.sleep(0.1)
        assert recorder.closed_by_peer == 1


# --- 4. the request the backend sees -------------------------------------------------


@pytest.mark.parametrize("named", [b"Host", b"Sec-WebSocket-Key"])
async def test_connection_header_cannot_strip_the_handshake_from_the_upstream_request(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, named: bytes
) -> None:
    """A client that names an end-to-end handshake header in Connection
    (``Connection: Upgrade, Host``) must not make the proxy send the backend an
    upgrade without it: refuse the client (400, nothing upstream), or keep the header.
    """
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery, answer_101())
        _, port = await start_proxy(nursery, make_config([rec_port]))
        request = UPGRADE_REQUEST.replace(b"Connection: Upgrade", b"Connection: Upgrade, " + named)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            raw = await read_head(stream)  # a 101 keeps the connection open
        await trio.sleep(0.1)
    status = status_of(raw)
    if status == 400 and recorder.connections == 0:
        return  # refused here: fine
    upstream = recorder.received.partition(b"\r\n\r\n")[0]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(rb"(?im)^" + named + rb":", upstream), (
        f"client got {status}; the backend got an upgrade without {named.decode()}:\n"
        f"{upstream.decode('latin-1')}\nlog:\n{log}"
    )
    assert status == 101, raw


async def test_upstream_request_has_forwarding_headers_and_no_hop_by_hop(nursery: trio.Nursery) -> None:
    key = base64.b64encode(os.urandom(16))
    client_request = (
        b"GET /chat?room=42 HTTP/1.1\r\n"
        b"Host: app.example:8443\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade, X-Hop-Secret\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat, superchat\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"Forwarded: for=6.6.6.6;proto=https\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n"
        b"X-Hop-Secret: do-not-forward\r\n"
        b"Cookie: session=abc; theme=dark\r\n"
        b"User-Agent: e2e-test/1.0\r\n"
        b"X-Foo: bar\r\n"
        b"\r\n"
    )
    with trio.fail_after(10):
        rec_port, recorder = await start_recording_backend(nursery, answer_101(b"Sec-WebSocket-Protocol: chat"))
        _, port = await start_proxy(nursery, make_config([rec_port]))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(client_request)
            head = await read_head(stream)

    # The client's 101 completes the client's own handshake.
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: " + accept_for(key) + b"\r\n" in head
    assert re.search(rb"(?i)\r\nsec-websocket-protocol: chat\r\n", head)

    upstream = recorder.received
    assert upstream.count(b"\r\n\r\n") == 1 and upstream.endswith(b"\r\n\r\n")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(upstream)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target, request.http_version) == (b"GET", b"/chat?room=42", b"1.1")
    raw_headers = list(request.headers.raw_items())
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in raw_headers:
        by_name.setdefault(name.lower(), []).append(value)

    # Set by the proxy, once each; the client's spoofed copies are gone.
    assert by_name[b"x-forwarded-for"] == [b"127.0.0.1"]
    assert by_name[b"x-forwarded-proto"] == [b"http"]
    assert by_name[b"x-forwarded-host"] == [b"app.example:8443"]
    assert len(by_name[b"forwarded"]) == 1
    forwarded = by_name[b"forwarded"][0]
    assert b"for=127.0.0.1" in forwarded and b"proto=http" in forwarded
    assert b'host="app.example:8443"' in forwarded
    assert b"6.6.6.6" not in upstream and b"evil.example" not in upstream and b"https" not in upstream

    # The handshake itself.
    assert by_name[b"host"] == [b"app.example:8443"]
    assert by_name[b"sec-websocket-key"] == [key]
    assert by_name[b"sec-websocket-version"] == [b"13"]
    assert [t.strip().lower() for v in by_name[b"upgrade"] for t in v.split(b",")] == [b"websocket"]
    assert [t.strip().lower() for v in by_name[b"connection"] for t in v.split(b",")] == [b"upgrade"]

    # Hop-by-hop headers, and those the client's Connection header named, stay here.
    for name in (b"keep-alive", b"te", b"proxy-authorization", b"x-hop-secret"):
        assert name not in by_name, name
    assert b"do-not-forward" not in upstream and b"c2VjcmV0OnNlY3JldA==" not in upstream

    # Everything else passes unchanged, spelling included.
    for header in (
        (b"Cookie", b"session=abc; theme=dark"),
        (b"User-Agent", b"e2e-test/1.0"),
        (b"X-Foo", b"bar"),
        (b"Sec-WebSocket-Protocol", b"chat, superchat"),
    ):
        assert header in raw_headers, header
