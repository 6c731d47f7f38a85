"""Old config vs new config → what a reload changes. Pure: no trio, no sockets, no I/O.

A reload builds a whole new ``Config`` (``config.load``); these functions
compare it with the running one and say what applying it means, so that the
code that applies it (``app.App.reload``, and the supervisor of ``workers: N``
for its health checkers) only carries the plan out:

- ``plan_listeners``: which running listener sockets the new listeners take
  (by bind address, so a rename keeps its socket), which open, which close;
- ``removed_backends``: the backends that left their pool, with the drain
  settings their sessions close under (``control.drain``);
- ``addresses_in_use``: the backends some pool still has (the registry forgets
  the others once they are idle);
- ``plan_checkers``: what happens to each pool's health checker.

What this is not: loading (``config.load``), the SIGHUP flow and its deadline
(``control.reload``), or applying (``app``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wsproxy.config.schema import Address, Config, DrainConfig, ListenerConfig, PoolConfig, PoolName

__all__ = ["CheckerAction", "ListenerPlan", "addresses_in_use", "plan_checkers", "plan_listeners", "removed_backends"]


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """How the listeners of a new config get their sockets.

    ``reuse``: new listener name → the running listener whose sockets it takes
    (matched by bind address first, so a rename keeps the socket; each running
    listener is taken at most once). ``open``: listeners that need new
    sockets. ``close``: running listeners nobody takes.
    """

    reuse: Mapping[str, str]
    open: tuple[ListenerConfig, ...]
    close: tuple[str, ...]


def plan_listeners(running: Mapping[str, Address], new: Sequence[ListenerConfig]) -> ListenerPlan:
    """Match the new listeners against the running ones (name → bind)."""
    by_bind: dict[Address, str] = {}
    for name, bind in running.items():
        by_bind.setdefault(bind, name)
    reuse: dict[str, str] = {}
    for spec in new:
        old = by_bind.get(spec.bind)
        if old is not None and old not in reuse.values():
            reuse[spec.name] = old
    taken = set(reuse.values())
    return ListenerPlan(
        reuse=reuse,
        open=tuple(spec for spec in new if spec.name not in reuse),
        close=tuple(name for name in running if name not in taken),
    )


def removed_backends(old: Config, new: Config) -> list[tuple[PoolName, Address, DrainConfig]]:
    """(pool, backend, drain settings) for every backend that left its pool.

    The drain settings are the new pool's when the pool stays, the old pool's
    when the pool itself was removed.
    """
    removed: list[tuple[PoolName, Address, DrainConfig]] = []
    for name, pool in old.pools.items():
        after = new.pools.get(name)
        kept = {b.address for b in after.backends} if after is not None else set()
        drain = after.drain if after is not None else pool.drain
        removed.extend((name, b.address, drain) for b in pool.backends if b.address not in kept)
    return removed


def addresses_in_use(config: Config) -> set[Address]:
    """Every backend address some pool of ``config`` has."""
    return {b.address for pool in config.pools.values() for b in pool.backends}


class CheckerAction(enum.Enum):
    UPDATE = "update"  # the running checker takes the new pool
    START = "start"  # a new checker (a new pool, or checks added to a pool whose checker has finished)
    STOP = "stop"  # the pool is gone


def plan_checkers(
    running: Mapping[PoolName, bool], new: Mapping[PoolName, PoolConfig]
) -> dict[PoolName, CheckerAction]:
    """What happens to each pool's health checker; ``running`` maps a pool to "its checker can still update"."""
    plan = {name: CheckerAction.STOP for name in running if name not in new}
    for name, pool in new.items():
        can_update = running.get(name)
        if can_update is None or (not can_update and pool.health is not None):
            plan[name] = CheckerAction.START
        else:
            plan[name] = CheckerAction.UPDATE
    return plan
