"""close_spread on trio's virtual clock: how a drain or a shutdown spreads its closes.

Real sessions (``edge.session.Session``) with real relays (the trio pumps' ``Relay``
over socket pairs, built by ``tests.kit.relayed``, never run: ``finish`` acts on the
relay machine alone); the clock is ``trio.testing.MockClock`` with autojump, so a
10 s spread takes no wall time.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from tests.kit.relayed import build_relay, session_for
from tests.kit.servers import make_config
from wsproxy.app import Generation
from wsproxy.control.drain import SPREAD_JITTER, close_spread
from wsproxy.edge.session import Session
from wsproxy.proto.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from wsproxy.proto.relay import Outcome


@pytest.fixture
def sessions() -> Iterator[dict[str, Session]]:
    generation = Generation(make_config([9]), 1)
    socks: list[socket.socket] = []
    table: dict[str, Session] = {}
    for n in range(20):
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        socks += [a, b, c, d]
        session = session_for(build_relay("trio", a, c), generation, conn_id=f"s{n:02d}")
        table[session.conn_id] = session
    yield table
    for sock in socks:
        sock.close()


async def watch(sessions: dict[str, Session], closed: dict[str, float]) -> None:
    """Note the virtual time at which each session's close is ordered."""
    while len(closed) < len(sessions):
        for conn_id, session in sessions.items():
            if session.draining and conn_id not in closed:
                closed[conn_id] = trio.current_time()
        await trio.sleep(0.001)


@pytest.mark.parametrize("spread_s", [10.0, 0.5])
async def test_closes_fall_one_per_slot_in_a_shuffled_order(
    sessions: dict[str, Session], autojump_clock: trio.testing.MockClock, spread_s: float
) -> None:
    closed: dict[str, float] = {}
    order = list(sessions.values())
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(watch, sessions, closed)
        await close_spread(
            order, spread_s, CLOSE_SERVICE_RESTART, CLOSE_GOING_AWAY, "backend draining (admin)", Outcome.DRAIN,
            live=sessions, rng=random.Random(7),
        )  # fmt: skip
        with trio.fail_after(1):
            while len(closed) < len(sessions):
                await trio.sleep(0.001)
    slot_s = spread_s / len(sessions)
    times = sorted(t - start for t in closed.values())
    for index, at in enumerate(times):  # each close in its own slot, at most SPREAD_JITTER of a slot late
        assert index * slot_s - 0.002 <= at <= (index + SPREAD_JITTER) * slot_s + 0.002, (index, at)
    assert times[-1] < spread_s
    ordered = sorted(closed, key=closed.__getitem__)
    assert ordered != [s.conn_id for s in order]  # shuffled: nobody is always first
    for session in order:
        relay = session.relay
        assert relay is not None and (relay.machine.down.close_out or relay.machine.done)  # the close is queued


async def test_a_drain_called_off_stops_the_rest_and_ended_sessions_are_skipped(
    sessions: dict[str, Session], autojump_clock: trio.testing.MockClock
) -> None:
    order = list(sessions.values())
    live = dict(sessions)
    del live["s03"]  # ended on its own before its turn
    called_off_at = trio.current_time() + 5.0
    await close_spread(
        order, 10.0, CLOSE_SERVICE_RESTART, CLOSE_GOING_AWAY, "backend draining (admin)", Outcome.DRAIN,
        live=live, rng=random.Random(7), still=lambda: trio.current_time() < called_off_at,
    )  # fmt: skip
    closed = {s.conn_id for s in order if s.draining}
    assert "s03" not in closed
    assert 8 <= len(closed) <= 11  # about half of 20 slots of 0.5 s before 5 s; none after
    assert trio.current_time() - called_off_at < 0.5 + 0.001  # it stopped at the first slot after


async def test_the_sweeper_closes_a_session_idle_for_timeouts_idle_and_spares_a_moving_one(
    sessions: dict[str, Session], autojump_clock: trio.testing.MockClock
) -> None:
    """``idle_sweeper`` on the virtual clock, at the period of the config (timeouts.idle 8 s → every 1 s)."""
    import dataclasses

    from wsproxy.config.schema import TimeoutsConfig
    from wsproxy.control.sweeper import idle_sweeper

    config = dataclasses.replace(make_config([9]), timeouts=TimeoutsConfig(idle_s=8.0))
    generation = Generation(config, 2)
    quiet, busy = sessions["s00"], sessions["s01"]
    table = {s.conn_id: s for s in (quiet, busy)}
    for session in table.values():
        session.generation = generation
    with trio.move_on_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(idle_sweeper, table, lambda: config)
            start = trio.current_time()
            while trio.current_time() - start < 19:
                assert busy.relay is not None
                busy.relay.machine.feed(busy.relay.up, b"\x81\x80" + b"\x00" * 4, trio.current_time())  # an empty text frame
                await trio.sleep(0.5)
    assert quiet.relay is not None and busy.relay is not None
    assert quiet.relay.machine.done or quiet.relay.machine.down.close_out  # closed: idle for 8 s
    assert not busy.relay.machine.done and not busy.relay.machine.down.close_out  # it kept moving
