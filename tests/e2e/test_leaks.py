"""End to end: a thousand sessions leave nothing behind.

1,000 sessions (50 concurrent × 20 rounds) through one in-process proxy, each
exchanging a message and closing normally, then 300 that end badly. Afterwards
the proxy holds no session, every backend's active count is 0, and the process
has as many open file descriptors and trio tasks as before the first session.
The raw-client helpers come from ``test_relay``.
"""

from __future__ import annotations

import os

import trio
from trio_websocket import open_websocket_url

from tests.kit.servers import Recorder, make_config, start_proxy, start_ws_backend
from tests.kit.wait import until
from tests.kit.ws import client_frame, frame, raw_client

CONCURRENT = 50
ROUNDS = 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    """Every task alive in this run, counted down from the root task."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_thousand_sessions_leave_nothing_behind(nursery: trio.Nursery) -> None:
    with trio.fail_after(40):
        backends = [await start_ws_backend(nursery), await start_ws_backend(nursery)]
        app, port = await start_proxy(nursery, make_config(backends))
        url = f"ws://127.0.0.1:{port}/leak"

        # Warm up once so lazily created objects (thread pools, caches) are in the baseline.
        async with open_websocket_url(url) as ws:
            await ws.send_message("warm")
            assert await ws.get_message() == "warm"
        await until(lambda: not app.sessions, what="not app.sessions")
        await trio.sleep(0.05)
        fds_before = open_fds()
        tasks_before = task_count()

        echoed = 0
        peak_sessions = 0

        async def one_session(n: int) -> None:
            nonlocal echoed, peak_sessions
            async with open_websocket_url(url) as ws:
                message = f"session {n}" if n % 2 else f"session {n}".encode()
                await ws.send_message(message)
                assert await ws.get_message() == message
                echoed += 1
                peak_sessions = max(peak_sessions, len(app.sessions))

        for round_no in range(ROUNDS):
            async with trio.open_nursery() as clients:
                for i in range(CONCURRENT):
                    clients.start_soon(one_session, round_no * CONCURRENT + i)
        assert echoed == CONCURRENT * ROUNDS
        assert peak_sessions > CONCURRENT // 2  # they really overlapped

        await until(lambda: not app.sessions, what="not app.sessions", show=lambda: f"sessions left: {list(app.sessions)}")
        states = list(app.registry)
        assert {s.address.port for s in states} == set(backends)
        assert [s.active for s in states] == [0, 0]
        await until(lambda: task_count() <= tasks_before, what="task_count() <= tasks_before", show=lambda: f"tasks: {task_count()} now, {tasks_before} before")
        assert task_count() == tasks_before
        await until(lambda: open_fds() <= fds_before + 5, what="open_fds() <= fds_before + 5", show=lambda: f"fds: {open_fds()} now, {fds_before} before")


async def test_registry_counts_established_sessions(nursery: trio.Nursery) -> None:
    """``BackendState.total`` is documented as "sessions ever established"."""
    with trio.fail_after(5):
        backend = await start_ws_backend(nursery)
        app, port = await start_proxy(nursery, make_config([backend]))
        for i in range(3):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_message(str(i))
                assert await ws.get_message() == str(i)
        await until(lambda: not app.sessions, what="not app.sessions")
        [state] = list(app.registry)
        assert (state.active, state.total) == (0, 3)


async def test_abnormal_endings_leave_nothing_behind(nursery: trio.Nursery) -> None:
    """Sessions that end badly (backend closes, client vanishes, client breaks the protocol)."""
    with trio.fail_after(30):
        rec = Recorder()
        backend = await start_ws_backend(nursery, rec.handler)
        app, port = await start_proxy(nursery, make_config([backend]))
        url = f"ws://127.0.0.1:{port}/"
        async with open_websocket_url(url) as ws:
            await ws.send_message("warm")
            assert await ws.get_message() == "warm"
        await until(lambda: not app.sessions, what="not app.sessions")
        await trio.sleep(0.05)
        fds_before = open_fds()
        tasks_before = task_count()

        async def backend_closes() -> None:
            async with open_websocket_url(url) as ws:
                await ws.send_message("close me")
                try:
                    await ws.get_message()
                except Exception:
                    pass

        async def client_vanishes() -> None:
            stream, reader, _ = await raw_client(port)
            await stream.send_all(client_frame(0x1, b"hi"))
            await reader.read()
            await stream.aclose()

        async def client_breaks_protocol() -> None:
            stream, reader, _ = await raw_client(port)
            await stream.send_all(frame(0x1, b"unmasked"))
            await reader.read_until_close()
            await stream.aclose()

        for _ in range(10):
            async with trio.open_nursery() as clients:
                for _ in range(10):
                    clients.start_soon(backend_closes)
                    clients.start_soon(client_vanishes)
                    clients.start_soon(client_breaks_protocol)

        await until(lambda: not app.sessions, what="not app.sessions", show=lambda: f"sessions left: {list(app.sessions)}")
        assert [s.active for s in app.registry] == [0]
        await until(lambda: len(rec.closes) == 301, what="len(rec.closes) == 301", show=lambda: len(rec.closes))
        assert sorted(set(code for code, _ in rec.closes)) == [1000, 1001, 4001]
        await until(lambda: task_count() <= tasks_before, what="task_count() <= tasks_before", show=lambda: f"tasks: {task_count()} now, {tasks_before} before")
        assert task_count() == tasks_before
        await until(lambda: open_fds() <= fds_before + 5, what="open_fds() <= fds_before + 5", show=lambda: f"fds: {open_fds()} now, {fds_before} before")
