"""Many real WebSocket peers in one process, for tests that need thousands of sessions.

    python -m tests.fleet backends COUNT        COUNT echo servers on 127.0.0.1 (port 0);
                                                prints their ports as one JSON line
    python -m tests.fleet clients URL SESSIONS  SESSIONS clients of URL; each one that the
                                                proxy closes with 1012 or 1013 reconnects
                                                after 0-100 ms; prints "open N" when all
                                                are open the first time, then
                                                "closed CODE" for every close it saw and
                                                "refused STATUS" for every failed reconnect

Both are asyncio with the ``websockets`` library (the peers the proxy meets in
production), in their own process so that the proxy under test keeps its CPU.
They run until stdin closes or SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

RECONNECT_CODES = (1012, 1013)


async def _echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def backends(count: int) -> None:
    servers = [await serve(_echo, "127.0.0.1", 0, compression=None, ping_interval=None) for _ in range(count)]
    ports = [server.sockets[0].getsockname()[1] for server in list(servers)]  # type: ignore[index]
    print(json.dumps(ports), flush=True)
    await _until_stdin_closes()


async def clients(url: str, sessions: int) -> None:
    opened = 0
    first = asyncio.Event()
    gate = asyncio.Semaphore(64)  # connection attempts in flight

    async def one() -> None:
        nonlocal opened
        counted = False
        while True:
            try:
                async with gate:
                    ws = await connect(url, compression=None, ping_interval=None, open_timeout=30, close_timeout=5)
            except InvalidStatus as exc:
                print(f"refused {exc.response.status_code}", flush=True)
                await asyncio.sleep(0.1)
                continue
            except (OSError, asyncio.TimeoutError) as exc:
                print(f"refused {type(exc).__name__}", flush=True)
                await asyncio.sleep(0.1)
                continue
            if not counted:
                counted = True
                opened += 1
                if opened == sessions:
                    first.set()
            try:
                await ws.wait_closed()
            finally:
                code = ws.close_code
            print(f"closed {code}", flush=True)
            if code not in RECONNECT_CODES:
                return
            await asyncio.sleep(random.uniform(0, 0.1))

    tasks = [asyncio.create_task(one()) for _ in range(sessions)]
    await first.wait()
    print(f"open {opened}", flush=True)
    await _until_stdin_closes()
    for task in tasks:
        task.cancel()


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


def main(argv: list[str]) -> None:
    if argv[:1] == ["backends"]:
        asyncio.run(backends(int(argv[1])))
    elif argv[:1] == ["clients"]:
        asyncio.run(clients(argv[1], int(argv[2])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
