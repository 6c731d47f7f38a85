"""The sweeper's period across a reload, on trio's virtual clock.

A session keeps the idle timeout and keepalive of the config it started
under. After a reload that loosens them, the sweeper must still look often
enough for the old sessions: its period is the shortest over the running
config and every config that still has open sessions. Real relays over socket
pairs (``tests.kit.relayed``) under the real ``idle_sweeper``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.kit.relayed import DRIVERS, Behaviour, Seen, answer, relayed, session_for
from tests.kit.servers import make_config
from tests.kit.ws import OP_PING
from wsproxy.app import Generation
from wsproxy.config.schema import Config, KeepaliveConfig, PoolName, RouteConfig, TimeoutsConfig
from wsproxy.control.sweeper import MAX_PERIOD_S, idle_sweeper, sweep, sweep_period, sweep_period_s
from wsproxy.proto.relay import Outcome

EPS = 1e-6


def config_with(idle_s: float, keepalive: KeepaliveConfig | None = None) -> Config:
    route = RouteConfig(pool=PoolName("main"), keepalive=keepalive)
    return make_config([9], routes=(route,), timeouts=TimeoutsConfig(idle_s=idle_s))


TIGHT = config_with(8.0, KeepaliveConfig(interval_s=2.0, timeout_s=1.0))  # period 0.25 s
LOOSE = config_with(80.0)  # period MAX_PERIOD_S (5 s)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_old_session_keeps_its_keepalive_timing_after_a_reload_that_loosened_it(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Its dead backend is found ``timeout`` after the ping, within the old config's period, not the new one's."""
    running = TIGHT
    client, backend = Seen(), Seen()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, relayed(driver) as r:
            session = session_for(r.relay, Generation(TIGHT, 1))
            nursery.start_soon(answer, r.client, client)
            nursery.start_soon(answer, r.backend, backend, Behaviour(pong=False, answer_close=False))
            nursery.start_soon(idle_sweeper, {session.conn_id: session}, lambda: running)
            await trio.sleep(0.1)
            running = LOOSE  # the reload
            ended = await r.wait_ended()
            nursery.cancel_scope.cancel()
    period = sweep_period_s(TIGHT)
    pings = [f.at for f in backend.of(OP_PING)]
    assert pings and pings[0] <= 2.0 + period + EPS, pings  # the interval of the session's own config
    assert pings[0] + 1.0 - EPS <= ended <= pings[0] + 1.0 + period + EPS, (pings, ended)
    assert r.relay.machine.kind is Outcome.KEEPALIVE


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_old_session_keeps_its_idle_timeout_timing_after_a_reload_that_loosened_it(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    running = TIGHT
    client, backend = Seen(), Seen()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, relayed(driver) as r:
            session = session_for(r.relay, Generation(config_with(8.0), 1))  # idle 8 s: period 1 s
            nursery.start_soon(answer, r.client, client)
            nursery.start_soon(answer, r.backend, backend)
            nursery.start_soon(idle_sweeper, {session.conn_id: session}, lambda: running)
            await trio.sleep(0.1)
            running = LOOSE
            ended = await r.wait_ended()
            nursery.cancel_scope.cancel()
    assert r.relay.machine.kind is Outcome.IDLE
    first_look = sweep_period_s(TIGHT)  # the sweeper's first sleep, before the reload
    assert 8.0 - EPS <= ended <= first_look + 8.0 + sweep_period_s(config_with(8.0)) + EPS, ended


def test_the_period_is_the_shortest_over_the_running_config_and_the_configs_with_open_sessions() -> None:
    old = session_for(None, Generation(TIGHT, 1), conn_id="old")
    new = session_for(None, Generation(LOOSE, 2), conn_id="new")
    assert sweep_period(LOOSE, {}) == sweep_period_s(LOOSE) == MAX_PERIOD_S
    assert sweep_period(LOOSE, {"new": new}) == MAX_PERIOD_S
    assert sweep_period(LOOSE, {"old": old, "new": new}) == sweep_period_s(TIGHT) == 0.25
    assert sweep_period(TIGHT, {"new": new}) == 0.25


def test_a_pass_returns_the_period_of_the_configs_it_saw() -> None:
    """The sweeper's next period comes from the pass's own walk (no second walk over every session)."""
    old = session_for(None, Generation(TIGHT, 1), conn_id="old")
    new = session_for(None, Generation(LOOSE, 2), conn_id="new")
    assert sweep({}, 0.0) == MAX_PERIOD_S
    assert sweep({"new": new}, 0.0) == MAX_PERIOD_S
    assert sweep({"old": old, "new": new}, 0.0) == sweep_period_s(TIGHT) == 0.25
