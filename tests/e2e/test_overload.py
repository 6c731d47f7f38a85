"""Local overload on a real ``wsproxy run`` started under a low fd limit (issue 15, item 5).

The proxy runs with ``RLIMIT_NOFILE`` 64 (``resource.setrlimit`` in the child
before exec). Backends are trio-websocket echo servers in the test process,
with tcp health checks that take a backend down after one failure and passive
ejection after one failure, so that any local error wrongly blamed on a
backend shows at once. Clients are raw TCP upgrade requests that hold their
session open once they get a 101.

1. ``limits.max_connections`` absent: derived from the fd limit and logged;
   the clients beyond it get 503 with ``Retry-After``.
2. ``limits.max_connections: 1000`` (more than 64 fds allow, warned): the
   proxy really runs out of descriptors. Every client still gets an answer
   within a bound, 101 or 503 with ``Retry-After`` (shed by the accept loop,
   or refused when the upstream socket cannot be created); no backend is
   ejected or marked down; no connect failure is blamed on a backend.

Both end with the load gone and a new client served normally.
"""

from __future__ import annotations

import base64
import os
import re
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.kit.process import AdminProxy, addr, run_proxy
from tests.kit.servers import closed_port, start_backend

NOFILE = 64


def low_fd_limit() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@asynccontextmanager
async def run_limited_proxy(tmp_path: Path, config: dict[str, Any], port: int) -> AsyncIterator[AdminProxy]:
    """``run_proxy`` with RLIMIT_NOFILE at ``NOFILE``; yielded once both backends' first checks are up."""
    async with run_proxy(tmp_path, config, ports=[port], stop_timeout_s=10, preexec_fn=low_fd_limit) as proxy:
        await proxy.wait_log(re.compile(r"event=health .*state=up"), count=2)  # first checks done: both backends up
        yield proxy


def config_for(port: int, admin_port: int, backends: list[int], **limits: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "main", "bind": addr(port)}],
        "routes": [{"path": "/", "pool": "echo"}],
        "pools": {
            "echo": {
                "retries": 1,
                "health": {"type": "tcp", "interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1},
                "passive": {"failures": 1, "window": "10s", "ejection": "30s", "max_ejected_percent": 100},
                "backends": [{"address": addr(p)} for p in backends],
            }
        },
        "admin": {"bind": addr(admin_port)},
        "limits": limits,
        "shutdown": {"timeout": "3s", "spread": "0s"},
    }


async def client(port: int, results: list[tuple[int, dict[str, str], float]], release: trio.Event) -> None:
    """One upgrade request; records (status, headers, seconds to the answer); holds a 101 until ``release``."""
    start = trio.current_time()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    status, headers = 0, {}
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        results.append((-1, {}, trio.current_time() - start))  # refused: never answered
        return
    async with stream:
        data = b""
        try:
            await stream.send_all(request)
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        except trio.BrokenResourceError:
            pass
        head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
        if head:
            status = int(head.split(" ", 2)[1])
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
            }
        results.append((status, headers, trio.current_time() - start))
        if status == 101:
            await release.wait()


async def backends_healthy(proxy: AdminProxy, ports: list[int]) -> None:
    status = await proxy.status()
    for backend in status["pools"]["echo"]["backends"]:
        assert backend["health"] == "up", status
        assert not backend["ejected"], status


async def one_session(port: int) -> int:
    results: list[tuple[int, dict[str, str], float]] = []
    release = trio.Event()
    release.set()
    with trio.fail_after(5):
        await client(port, results, release)
    return results[0][0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("explicit", [False, True], ids=["derived-max-connections", "explicit-over-the-fd-limit"])
async def test_many_clients_under_a_low_fd_limit_get_101_or_503_and_no_backend_is_blamed(
    nursery: trio.Nursery, tmp_path: Path, explicit: bool
) -> None:
    b1, b2 = await start_backend(nursery, "b1"), await start_backend(nursery, "b2")
    port, admin_port = closed_port(), closed_port()
    limits = {"max_connections": 1000} if explicit else {}
    config = config_for(port, admin_port, [b1.port, b2.port], **limits)
    count = 120
    async with run_limited_proxy(tmp_path, config, port) as proxy:
        log = proxy.log()
        if explicit:
            assert re.search(r"event=limits max_connections=1000 reason=\"more than RLIMIT_NOFILE=64 allows", log), log
        else:
            match = re.search(r"event=limits max_connections=(\d+) rlimit_nofile=64 ", log)
            assert match, log
            derived = int(match[1])
            assert 1 <= derived <= NOFILE // 2
        results: list[tuple[int, dict[str, str], float]] = []
        release = trio.Event()
        async with trio.open_nursery() as clients:
            for _ in range(count):
                clients.start_soon(client, port, results, release)
            with trio.fail_after(20):  # every client answered within a bound
                while len(results) < count:
                    await trio.sleep(0.01)
            statuses = sorted({status for status, _, _ in results})
            ok = sum(1 for status, _, _ in results if status == 101)
            refused = [(status, headers) for status, headers, _ in results if status != 101]
            slowest_s = max(elapsed for _, _, elapsed in results)
            # Let the health checks run while the proxy is at its limit.
            await trio.sleep(0.6)
            release.set()
        text = proxy.log()
        assert statuses and set(statuses) <= {101, 503}, (statuses, text[-3000:])
        # A burst of 120 against 64 descriptors: connections still being refused hold descriptors
        # too, so on a busy machine even the admitted ones may find none for their upstream (503).
        assert refused, ok
        for status, headers in refused:
            assert headers.get("retry-after") == "1", headers
        if not explicit:
            assert ok <= derived
        assert "event=upstream_failed" not in text and "event=ejected" not in text, text[-3000:]
        assert "state=down" not in text, text[-3000:]
        assert "Traceback" not in text and "event=error" not in text, text[-3000:]
        # Every 503 was counted once (wsproxy_refused_total), the accept loop's sheds included.
        counted = await proxy.status()
        assert counted["refused"] == len(refused), (counted["refused_by_reason"], len(refused))
        if explicit:  # the proxy really ran out of descriptors, and said so at most once a second
            overload_lines = [line for line in text.splitlines() if "event=accept_overload" in line or "event=local_overload" in line]
            assert overload_lines, text[-3000:]
            assert len(overload_lines) <= 2 * (slowest_s + 2) * 3, overload_lines
        # The load is gone: normal service, and both backends still up and not ejected.
        with trio.fail_after(10):
            while await one_session(port) != 101:
                await trio.sleep(0.1)
        await backends_healthy(proxy, [b1.port, b2.port])
