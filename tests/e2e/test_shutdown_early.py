"""A shutdown that arrives while the proxy is still starting (SIGTERM right after start, a
systemd stop during start-up) ends it cleanly: no accept on a closed socket, no error."""

from __future__ import annotations

import pytest
import trio

from tests.kit.servers import make_config
from wsproxy.app import App


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 5, 8])
async def test_shutdown_between_opening_the_listeners_and_accepting(yields: int) -> None:
    app = App(make_config([9]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.serve)
            while not app.listeners:  # the sockets are open; the accept loops have not run yet
                await trio.sleep(0)
            for _ in range(yields):
                await trio.sleep(0)
            app.shutdown()
    assert app.stopping and all(sock.fileno() == -1 for slot in app.listeners.values() for sock in slot.sockets)


async def test_shutdown_before_serving_opens_nothing() -> None:
    app = App(make_config([9]))
    app.shutdown()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(app.serve) == {}
    assert app.listeners == {}
