"""Keepalive timing (``routes[].keepalive``) on trio's virtual clock, with both relay drivers.

The app's sweeper (``control.sweeper.idle_sweeper``) gives every session its
keepalive tick; the relay machine pings each side every ``interval_s``, takes
the pongs out of the stream, and declares a side dead when its pong is
``timeout_s`` late. Here real relays run over socket pairs
(``tests.kit.relayed``) under a real sweeper, and the peers are played raw, so
every time below is virtual and exact to the sweeper's period.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.kit.relayed import DRIVERS, FAILURE_CODE, Behaviour, Relayed, Seen, answer, relayed, session_for
from tests.kit.servers import make_config
from tests.kit.wait import until
from tests.kit.ws import OP_BINARY, OP_PING, OP_PONG, frame_header
from wsproxy.app import Generation
from wsproxy.config.schema import Config, KeepaliveConfig, PoolName, RouteConfig, TimeoutsConfig
from wsproxy.control.sweeper import idle_sweeper, sweep_period_s
from wsproxy.edge.session import Session
from wsproxy.proto.relay import Outcome

pytestmark = pytest.mark.parametrize("driver", DRIVERS)

INTERVAL_S, TIMEOUT_S = 2.0, 1.0
KEEPALIVE = KeepaliveConfig(interval_s=INTERVAL_S, timeout_s=TIMEOUT_S)


def config_with(keepalive: KeepaliveConfig | None, idle_s: float = 60.0) -> Config:
    route = RouteConfig(pool=PoolName("main"), keepalive=keepalive)
    return make_config([9], routes=(route,), timeouts=TimeoutsConfig(idle_s=idle_s))


CONFIG = config_with(KEEPALIVE)
PERIOD_S = sweep_period_s(CONFIG)  # 0.25 s: a quarter of the timeout
EPS = 1e-6


class Played:
    """A relayed session, its ``Session`` for the sweeper, and what each peer received."""

    def __init__(self, r: Relayed, session: Session) -> None:
        self.r = r
        self.session = session
        self.client = Seen()
        self.backend = Seen()


@asynccontextmanager
async def session(
    driver: str,
    generation: Generation,
    nursery: trio.Nursery,
    *,
    conn_id: str = "c1",
    client: Behaviour = Behaviour(),
    backend: Behaviour = Behaviour(),
) -> AsyncIterator[Played]:
    """One relayed session of ``generation``, both peers answering as told."""
    async with relayed(driver) as r:
        played = Played(r, session_for(r.relay, generation, conn_id=conn_id))
        nursery.start_soon(answer, r.client, played.client, client)
        nursery.start_soon(answer, r.backend, played.backend, backend)
        yield played


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


async def test_pings_go_to_both_sides_every_interval_and_pongs_are_taken_out_of_the_stream(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, session(driver, Generation(CONFIG, 1), nursery) as s:
            table = {s.session.conn_id: s.session}
            nursery.start_soon(idle_sweeper, table, lambda: CONFIG)
            await trio.sleep(20.1)
            assert not s.r.ended.is_set()  # every ping answered: alive
            nursery.cancel_scope.cancel()
    for seen in (s.client, s.backend):
        pings = [f.at for f in seen.of(OP_PING)]
        assert len(pings) >= 8, pings
        assert INTERVAL_S - EPS <= pings[0] <= INTERVAL_S + PERIOD_S + EPS  # the interval runs from the first look
        for gap in gaps(pings):
            assert INTERVAL_S - EPS <= gap <= INTERVAL_S + PERIOD_S + EPS, pings
        assert not seen.of(OP_PONG)  # the other side's pongs were swallowed, not relayed
    assert s.client.of(OP_PING)[0].masked is False and s.backend.of(OP_PING)[0].masked is True  # §5.1
    assert s.r.relay.bytes_up == 0 and s.r.relay.bytes_down == 0  # the pongs were not forwarded


@pytest.mark.parametrize("dead", ["backend", "client"])
async def test_an_unanswered_ping_ends_the_session_timeout_after_it_went_out(
    driver: str, dead: str, autojump_clock: trio.testing.MockClock
) -> None:
    silent = Behaviour(pong=False, answer_close=False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            kw = {dead: silent}
            async with session(driver, Generation(CONFIG, 1), nursery, **kw) as s:  # type: ignore[arg-type]
                nursery.start_soon(idle_sweeper, {"c1": s.session}, lambda: CONFIG)
                ended = await s.r.wait_ended()
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    gone, alive = (s.backend, s.client) if dead == "backend" else (s.client, s.backend)
    ping_at = gone.of(OP_PING)[0].at
    assert ping_at + TIMEOUT_S - EPS <= ended <= ping_at + TIMEOUT_S + PERIOD_S + EPS, (ping_at, ended)
    assert gone.close is None and gone.eof_at is not None  # its TCP closes without a close frame
    assert alive.close is not None
    if dead == "backend":
        assert alive.close.close == (FAILURE_CODE, "backend not responding")
    else:
        assert alive.close.close == (1001, "client not responding")
    assert s.r.relay.machine.kind is Outcome.KEEPALIVE


async def test_a_late_pong_within_the_timeout_keeps_the_session_and_each_ping_has_its_own_deadline(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    late = Behaviour(pong_after_s=TIMEOUT_S - 2 * PERIOD_S)  # answered, but late
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, session(
            driver, Generation(CONFIG, 1), nursery, backend=late, client=late
        ) as s:
            nursery.start_soon(idle_sweeper, {"c1": s.session}, lambda: CONFIG)
            await trio.sleep(30)
            assert not s.r.ended.is_set(), s.r.relay.machine.reason
            nursery.cancel_scope.cancel()
    assert len(s.backend.of(OP_PING)) >= 10 and len(s.client.of(OP_PING)) >= 10


async def test_pings_of_the_peers_themselves_are_relayed_with_their_pongs(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Even while a ping of the proxy's is out, a pong of the same length: only the one with its payload is taken out."""
    by_hand = Behaviour(pong=False)  # the test answers the backend's pings itself, in its own order
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, session(
            driver, Generation(CONFIG, 1), nursery, backend=by_hand
        ) as s:
            nursery.start_soon(idle_sweeper, {"c1": s.session}, lambda: CONFIG)
            await until(lambda: bool(s.backend.of(OP_PING)), what="the proxy's ping to the backend")
            ours = s.backend.of(OP_PING)[0].payload
            await s.r.client.send_frame(OP_PING, b"client-8")
            await until(lambda: len(s.backend.of(OP_PING)) == 2, what="the client's ping through the proxy")
            assert s.backend.of(OP_PING)[1].payload == b"client-8"
            await s.r.backend.send_frame(OP_PONG, b"client-8")  # the client's first...
            await s.r.backend.send_frame(OP_PONG, ours)  # ...then the proxy's
            await s.r.backend.send_frame(OP_PING, b"backend8")
            await trio.sleep(2 * TIMEOUT_S)
            assert not s.r.ended.is_set(), s.r.relay.machine.reason  # the proxy's ping was answered
            nursery.cancel_scope.cancel()
    assert b"backend8" in [f.payload for f in s.client.of(OP_PING)]
    assert [f.payload for f in s.client.of(OP_PONG)] == [b"client-8"]  # only the client's own
    assert [f.payload for f in s.backend.of(OP_PONG)] == [b"backend8"]


