"""Raw TCP backends that record what the proxy sent them, for handshake tests.

Two kinds, both real servers on 127.0.0.1 port 0 in the test's nursery:

- ``start_recording_backend(nursery, answer)``: records every byte of every
  connection; once a request head is complete it sends ``answer(head)``
  (``answer_101()``, ``fixed(bytes)``), stays silent, or hangs up. A test can
  show that nothing of a refused request reached a backend.
- ``start_holding_backend(nursery)``: records each request head, answers a
  valid 101 and holds the session until the proxy sends anything.

What is not here: WebSocket backends that speak frames (``tests.kit.servers``
for trio-websocket and websockets ones, ``tests.kit.ws`` to write one by hand).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from tests.kit.servers import start_tcp_backend
from tests.kit.ws import accept_for


@dataclass
class Recorder:
    """Everything a raw backend received, over all its connections."""

    connections: int = 0
    closed_by_peer: int = 0  # connections that ended with EOF from the proxy
    chunks: list[bytes] = field(default_factory=list)

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


Answer = Callable[[bytes], bytes]


async def start_recording_backend(
    nursery: trio.Nursery, answer: Answer | None = None, *, hang_up: bool = False
) -> tuple[int, Recorder]:
    """A raw backend that records every byte; once a request head is complete it
    sends ``answer(head)`` (or stays silent when ``answer`` is None, or closes
    when ``hang_up``), and then keeps reading and recording until EOF."""
    recorder = Recorder()

    async def handler(stream: trio.SocketStream) -> None:
        recorder.connections += 1
        buf = b""
        answered = False
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    recorder.closed_by_peer += 1
                    return
                recorder.chunks.append(data)
                buf += data
                end = buf.find(b"\r\n\r\n")
                if not answered and end >= 0:
                    answered = True
                    if hang_up:
                        return
                    if answer is not None:
                        await stream.send_all(answer(buf[: end + 4]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            recorder.closed_by_peer += 1

    port = await start_tcp_backend(nursery, handler)
    return port, recorder


def key_of(head: bytes) -> bytes | None:
    match = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)[ \t]*\r$", head)
    return match.group(1) if match else None


NO_KEY_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 7\r\n\r\nno key\n"


def answer_101(*extra_headers: bytes) -> Answer:
    """A backend's 101, with the right Sec-WebSocket-Accept for the request it got
    (a 400 when the request has no Sec-WebSocket-Key, as a real backend would)."""

    def answer(head: bytes) -> bytes:
        key = key_of(head)
        if key is None:
            return NO_KEY_400
        return (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n"
            + b"".join(h + b"\r\n" for h in extra_headers)
            + b"\r\n"
        )

    return answer


def fixed(response: bytes) -> Answer:
    return lambda head: response


@dataclass
class HeadRecorder:
    """The request heads a raw backend received, one per connection."""

    heads: list[bytes] = field(default_factory=list)
    connections: int = 0

    @property
    def last(self) -> bytes:
        assert self.heads, "the backend received no request"
        return self.heads[-1]


def header_values(head: bytes, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (case-insensitive) in a request head."""
    pattern = rb"(?im)^" + re.escape(name) + rb":[ \t]*(.*?)[ \t]*\r$"
    return re.findall(pattern, head)


async def start_holding_backend(nursery: trio.Nursery) -> tuple[int, HeadRecorder]:
    """A raw TCP backend: records each request head, answers a valid 101, then holds
    the connection until the proxy sends something (or lets go) and hangs up."""
    recorder = HeadRecorder()

    async def handler(stream: trio.SocketStream) -> None:
        recorder.connections += 1
        buf = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    if buf:
                        recorder.heads.append(buf)
                    return
                buf += data
            head = buf[: buf.index(b"\r\n\r\n") + 4]
            recorder.heads.append(head)
            key = header_values(head, b"sec-websocket-key")[0]
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
            )
            # Hold the session until the proxy sends anything (its close frame when the
            # client leaves), then hang up, as a backend ending the session would.
            await stream.receive_some(65536)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1]), recorder
