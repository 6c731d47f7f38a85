"""An admin request whose handling raises: 500 to the client, the traceback to the log (never to the client)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import trio

from wsproxy.control import admin_routes


async def test_a_reload_that_raises_answers_500_and_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def reloader() -> list[str]:
        raise RuntimeError("secret detail of the failure")

    server = SimpleNamespace(reloader=reloader, app=None, token=None, config=None)
    with trio.fail_after(5), caplog.at_level(logging.ERROR, logger="wsproxy.control.admin"):
        status, headers, body = await admin_routes.answer_reload(server, "127.0.0.1:1")  # type: ignore[arg-type]
    assert (status, body) == (500, b"internal error\n")
    assert b"secret" not in body
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])
    assert "event=error" in record.getMessage() and "path=/reload" in record.getMessage()


async def test_an_answer_that_has_to_wait_and_raises_answers_500(caplog: pytest.LogCaptureFixture) -> None:
    """A supervisor's sessions API (``_Later``, asked of the workers) that raises: the same 500 and log line."""

    async def ask_workers() -> admin_routes.Answer:
        raise RuntimeError("secret detail of the failure")

    with trio.fail_after(5), caplog.at_level(logging.ERROR, logger="wsproxy.control.admin"):
        status, _headers, body = await admin_routes.finish(admin_routes.Later(ask_workers), b"GET", b"/sessions?identity=x")
    assert (status, body) == (500, b"internal error\n")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "secret detail" in str(record.exc_info[1])  # type: ignore[index]
    assert "path=/sessions " in record.getMessage() + " " and "identity" not in record.getMessage()
