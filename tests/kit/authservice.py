"""A real HTTP auth service for forward-auth tests: trio + h11 on 127.0.0.1, port 0.

It records every request it receives and answers as the test's ``reply``
function says: a (status, headers, body) answer, raw bytes to send and close,
or None to stay silent.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import h11
import trio

Headers = list[tuple[bytes, bytes]]
#: (status, headers, body) to answer with; raw bytes to send and close; None to stay silent.
Reply = tuple[int, Headers, bytes] | bytes | None


@dataclass
class AuthService:
    port: int
    reply: Callable[[h11.Request], Reply]
    requests: list[h11.Request] = field(default_factory=list)

    def url(self, path: str = "/auth", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def asked_for(self, path: str) -> list[h11.Request]:
        """The subrequests for client requests to ``path`` (the query not compared)."""
        return [
            r for r in self.requests
            if any(n == b"x-forwarded-uri" and v.partition(b"?")[0] == path.encode() for n, v in r.headers)
        ]


def allow(*headers: tuple[bytes, bytes]) -> Callable[[h11.Request], Reply]:
    return lambda request: (200, list(headers), b"")


async def _serve_one(service: AuthService, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        service.requests.append(request)
        reply = service.reply(request)
        if reply is None:
            await trio.sleep_forever()
        elif isinstance(reply, bytes):
            await stream.send_all(reply)
        else:
            status, headers, body = reply
            head = h11.Response(status_code=status, headers=[*headers, (b"Content-Length", b"%d" % len(body))])
            data = (conn.send(head) or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(data)
    finally:
        await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def auth_service(reply: Callable[[h11.Request], Reply]) -> AsyncIterator[AuthService]:
    """Run an auth service on 127.0.0.1, port 0, for the duration of the block."""
    async with trio.open_nursery() as nursery:
        service = AuthService(0, reply)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, functools.partial(_serve_one, service), 0, host="127.0.0.1")
        )
        service.port = listeners[0].socket.getsockname()[1]
        yield service
        nursery.cancel_scope.cancel()


async def start_auth_service(nursery: trio.Nursery, reply: Callable[[h11.Request], Reply]) -> AuthService:
    """Run an auth service in ``nursery`` until it ends."""
    service = AuthService(0, reply)
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, functools.partial(_serve_one, service), 0, host="127.0.0.1")
    )
    service.port = listeners[0].socket.getsockname()[1]
    return service
