"""Upgrade requests as the proxy's listener reads them, for pure (no socket) handshake tests.

A request is written by a real h11 client and read back by an h11 server
(``request``); ``BASE`` is a valid RFC 6455 §4.1 upgrade and ``edit`` derives
the variants a test needs from it. What is not here: raw bytes that h11
refuses to write (the tests spell those out) and anything with a socket.
"""

from __future__ import annotations

from collections.abc import Sequence

import h11


KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
Headers = list[tuple[bytes, bytes]]

BASE: Headers = [
    (b"Host", b"example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


def edit(headers: Headers, *, drop: tuple[bytes, ...] = (), add: Sequence[tuple[bytes, bytes]] = (), **replace: bytes) -> Headers:
    """``headers`` without ``drop``, with values replaced (``Sec_WebSocket_Key=...``), plus ``add``."""
    replacements = {name.replace("_", "-").lower().encode(): value for name, value in replace.items()}
    dropped = {d.lower() for d in drop}
    out = [(n, replacements.get(n.lower(), v)) for n, v in headers if n.lower() not in dropped]
    return out + list(add)


def wire_request(method: bytes, target: bytes, headers: Headers, body: bytes | None = None) -> bytes:
    """The bytes a real h11 client writes for this request."""
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=headers))
    if body:
        data += client.send(h11.Data(data=body))
    return data


def parse_request(data: bytes) -> h11.Request:
    """What the proxy's listener gets: an h11 server reading ``data``."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request), event
    return event


def request(headers: Headers = BASE, *, method: bytes = b"GET", target: bytes = b"/", body: bytes | None = None) -> h11.Request:
    return parse_request(wire_request(method, target, headers, body))
