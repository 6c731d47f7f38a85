"""End to end: a pool grows from 2 to 3 backends under thousands of sessions, and rebalancing evens it out.

The proxy is an ``App`` in this process (its registry and metrics are read
directly); the backends (``websockets`` echo servers) and the clients
(``websockets`` clients that reconnect after a 1012) run in their own
processes (``tests/fleet.py``), so the proxy keeps a core.

Time scale: the issue's figure is "max/mean ≤ 1.25 while closing under 2 %
of the sessions per minute" with ``rate: 1%/min``, which takes a quarter of an
hour of real time. The test runs the rebalancer 60 times faster: its tick is
1/60 s instead of 1 s and the rate is ``1%/s`` (the same as ``60%/min``), so a
second of the test is a minute of production, and every 1 s window of the
test must close under 2 % of the sessions. Nothing else is scaled (the
clients reconnect after 0-100 ms, as they would).

Size: ``SESSIONS`` (3,000, the issue's figure; ``WSPROXY_REBALANCE_SESSIONS``
overrides it on a machine too slow to open them in time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from wsproxy.app import App
from wsproxy.config.load import load_config
from wsproxy.config.schema import Address

SESSIONS = int(os.environ.get("WSPROXY_REBALANCE_SESSIONS", "3000"))
TEST_TIMEOUT_S = 110.0
ROOT = Path(__file__).resolve().parents[2]


class Lines:
    """Lines from a process's stdout, one at a time."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("the process ended")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


async def fleet(*args: str) -> tuple[trio.Process, Lines]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.fleet", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(ROOT)
    )
    assert process.stdout is not None
    return process, Lines(process.stdout)


def write_config(path: Path, ports: list[int]) -> str:
    document = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "pools": {
            "main": {
                "balance": "least_conn",
                "rebalance": {"max_skew": 1.25, "rate": "1%/s"},
                "backends": [{"address": f"127.0.0.1:{port}"} for port in ports],
            }
        },
        "routes": [{"pool": "main"}],
        "limits": {"max_connections_per_ip": 0},
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


@pytest.mark.timeout(150)  # about 50 s alone on a busy 2-core machine; more inside the whole suite
async def test_growing_pool_is_rebalanced_gently(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        backends, backend_lines = await fleet("backends", "3")
        ports = json.loads(await backend_lines.next())
        path = tmp_path / "wsproxy.yaml"
        app = App(load_config(write_config(path, ports[:2])))
        app.rebalancer.period_s = 1 / 60  # the time scale: see the module docstring
        proxy_port = (await nursery.start(app.serve))["edge"][0][1]
        clients, client_lines = await fleet("clients", f"ws://127.0.0.1:{proxy_port}/", str(SESSIONS))
        try:
            started = trio.current_time()
            assert await client_lines.next() == f"open {SESSIONS}"
            opened_s = trio.current_time() - started
            addresses = [Address("127.0.0.1", p) for p in ports]

            def counts() -> list[int]:
                return [app.registry.state(a).active for a in addresses]

            assert sorted(counts()) == [0, SESSIONS // 2, SESSIONS - SESSIONS // 2]
            app.reload(load_config(write_config(path, ports)))  # the pool grows

            samples: list[tuple[float, int]] = []  # (time, closes ordered so far)
            grown = trio.current_time()
            reached_s = None
            while trio.current_time() - grown < 60:
                samples.append((trio.current_time(), app.rebalancer.closed))
                now_counts = counts()
                if sum(now_counts) == SESSIONS and max(now_counts) <= 1.25 * SESSIONS / 3:
                    reached_s = trio.current_time() - grown
                    break
                await trio.sleep(0.05)
            assert reached_s is not None, f"max/mean still {max(counts()) * 3 / SESSIONS:.3f} after 60 s: {counts()}"
            # the rate: in every window of 1 s (a scaled minute) fewer than 2 % of the sessions were closed
            worst = 0
            first = 0
            for t, closed in samples:
                while samples[first][0] < t - 1.0:
                    first += 1
                worst = max(worst, closed - samples[first][1])
            assert worst < 0.02 * SESSIONS, (worst, SESSIONS)
            assert app.rebalancer.closed >= SESSIONS // 6  # what it takes: 1500 → 1250 on each old backend
            with trio.fail_after(10):  # every client closed by the rebalancer came back
                while sum(counts()) != SESSIONS:
                    await trio.sleep(0.05)
            assert sum(n for key, n in app.metrics.refusals.items()) == 0

            def rebalanced() -> int:
                return sum(n for key, n in app.metrics.sessions_closed.items() if key[3] == "rebalance")

            # every close the rebalancer ordered ends as a session closed for "rebalance" (a close ordered
            # just now is counted once its close handshake is over)
            with trio.move_on_after(10):
                while rebalanced() != app.rebalancer.closed:
                    await trio.sleep(0.05)
            assert rebalanced() == app.rebalancer.closed
            print(
                f"sessions={SESSIONS} opened_in_s={opened_s:.1f} reached_in_s={reached_s:.1f} "
                f"closed={app.rebalancer.closed} worst_1s_window={worst} final={counts()}"
            )
        finally:
            for process in (clients, backends):
                assert process.stdin is not None
                await process.stdin.aclose()
            with trio.move_on_after(10):
                await clients.wait()
            app.abort()
            for process in (clients, backends):
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def _sticky_closes(nursery: trio.Nursery, tmp_path: Path, sticky: bool) -> int:
    """20 sessions pinned by client address to one of 2 backends, rebalance on: how many get closed in 1 s."""
    from tests.kit.servers import start_ws_backend
    from websockets.trio.client import connect

    ports = [await start_ws_backend(nursery) for _ in range(2)]
    path = tmp_path / "sticky.yaml"
    write_config(path, ports)
    document = yaml.safe_load(path.read_text())
    document["pools"]["main"]["sticky"] = {"key": "ip"}
    document["pools"]["main"]["rebalance"] = {"max_skew": 1.25, "rate": "100%/s", "sticky": sticky}
    path.write_text(yaml.safe_dump(document))
    app = App(load_config(str(path)))
    app.rebalancer.period_s = 0.05
    proxy_port = (await nursery.start(app.serve))["edge"][0][1]
    async with trio.open_nursery() as clients:
        for _ in range(20):

            async def hold() -> None:
                async with connect(f"ws://127.0.0.1:{proxy_port}/", proxy=None, compression=None) as ws:
                    with trio.move_on_after(1.5):
                        await ws.wait_closed()

            clients.start_soon(hold)
    app.abort()
    return app.rebalancer.closed


async def test_sticky_pools_are_left_alone_unless_asked(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        assert await _sticky_closes(nursery, tmp_path, sticky=False) == 0
        assert await _sticky_closes(nursery, tmp_path, sticky=True) >= 5  # 20 on one backend: 10 over the limit
