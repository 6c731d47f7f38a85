"""The idle sweeper: idle timeouts and keepalive pings for every session, without per-chunk timers.

One pass over the open sessions every ``sweep_period`` (an eighth of
``timeouts.idle``, or a quarter of the shortest keepalive interval or timeout,
between 20 ms and 5 s). A session keeps the timeouts and keepalive of the
config it started with, so the period is the shortest over the running config
and every config that still has open sessions: a reload that loosens them does
not make the older sessions wait longer. A session is idle when its byte
counters have not moved since the sweeper last saw them move; past ``timeouts.idle`` (of the
config the session started with) its relay is told to close with 1001 both
ways. A session past its deadline (token expiry, forward auth's lifetime,
``max_session_age``: ``control.lifetime``) is told to close first. Keepalive pings and dead-peer verdicts are the relay machine's
(``RelayDriver.keepalive``); the sweeper only gives it the time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from ..config.schema import Config
from ..proto.frames import CLOSE_GOING_AWAY
from ..proto.relay import Outcome
from . import lifetime

if TYPE_CHECKING:
    from ..edge.session import Session

MIN_PERIOD_S = 0.02
MAX_PERIOD_S = 5.0
#: The longest period when tokens bound sessions: an expired token lives at most this much past its close time.
LIFETIME_PERIOD_S = 1.0


def sweep_period_s(config: Config) -> float:
    """How often the sweeper looks, for the running ``config``."""
    period = config.timeouts.idle_s / 8
    for route in config.routes:
        if route.keepalive is not None:
            period = min(period, route.keepalive.timeout_s / 4, route.keepalive.interval_s / 4)
        if route.max_session_age_s is not None:
            period = min(period, route.max_session_age_s / 50)  # within 2 % of the age
        auth = route.auth
        if auth is not None and (auth.enforce_expiry or (auth.forward is not None and auth.forward.lifetime_from)):
            period = min(period, LIFETIME_PERIOD_S)
    return min(max(period, MIN_PERIOD_S), MAX_PERIOD_S)


def sweep_period(running: Config, sessions: Mapping[str, Session]) -> float:
    """How often the sweeper looks: for ``running`` and the configs of the generations with open ``sessions``."""
    configs = {id(running): running}
    for session in sessions.values():
        config = session.generation.config
        if id(config) not in configs:
            configs[id(config)] = config
    return min(sweep_period_s(config) for config in configs.values())


def sweep(sessions: Mapping[str, Session], now: float) -> float:
    """One pass: close the idle sessions, give the others their keepalive tick.

    Returns the shortest ``sweep_period_s`` over the configs of the sessions
    it saw (``MAX_PERIOD_S`` for none): the next period comes from the same
    walk, not a second one over every session.
    """
    period = MAX_PERIOD_S
    seen: set[int] = set()
    for session in list(sessions.values()):
        config = session.generation.config
        if id(config) not in seen:
            seen.add(id(config))
            period = min(period, sweep_period_s(config))
        relay = session.relay
        if relay is None or lifetime.due(session, now):
            continue
        mark = relay.bytes_up + relay.bytes_down
        if mark != session.idle_mark:
            session.idle_mark = mark
            session.idle_since = now
        elif now - session.idle_since >= session.generation.config.timeouts.idle_s:
            relay.finish(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "idle timeout", Outcome.IDLE)
            continue
        keepalive = session.route.keepalive if session.route is not None else None
        if keepalive is not None:
            relay.keepalive(now, keepalive.interval_s, keepalive.timeout_s)
    return period


async def idle_sweeper(sessions: Mapping[str, Session], config: Callable[[], Config]) -> None:
    """Sweep forever (until cancelled) at the period of the running config and the sessions' own (``sweep_period``).

    After the first pass the sessions' part of the period is what the last
    pass saw (``sweep``): a session established since then under an older
    generation's config (a handshake that straddled a reload) is looked at
    within the running config's period once, then at its own.
    """
    period = sweep_period(config(), sessions)
    while True:
        await trio.sleep(period)
        seen = sweep(sessions, trio.current_time())
        period = min(seen, sweep_period_s(config()))