async def test_a_ping_waits_for_the_end_of_the_frame_in_flight_and_a_side_sending_one_is_alive(
    driver: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The backend sends one long frame slowly, for longer than interval + timeout: it cannot answer a ping
    meanwhile, but bytes keep coming from it, so it is alive; the client's ping goes after the frame's end."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, session(
            driver, Generation(CONFIG, 1), nursery, backend=Behaviour(pong=False)  # it pongs after its frame
        ) as s:
            nursery.start_soon(idle_sweeper, {"c1": s.session}, lambda: CONFIG)
            chunks = 20
            await s.r.backend.send(frame_header(OP_BINARY, chunks * 10))
            for n in range(chunks):  # 10 s of one frame, 10 bytes every 0.5 s
                await s.r.backend.send(b"%010d" % n)
                await trio.sleep(0.5)
            frame_end = trio.current_time() - 0.5
            assert not s.r.ended.is_set(), s.r.relay.machine.reason  # 10 s > interval + timeout: alive
            await s.r.backend.send_frame(OP_PONG, s.backend.of(OP_PING)[0].payload)  # the ping it got at 2.25 s
            await trio.sleep(2 * PERIOD_S)  # the pong is taken (the next ping, unanswered, is not this test's)
            assert not s.r.ended.is_set(), s.r.relay.machine.reason
            nursery.cancel_scope.cancel()
    data = s.client.of(OP_BINARY)
    assert len(data) == 1 and data[0].payload == b"".join(b"%010d" % n for n in range(chunks))  # whole, uncut
    pings = s.client.of(OP_PING)
    assert pings and pings[0].at >= frame_end - EPS  # none inside the frame; the first one right after it
    assert pings[0].at <= frame_end + PERIOD_S + EPS


async def test_keepalive_does_not_keep_an_idle_session_open(driver: str, autojump_clock: trio.testing.MockClock) -> None:
    """The proxy's pings and the pongs it takes out are not relayed bytes: with nothing else, the session is idle."""
    config = config_with(KEEPALIVE, idle_s=8.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, session(driver, Generation(config, 1), nursery) as s:
            nursery.start_soon(idle_sweeper, {"c1": s.session}, lambda: config)
            ended = await s.r.wait_ended()
            nursery.cancel_scope.cancel()
    assert len(s.client.of(OP_PING)) >= 3 and len(s.backend.of(OP_PING)) >= 3  # answered all along
    assert s.r.relay.machine.kind is Outcome.IDLE and 8.0 - EPS <= ended <= 8.0 + 2 * PERIOD_S + EPS, ended
    assert s.client.close is not None and s.client.close.close == (1001, "idle timeout")


async def test_a_reload_changes_keepalive_for_new_sessions_only(driver: str, autojump_clock: trio.testing.MockClock) -> None:
    """The old session keeps the keepalive of the config it started with; the new one gets the reloaded one."""
    loose = KeepaliveConfig(interval_s=6.0, timeout_s=3.0)
    old_config, new_config = config_with(loose), CONFIG
    running = old_config
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with session(driver, Generation(old_config, 1), nursery, conn_id="old") as old:
                table = {"old": old.session}
                nursery.start_soon(idle_sweeper, table, lambda: running)
                await trio.sleep(1.0)
                running = new_config  # the reload
                async with session(driver, Generation(new_config, 2), nursery, conn_id="new") as new:
                    table["new"] = new.session
                    await trio.sleep(24.0)
                    nursery.cancel_scope.cancel()
    for seen in (old.client, old.backend):
        pings = [f.at for f in seen.of(OP_PING)]
        assert len(pings) >= 3
        assert all(6.0 - EPS <= gap <= 6.0 + PERIOD_S + EPS for gap in gaps(pings)), pings
    for seen in (new.client, new.backend):
        pings = [f.at for f in seen.of(OP_PING)]
        assert len(pings) >= 10
        assert all(INTERVAL_S - EPS <= gap <= INTERVAL_S + PERIOD_S + EPS for gap in gaps(pings)), pings
