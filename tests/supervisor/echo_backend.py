"""A websockets echo backend for the worker tests, in its own process: ``python echo_backend.py``.

Prints its port on the first line of stdout. Every message comes back as it
came. ``GET /healthz`` (a plain HTTP request) is answered 200 and counted; the
count is printed on stdout when the process gets SIGUSR1 (the health test
reads it).
"""

from __future__ import annotations

import asyncio
import http
import signal
import sys

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

checks = 0


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass


def health(connection: ServerConnection, request: Request) -> Response | None:
    global checks
    if request.path == "/healthz":
        checks += 1
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    return None


async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"checks {checks}", flush=True))
    async with serve(echo, "127.0.0.1", 0, process_request=health, max_queue=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
