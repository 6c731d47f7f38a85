"""A small HTTP/1.1 client (h11) for the admin API, over TCP or a Unix socket.

``call(address, method, target, token=...)`` is one request on a new
connection; ``AdminClient`` keeps one connection alive across requests (for
tests of keep-alive, of the Host header and of listeners that move). Addresses
are ``host:port`` or ``unix:/path``, as in the config's ``admin.bind``.

What is not here: the admin server (the tests start ``serve_admin`` or a real
process) and any knowledge of its routes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import h11
import trio


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/json", self.headers
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


class AdminClient:
    """HTTP/1.1 requests on one connection, kept alive between requests."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host  # the Host header sent unless a request gives its own
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, address: str) -> AdminClient:
        if address.startswith("unix:"):
            return cls(await trio.open_unix_socket(address[5:]), "localhost")
        host, _, port = address.rpartition(":")
        return cls(await trio.open_tcp_stream(host.strip("[]"), int(port)), address)

    async def request(
        self, method: str, target: str, *, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Reply:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        given = any(name.lower() == "host" for name, _ in headers)
        head = [*([] if given else [("Host", self.host)]), *headers]
        if body or method == "POST":
            head.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=head))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        names = {name.decode().lower(): value.decode() for name, value in response.headers}
        return Reply(response.status_code, names, b"".join(chunks))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def call(
    address: str, method: str, target: str, *, token: bytes | None = None, headers: Sequence[tuple[str, str]] = ()
) -> Reply:
    """One request on a new connection."""
    client = await AdminClient.connect(address)
    try:
        auth = [("Authorization", f"Bearer {token.decode()}")] if token else []
        return await client.request(method, target, headers=[*auth, *headers])
    finally:
        await client.aclose()
