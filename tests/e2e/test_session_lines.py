"""``log.sessions``: which of a session's two info lines an in-process proxy writes.

A real trio-websocket client through the proxy to a real trio-websocket echo
backend, once per setting; the log is read from the records (caplog). A
refusal is logged whatever the setting: it is not a session line.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.kit.servers import make_config, raw_request, start_proxy, start_ws_backend, status_of
from tests.kit.wait import log_lines, until
from wsproxy.config.schema import LogConfig


@pytest.mark.parametrize(("sessions", "expected"), [("both", ["open", "close"]), ("close", ["close"]), ("none", [])])
async def test_a_session_writes_the_lines_its_config_asks_for(
    sessions: str, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            backend = await start_ws_backend(nursery)
            config = dataclasses.replace(make_config([backend]), log=LogConfig(sessions=sessions))
            app, port = await start_proxy(nursery, config)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                await until(lambda: len(app.sessions) == 1, what="the session established")
            await until(lambda: not app.sessions, what="the session ended")
            assert status_of(await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == 426
            await until(lambda: any("event=refused " in m for m in log_lines(caplog)), what="the refusal's line")
            nursery.cancel_scope.cancel()
    events = [m.split()[0].removeprefix("event=") for m in log_lines(caplog) if m.startswith(("event=open ", "event=close "))]
    assert events == expected
    if "close" in expected:
        close = next(m for m in log_lines(caplog) if m.startswith("event=close "))
        assert " by=client " in close and " client_code=1000 " in close and " up_msgs=1 " in close
