"""Waiting in tests: the one poller and the one time slack.

``until`` polls a condition on trio's clock and fails with an AssertionError
that says what was awaited and for how long. ``SLACK_S`` is the scheduling
slack a wall-clock bound adds on top of a configured time (a timeout, a
spread, a grace period) before the test calls the proxy late.

A loaded machine (CI beside other jobs, a laptop on battery) can scale the
slack with ``WSPROXY_TEST_SLACK`` (a factor, default 1; e.g. 3). The factor
only widens the upper bounds that check a timer fired in time; it never makes
a test pass that waits for something that does not happen, because every
bound that uses it still ends well before the next thing the test would
mistake for the timer.

``wait_for_log`` is ``until`` for a line in an in-process proxy's captured log.

This module is not a place for retries: a test that needs ``until`` to pass
an assertion it could make directly is hiding a race.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable

import pytest
import trio

#: Slack a bound adds on a machine of its own (seconds).
SLACK_BASE_S = 0.3
#: How much a loaded machine scales it (env WSPROXY_TEST_SLACK, default 1).
SLACK_FACTOR = float(os.environ.get("WSPROXY_TEST_SLACK", "1") or "1")
#: Slack on top of a configured time before a test calls the proxy late.
SLACK_S = SLACK_BASE_S * SLACK_FACTOR


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = 5.0,
    what: str = "the condition",
    poll_s: float = 0.005,
    show: Callable[[], object] | None = None,
) -> float:
    """Poll ``predicate`` (sync or async) every ``poll_s`` until it is true.

    Returns the ``trio.current_time()`` at which it was first seen true (tests
    that measure a delay subtract their own start from it). After ``timeout_s``
    it raises ``AssertionError("timed out after 5.00s waiting for WHAT: SHOW")``.
    """
    started = trio.current_time()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        now = trio.current_time()
        if result:
            return now
        if now - started >= timeout_s:
            detail = f": {show()}" if show is not None else ""
            raise AssertionError(f"timed out after {now - started:.2f}s waiting for {what}{detail}")
        await trio.sleep(poll_s)


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every message captured so far (an in-process proxy's log)."""
    return [record.getMessage() for record in caplog.records]


async def wait_for_log(caplog: pytest.LogCaptureFixture, *needles: str, within_s: float = 2.0) -> str:
    """The first captured log line that contains every one of ``needles`` (waits for it with ``until``)."""

    def found() -> str | None:
        return next((line for line in log_lines(caplog) if all(needle in line for needle in needles)), None)

    await until(
        lambda: found() is not None,
        timeout_s=within_s,
        poll_s=0.01,
        what=f"a log line with {needles}",
        show=lambda: "the log:\n" + "\n".join(log_lines(caplog)),
    )
    line = found()
    assert line is not None
    return line
