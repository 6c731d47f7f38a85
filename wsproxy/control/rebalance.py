"""The rebalancer: a trio task that applies ``balance.rebalance`` to every pool that asks for it.

Once per ``PERIOD_S`` it looks at each pool with ``rebalance`` (skipping a
pool with sticky routing unless ``rebalance.sticky``: its clients would come
back to the same backend, or lose what pinned them there):

1. the pool's open sessions, minus those whose close is already ordered;
2. its serving backends (health up, not draining, not ejected; a full
   backend still serves what it has) and their weights;
3. the budget (``Budget``: ``rate`` of the pool's sessions per second, no bursts);
4. ``choose`` → the sessions to close, which are closed with 1012 to the
   client and 1001 to the backend, spread over the next period (close
   frames at frame boundaries, as a drain's).

Each round that closes something logs one line (``event=rebalance``). The
closes are counted in ``wsproxy_sessions_closed_total{outcome="rebalance"}``.

What this is not: the decision (``balance.rebalance``, pure), nor where the
clients go when they reconnect (the pool's balancer: ``least_conn`` and
``random_two`` send them to the emptier backends at once; ``round_robin``
sends a share back, which the next rounds take again).
"""

from __future__ import annotations

import logging
from functools import partial
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from ..balance.rebalance import Budget, Candidate, choose
from ..config.schema import Address, Config, PoolConfig, PoolName
from ..log import log_event
from ..proto.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from ..proto.relay import Outcome
from .drain import close_spread
from ..balance.registry import Health, Registry

if TYPE_CHECKING:
    from ..edge.session import Session

log = logging.getLogger("wsproxy.rebalance")

#: How often the rebalancer looks; the closes a round orders are spread over the next period.
PERIOD_S = 1.0


def serving_weights(pool: PoolConfig, registry: Registry, now: float) -> dict[Address, int]:
    """The pool's backends that serve now (health up, not draining, not ejected), with their weights."""
    weights = {}
    for backend in pool.backends:
        health = registry.health(pool.name, backend.address)  # health and ejection are the pool's own
        if health.health is Health.UP and not registry.state(backend.address).draining and not now < health.ejected_until:
            weights[backend.address] = backend.weight
    return weights


def pool_sessions(sessions: Mapping[str, Session], pool: PoolName) -> list[Session]:
    """The open sessions of ``pool`` whose close nobody ordered yet."""
    return [
        s for s in sessions.values()
        if s.route is not None and s.route.pool == pool and s.backend is not None and s.relay is not None
        and not s.draining
    ]  # fmt: skip


class Rebalancer:
    """The rebalancing of one App: a budget per pool, and the task that spends it."""

    def __init__(
        self, registry: Registry, sessions: Mapping[str, Session], config: Callable[[], Config], rng: random.Random
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.config = config
        self.rng = rng
        self.budgets: dict[PoolName, Budget] = {}
        self.closed = 0  # sessions whose close a round ordered
        self.period_s = PERIOD_S

    def round(self, now: float, elapsed_s: float) -> list[tuple[PoolName, list[Session]]]:
        """One look at every pool: what to close now (the sessions are marked ``draining`` at once)."""
        orders = []
        config = self.config()
        for name in list(self.budgets):
            if name not in config.pools or config.pools[name].rebalance is None:
                del self.budgets[name]
        for pool in config.pools.values():
            settings = pool.rebalance
            if settings is None:
                continue
            if pool.sticky is not None and not settings.sticky:
                self.budgets.pop(pool.name, None)
                continue
            budget = self.budgets.get(pool.name)
            if budget is None:
                budget = self.budgets[pool.name] = Budget(settings.rate_per_s, self.period_s)
                elapsed = 0.0  # a new pool (or a new setting) starts without credit
            else:
                budget.rate_per_s = settings.rate_per_s
                elapsed = elapsed_s
            sessions = pool_sessions(self.sessions, pool.name)
            allowed = budget.refill(len(sessions), elapsed)
            if not allowed:
                continue
            monotonic = time.monotonic()
            candidates = [
                Candidate(s.conn_id, s.backend.address, monotonic - s.started) for s in sessions if s.backend is not None
            ]
            chosen = choose(candidates, serving_weights(pool, self.registry, now), settings.max_skew, allowed)
            if not chosen:
                continue
            budget.spend(len(chosen))
            picked = [self.sessions[c.key] for c in chosen]
            for session in picked:
                session.draining = True
            self.closed += len(picked)
            per_backend: dict[Address, int] = {}
            for c in chosen:
                per_backend[c.backend] = per_backend.get(c.backend, 0) + 1
            log_event(
                log,
                logging.INFO,
                "rebalance",
                pool=pool.name,
                sessions=len(sessions),
                closing=len(picked),
                **{'from': ",".join(f"{a}:{n}" for a, n in per_backend.items())},
            )  # fmt: skip
            orders.append((pool.name, picked))
        return orders

    async def run(self) -> None:
        """Every ``period_s``: a round, whose closes are spread over the next period. Until cancelled."""
        period_s = self.period_s
        async with trio.open_nursery() as nursery:
            last = trio.current_time()
            while True:
                await trio.sleep(period_s)
                now = trio.current_time()
                for _pool, picked in self.round(now, now - last):
                    nursery.start_soon(partial(
                        close_spread, picked, period_s, CLOSE_SERVICE_RESTART, CLOSE_GOING_AWAY, "rebalancing",
                        Outcome.REBALANCE, live=self.sessions, rng=self.rng,
                    ))  # fmt: skip
                last = now
