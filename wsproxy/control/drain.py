"""Draining: taking a backend out of rotation and closing its sessions, gently.

A drain has three causes (``DrainCause``): the admin API (``POST
/backends/.../drain``), an active health check that marked the backend DOWN
(with ``drain.on_unhealthy``), and a reload that removed the backend from its
pool. Each waits ``drain.timeout`` (clients and backends may move on their
own), then closes the remaining sessions of that pool on that backend spread
over ``drain.spread`` with 1012 to the client and 1001 to the backend, so the
clients do not all reconnect in the same instant.

A drain can be called off before its time comes: an undrain, a health check
that sees the backend UP again, or a later reload that puts the backend back.
Each drain carries an epoch; the closing task checks that its epoch is still
the current one (``still``) before every close.

This module decides nothing about *which* backend to pick (that is
``balance``) and never touches sockets: closing a session is an order given to
its relay (``RelayDriver.finish``), which sends the close frames itself.
``close_spread`` is also what a shutdown uses (1001 both ways).
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..config.schema import Address, DrainConfig, PoolConfig, PoolName
from ..proto.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from ..proto.relay import Outcome
from ..balance.registry import BackendState, Health, Registry
from ..log import log_event

if TYPE_CHECKING:
    from ..edge.session import Session

log = logging.getLogger("wsproxy.drain")

#: Random share of a spread interval added to each close, so closes do not fall on a grid.
SPREAD_JITTER = 0.5


class DrainCause(str, enum.Enum):
    """Why a backend drains; the value is the word in logs, /status and the close reason."""

    ADMIN = "admin"
    UNHEALTHY = "unhealthy"
    REMOVED = "removed by reload"


def sessions_on(sessions: Iterable[Session], pool: str, address: Address) -> list[Session]:
    """The open sessions of ``pool`` relayed to ``address``."""
    return [
        s for s in sessions
        if s.backend is not None and s.backend.address == address and s.route is not None and s.route.pool == pool
    ]


async def close_spread(
    sessions: Sequence[Session],
    spread_s: float,
    client_code: int,
    backend_code: int,
    reason: str,
    kind: Outcome,
    *,
    live: Mapping[str, Session],
    rng: random.Random,
    still: Callable[[], bool] = lambda: True,
) -> None:
    """Close ``sessions`` evenly over ``spread_s``, each at a jittered point of its slot.

    The order is shuffled (nobody is always first). A session that ended on
    its own meanwhile (no longer in ``live``) is skipped; ``still`` returning
    False stops the rest.
    """
    count = len(sessions)
    if not count:
        return
    slot_s = spread_s / count
    start = trio.current_time()
    order = list(sessions)
    rng.shuffle(order)
    for index, session in enumerate(order):
        await trio.sleep_until(start + slot_s * (index + rng.uniform(0, SPREAD_JITTER)))
        if not still():
            return
        relay = session.relay
        if relay is not None and session.conn_id in live:
            session.draining = True
            relay.finish(client_code, backend_code, reason, kind)


@dataclass(frozen=True, slots=True)
class _Order:
    """One drain: which sessions, with which settings, while ``still()`` holds; ``done`` runs at the end."""

    pool: PoolName
    address: Address
    drain: DrainConfig
    cause: DrainCause
    still: Callable[[], bool]
    done: Callable[[], None] | None = None


class Drainer:
    """Drains of one App: by admin order, by health verdict and by reload removal.

    ``pools`` returns the running generation's pools (a drain ordered now uses
    the settings of the config in force); ``nursery`` is where the waiting and
    closing tasks run (the App's control nursery: a shutdown cancels them).
    """

    def __init__(
        self,
        registry: Registry,
        sessions: Mapping[str, Session],
        pools: Callable[[], Mapping[PoolName, PoolConfig]],
        rng: random.Random,
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.pools = pools
        self.rng = rng
        self.nursery: trio.Nursery | None = None
        self._removals: dict[tuple[PoolName, Address], int] = {}  # removal drains: (pool, backend) → epoch

    # -- by admin order -------------------------------------------------------------

    def drain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: drain a backend of a pool. None if unknown, False if it was draining already."""
        backend = self._find(pool, address)
        if backend is None:
            return None
        if self.registry.state(backend).draining:
            return False
        self.drain(PoolName(pool), backend, self.pools()[PoolName(pool)].drain, DrainCause.ADMIN)
        return True

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        """Admin: take a backend back into rotation. None if unknown, False if it was not draining."""
        backend = self._find(pool, address)
        if backend is None:
            return None
        state = self.registry.state(backend)
        if not state.draining:
            return False
        self._undrain(state)
        log_event(log, logging.INFO, "undrain", pool=pool, backend=backend)
        return True

    def _find(self, pool: str, address: str) -> Address | None:
        config = self.pools().get(PoolName(pool))
        if config is None:
            return None
        return next((b.address for b in config.backends if str(b.address) == address), None)

    # -- by health verdict ------------------------------------------------------------

    def health_changed(self, pool: PoolConfig, address: Address, health: Health) -> None:
        """A health checker's verdict: DOWN drains (with ``drain.on_unhealthy``), UP ends such a drain."""
        if health is Health.DOWN and pool.drain.on_unhealthy:
            self.drain(pool.name, address, pool.drain, DrainCause.UNHEALTHY)
        elif health is Health.UP:
            state = self.registry.state(address)
            if state.draining and state.drain_reason == DrainCause.UNHEALTHY.value:
                self._undrain(state)

    # -- by reload removal --------------------------------------------------------------

    def drain_removed(self, removed: Iterable[tuple[PoolName, Address, DrainConfig]]) -> None:
        """Backends a reload took out of their pool: their sessions of that pool drain.

        The backend's state is not marked draining (another pool may still use
        it); the pool no longer picks it because it is not in the pool.
        """
        for pool, address, drain in removed:
            key = (pool, address)
            epoch = self._removals[key] = self._removals.get(key, 0) + 1

            def still(key: tuple[PoolName, Address] = key, epoch: int = epoch) -> bool:
                config = self.pools().get(key[0])
                back = config is not None and any(b.address == key[1] for b in config.backends)
                return self._removals.get(key) == epoch and not back

            def done(key: tuple[PoolName, Address] = key, epoch: int = epoch) -> None:
                if self._removals.get(key) == epoch:  # not superseded by a later removal of the same backend
                    del self._removals[key]  # so many reloads, and backends that come back, leave nothing behind

            self._close_later(_Order(pool, address, drain, DrainCause.REMOVED, still, done))

    def removing(self, pool: PoolName) -> list[Address]:
        """Backends that left ``pool`` and whose removal drain is pending (not back in the pool)."""
        config = self.pools().get(pool)
        present = {b.address for b in config.backends} if config is not None else set()
        return [a for (p, a) in self._removals if p == pool and a not in present]

    # -- the drain itself ---------------------------------------------------------------

    def drain(self, pool: PoolName, address: Address, drain: DrainConfig, cause: DrainCause) -> None:
        """Take a backend out of rotation (every pool: the state is per address), then close its sessions."""
        state = self.registry.state(address)
        if state.draining:
            return
        state.draining = True
        state.drain_reason = cause.value
        state.drain_epoch += 1
        epoch = state.drain_epoch
        self._close_later(_Order(pool, address, drain, cause, lambda: state.drain_epoch == epoch))

    def _undrain(self, state: BackendState) -> None:
        state.draining = False
        state.drain_reason = ""
        state.drain_epoch += 1  # a drain still waiting for its grace period gives up

    def _close_later(self, order: _Order) -> None:
        log_event(
            log,
            logging.INFO,
            "drain",
            pool=order.pool,
            backend=order.address,
            reason=order.cause.value,
            sessions=len(sessions_on(self.sessions.values(), order.pool, order.address)),
            close_after_s=order.drain.timeout_s,
            spread_s=order.drain.spread_s,
        )
        if self.nursery is not None:
            self.nursery.start_soon(self._wait_and_close, order)

    async def _wait_and_close(self, order: _Order) -> None:
        try:
            await self._wait_and_close_now(order)
        finally:  # closed, called off (the backend came back, undrained) or cancelled by the shutdown
            if order.done is not None:
                order.done()

    async def _wait_and_close_now(self, order: _Order) -> None:
        await trio.sleep(order.drain.timeout_s)
        if not order.still():
            return
        sessions = sessions_on(self.sessions.values(), order.pool, order.address)
        log_event(
            log,
            logging.INFO,
            "drain_closing",
            pool=order.pool,
            backend=order.address,
            sessions=len(sessions),
        )
        await close_spread(
            sessions,
            order.drain.spread_s,
            CLOSE_SERVICE_RESTART,
            CLOSE_GOING_AWAY,
            f"backend draining ({order.cause.value})",
            Outcome.DRAIN,
            live=self.sessions,
            rng=self.rng,
            still=order.still,
        )
