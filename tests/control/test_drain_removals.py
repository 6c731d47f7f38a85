"""Removal drains on trio's virtual clock: what the Drainer remembers of backends a reload removed.

A removed backend's drain is pending until it ends: its sessions closed, or called off because a
later reload put the backend back. Either way nothing stays behind (flapping DNS discovery removes
and re-adds backends all day).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

import trio
import trio.testing

from tests.kit.servers import make_config
from wsproxy.balance.registry import Registry
from wsproxy.config.schema import Address, DrainConfig, PoolConfig, PoolName
from wsproxy.control.drain import Drainer

MAIN = PoolName("main")
DRAIN = DrainConfig(timeout_s=30.0, spread_s=10.0)
GONE = Address("127.0.0.1", 9002)  # the backend a reload removes
WITH = make_config([9001, 9002]).pools  # the pools before the reload (and after one that puts it back)
WITHOUT = {MAIN: dataclasses.replace(WITH[MAIN], backends=WITH[MAIN].backends[:1])}


async def test_a_removed_backend_that_comes_back_leaves_nothing_behind(autojump_clock: trio.testing.MockClock) -> None:
    running: list[Mapping[PoolName, PoolConfig]] = [WITHOUT]
    drainer = Drainer(Registry(), {}, lambda: running[0], random.Random(1))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            drainer.nursery = nursery
            drainer.drain_removed([(MAIN, GONE, DRAIN)])
            assert drainer.removing(MAIN) == [GONE]
            await trio.sleep(1)
            running[0] = WITH  # a reload puts it back before the drain's timeout
            assert drainer.removing(MAIN) == []
            await trio.sleep(DRAIN.timeout_s + DRAIN.spread_s)
    assert drainer._removals == {}


async def test_a_removal_drain_that_runs_its_course_leaves_nothing_behind(autojump_clock: trio.testing.MockClock) -> None:
    drainer = Drainer(Registry(), {}, lambda: WITHOUT, random.Random(1))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            drainer.nursery = nursery
            drainer.drain_removed([(MAIN, GONE, DRAIN)])
            await trio.sleep(DRAIN.timeout_s - 1)
            assert drainer.removing(MAIN) == [GONE]
            await trio.sleep(DRAIN.spread_s + 2)
    assert drainer._removals == {}


async def test_a_second_removal_keeps_its_own_entry_when_the_first_ends(autojump_clock: trio.testing.MockClock) -> None:
    running: list[Mapping[PoolName, PoolConfig]] = [WITHOUT]
    drainer = Drainer(Registry(), {}, lambda: running[0], random.Random(1))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            drainer.nursery = nursery
            drainer.drain_removed([(MAIN, GONE, DRAIN)])
            await trio.sleep(5)
            drainer.drain_removed([(MAIN, GONE, DRAIN)])  # removed again by a later reload: a new epoch
            await trio.sleep(DRAIN.timeout_s - 2)  # the first order's time is up, the second's is not
            assert drainer.removing(MAIN) == [GONE]
            await trio.sleep(DRAIN.spread_s + 10)
    assert drainer._removals == {}
