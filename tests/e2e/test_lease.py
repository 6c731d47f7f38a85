"""Every backend's ``active`` count returns to 0, whatever ended its sessions (balance.registry.Lease).

A real App on loopback with one pool per way a session can end: a connect
refused (502), a backend that refuses the upgrade (403, relayed), one that
never answers it (504), a first backend that fails before a second accepts,
normal sessions that relay and close, a client that vanishes mid-relay, and
handshakes cut by a shutdown's deadline. ``GET /status`` on the admin API
must show ``active`` 0 for every backend once they are over (and the live
ones while they last, so the check can see a count that stays up).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import trio
from trio_websocket import open_websocket_url

from tests.kit.admin import call
from tests.kit.backends import fixed, start_recording_backend
from tests.kit.servers import closed_port, make_config, raw_request, start_ws_backend, status_of
from tests.kit.wait import SLACK_S, until
from tests.kit.ws import upgrade_request
from wsproxy.app import App
from wsproxy.config.schema import (
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    PoolConfig,
    PoolName,
    RouteConfig,
    ShutdownConfig,
)
from wsproxy.control.admin import serve_admin

LOOPBACK = AdminConfig(bind=Address("127.0.0.1", 0))
REFUSAL = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: close\r\n\r\nno way"
UPSTREAM_HANDSHAKE_S = 0.3


def _config(ports: dict[str, list[int]], *, retries: int = 0, upstream_handshake_s: float = UPSTREAM_HANDSHAKE_S) -> Config:
    """One pool per path (``/NAME`` → pool NAME), each over ``ports[NAME]``."""
    pools = {
        PoolName(name): PoolConfig(
            name=PoolName(name),
            backends=tuple(BackendConfig(address=Address("127.0.0.1", p)) for p in backend_ports),
            retries=retries,
        )
        for name, backend_ports in ports.items()
    }
    base = make_config([])
    return dataclasses.replace(
        base,
        routes=tuple(RouteConfig(path=f"/{name}", pool=PoolName(name)) for name in ports),
        pools=pools,
        timeouts=dataclasses.replace(base.timeouts, upstream_handshake_s=upstream_handshake_s),
    )


async def _active(admin: str) -> dict[str, int]:
    """``backend address → active`` over every pool of ``GET /status``."""
    reply = await call(admin, "GET", "/status")
    assert reply.status == 200, reply
    found: dict[str, int] = {}
    for entry in reply.json()["pools"].values():  # type: ignore[attr-defined]
        for backend in entry["backends"]:
            found[backend["address"]] = backend["active"]
    return found


async def _refused(port: int, path: bytes) -> int:
    return status_of(await raw_request(port, upgrade_request(path), read_timeout_s=5 + SLACK_S))


async def test_active_returns_to_zero_after_failed_connects_refusals_timeouts_and_sessions(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(30):
        echo = await start_ws_backend(nursery)
        refusing, _ = await start_recording_backend(nursery, fixed(REFUSAL))
        silent, _ = await start_recording_backend(nursery)  # reads the upgrade, never answers
        down = closed_port()
        config = _config(
            {"down": [down], "refuse": [refusing], "silent": [silent], "flaky": [closed_port(), echo], "ok": [echo]},
            retries=1,
        )
        app = App(config)
        port = (await nursery.start(app.serve))["test"][0][1]
        admin = await nursery.start(partial(serve_admin, app, LOOPBACK))
        echo_name = f"127.0.0.1:{echo}"

        assert await _refused(port, b"/down") == 502
        assert await _refused(port, b"/refuse") == 403
        assert await _refused(port, b"/silent") == 504
        for _ in range(2):  # round robin: once the dead backend first (then the echo), once the echo first
            async with open_websocket_url(f"ws://127.0.0.1:{port}/flaky") as ws:
                await ws.send_message("via flaky")
                assert await ws.get_message() == "via flaky"

        async with open_websocket_url(f"ws://127.0.0.1:{port}/ok") as first:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ok") as second:
                await second.send_message("hi")
                assert await second.get_message() == "hi"
                await first.send_message("hi")
                assert await first.get_message() == "hi"
                assert (await _active(admin))[echo_name] == 2  # the live ones count
            # a client that vanishes without a close frame: its relay ends on the EOF
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(upgrade_request(b"/ok"))
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")
            await until(lambda: len(app.sessions) == 2, what="the raw session to be established")
            await stream.aclose()

        async def all_zero() -> bool:
            return set((await _active(admin)).values()) == {0}

        await until(
            all_zero, what="every backend's active count back to 0",
            show=lambda: [(str(state.address), state.active) for state in app.registry],
        )  # fmt: skip
        status = await _active(admin)
        assert set(status) >= {f"127.0.0.1:{p}" for p in (down, refusing, silent, echo)}
        assert app.metrics.closed_count == 5  # the sessions did relay and end (2 flaky, 2 ok, 1 raw)


async def test_handshakes_cut_by_the_shutdown_deadline_release_their_backend(nursery: trio.Nursery) -> None:
    """Sessions cancelled while their backend has not answered the upgrade: active goes back to 0."""
    with trio.fail_after(30):
        silent, recorder = await start_recording_backend(nursery)
        config = dataclasses.replace(
            _config({"silent": [silent]}, upstream_handshake_s=60),
            shutdown=ShutdownConfig(timeout_s=0.2, spread_s=0),
        )
        app = App(config)
        port = (await nursery.start(app.serve))["test"][0][1]
        admin = await nursery.start(partial(serve_admin, app, LOOPBACK))
        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(partial(raw_request, port, upgrade_request(b"/silent"), read_timeout_s=10))
            await until(lambda: recorder.connections == 3, what="three connections at the backend")
            assert (await _active(admin))[f"127.0.0.1:{silent}"] == 3  # held while the backend is being tried
            app.shutdown()  # no session is established: the deadline cancels the three handshakes
        assert (await _active(admin))[f"127.0.0.1:{silent}"] == 0
