"""Backend state that outlives a config generation. No I/O here.

The ``Registry`` holds two kinds of state, neither of them module-level:

- ``BackendState`` per backend *address*: what the backend itself carries,
  whichever pool sent the session: its sessions (``active``, which
  ``max_connections`` limits), traffic counters, and draining.
- ``HealthState`` per *(pool, address)*: what a pool concluded about the
  address: active-check health, passive ejection and the slow-start ramp. Two
  pools that list the same address may check it differently (or not at all),
  so one pool's verdict never takes the address out of another pool: a pool
  without active checks counts its backends as healthy even while another
  pool's check fails the same address.

Entries are keyed by address (and pool name), not by config object, so a
reload that keeps a backend keeps its counters, health and ejections.

Theory of operation
-------------------
A backend's availability for a new session of a pool is the conjunction of
four independent facts, each with its own owner:

- health (active checks, ``control.health``, per pool): UNKNOWN until the
  first result; a new backend is UP after its first pass, a DOWN one after
  ``rise`` consecutive passes; any backend is DOWN after ``fall`` consecutive
  failures. In a pool without active checks the health checker marks every
  backend UP. UNKNOWN backends take no traffic unless the pool says
  ``start_healthy``.
- ejection (passive health, the session code, per pool): ``failures`` connect
  or upgrade failures within ``window_s`` eject the backend for ``ejection_s``,
  doubled for each ejection in a row (at most 10x), and never more than
  ``max_ejected_percent`` of a pool at once.
- draining (operator or reload, per address): no new sessions.
- capacity (per address): ``active < max_connections``.

Slow start: a backend *recovers* when it becomes UP (its first pass, or
``rise`` passes after DOWN) and when an ejection ends. ``t`` seconds after its
last recovery its weight is scaled by ``max(0.05, t / slow_start_s)`` until
``t`` reaches ``slow_start_s``: a backend back from an ejection ramps exactly
like one back from DOWN.

All times are ``trio.current_time()`` values passed in by the caller.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..config.schema import Address, BackendConfig, PassiveHealthConfig, PoolName

#: The smallest share of its weight a slow-starting backend gets.
SLOW_START_FLOOR = 0.05
#: An ejection lasts at most this many times the configured ejection time.
MAX_EJECTION_FACTOR = 10


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(slots=True)
class BackendState:
    """What a backend address carries whichever pool sent the session."""

    address: Address
    active: int = 0  # sessions holding a Lease: established, or trying this backend
    total: int = 0  # sessions ever established
    # what the sessions that have ended relayed (live ones are counted by their relays)
    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    # -- operator
    draining: bool = False
    drain_reason: str = ""  # "admin" or "unhealthy"
    drain_epoch: int = 0  # bumped by every drain and undrain: a pending drain checks it is still current

    def full(self, backend: BackendConfig) -> bool:
        return bool(backend.max_connections) and self.active >= backend.max_connections


@dataclass(slots=True)
class HealthState:
    """What one pool concluded about one backend address: health, ejection, slow start."""

    pool: PoolName
    address: Address
    # -- active health checks
    health: Health = Health.UNKNOWN
    passes: int = 0  # consecutive passed checks
    failures: int = 0  # consecutive failed checks
    last_check: str = ""  # "ok", or why the last check failed
    last_check_at: float | None = None
    rtt_s: float | None = None  # round trip of the last passed check
    up_since: float | None = None  # when it last became UP (slow start)
    # -- passive health
    recent_failures: deque[float] = field(default_factory=deque)  # times of failures in the window
    ejected_until: float = 0.0  # also when the last ejection ended: a recovery (slow start)
    ejections: int = 0  # ejections in a row (reset by a success after an ejection)

    def record_check(self, ok: bool, reason: str, now: float, *, rise: int, fall: int) -> str | None:
        """Count one active check; return a log message when the health changes."""
        self.last_check = "ok" if ok else reason
        self.last_check_at = now
        if ok:
            self.passes += 1
            self.failures = 0
            # A new backend takes traffic after its first pass; a DOWN one after `rise`.
            if self.health is Health.UNKNOWN or (self.health is Health.DOWN and self.passes >= rise):
                before: Health = self.health
                self.health = Health.UP
                self.up_since = now
                return f"{before.value} -> up: {self.passes} consecutive passes"
        else:
            self.failures += 1
            self.passes = 0
            if self.health is not Health.DOWN and self.failures >= fall:
                was: Health = self.health
                self.health = Health.DOWN
                self.up_since = None
                return f"{was.value} -> down: {self.failures} consecutive failures: {reason}"
        return None

    def mark_up(self, now: float) -> None:
        """Healthy without a check (pools without active checks, or start_healthy)."""
        self.passes = self.failures = 0  # a later check starts counting afresh
        if self.health is not Health.UP:
            self.health = Health.UP
            self.up_since = now

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def weight_factor(self, now: float, slow_start_s: float) -> float:
        """The share of its weight the backend gets now (slow start after its last recovery)."""
        if not slow_start_s or self.up_since is None:
            return 1.0
        recovered = max(self.up_since, self.ejected_until)  # became UP, or its ejection ended
        elapsed = now - recovered
        if elapsed >= slow_start_s:
            return 1.0
        return max(SLOW_START_FLOOR, elapsed / slow_start_s)


class Lease:
    """One session's hold on a backend: counted in its ``active`` from ``Registry.lease`` until ``release``.

    Taken when a backend is chosen for a connect attempt (so concurrent
    handshakes see each other in balancing and ``max_connections``), handed
    to the session when the backend accepts the upgrade, and released exactly
    once, whatever ends it: a failed connect or upgrade, a refusal, the
    relay's end, a cancellation. ``release`` is idempotent, so every path
    that may end a session can call it.
    """

    __slots__ = ("state", "released")

    def __init__(self, state: BackendState) -> None:
        self.state = state
        self.released = False
        state.active += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.active -= 1


def unavailable_because(state: BackendState, health: HealthState, backend: BackendConfig, now: float) -> str:
    """Why a backend may not take a new session of the pool now ("available" if it may).

    The first reason that applies: draining, down, not yet healthy, ejected, full.
    """
    if state.draining:
        return "draining"
    if health.health is Health.DOWN:
        return "down"
    if health.health is not Health.UP:
        return "not yet healthy"
    if health.ejected(now):
        return "ejected"
    if state.full(backend):
        return "full"
    return "available"


class Registry:
    __slots__ = ("_states", "_health", "retired")

    def __init__(self) -> None:
        self._states: dict[Address, BackendState] = {}
        self._health: dict[tuple[PoolName, Address], HealthState] = {}
        #: bytes up, bytes down, messages up, messages down of forgotten backends (process totals keep them)
        self.retired = [0, 0, 0, 0]

    def state(self, address: Address) -> BackendState:
        """The state of ``address``, created on first use."""
        state = self._states.get(address)
        if state is None:
            state = self._states[address] = BackendState(address)
        return state

    def lease(self, address: Address) -> Lease:
        """Count one more session on ``address`` until the lease is released."""
        return Lease(self.state(address))

    def health(self, pool: PoolName | str, address: Address) -> HealthState:
        """What ``pool`` knows of ``address``'s health, created (UNKNOWN) on first use."""
        key = (PoolName(pool), address)
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = HealthState(key[0], address)
        return health

    def available(self, pool: PoolName | str, backend: BackendConfig, now: float) -> bool:
        """May ``backend`` take a new session of ``pool`` now?"""
        return self.available_with(self.state(backend.address), self.health(pool, backend.address), backend, now)

    @staticmethod
    def available_with(state: BackendState, health: HealthState, backend: BackendConfig, now: float) -> bool:
        """``available``, with ``backend``'s state and its health in the pool looked up already."""
        return (
            health.health is Health.UP
            and not state.draining
            and not now < health.ejected_until
            and not state.full(backend)
        )

    def __iter__(self) -> Iterator[BackendState]:
        return iter(self._states.values())

    def forget(self, keep: set[Address], pools: set[tuple[PoolName, Address]] | None = None) -> None:
        """Drop the state of backends no pool has any more and no session uses.

        ``pools``: the (pool, address) pairs of the config in effect; the health
        of every other pair is dropped (None: health is kept for ``keep``'s addresses).
        """
        for address in [a for a, s in self._states.items() if a not in keep and s.active == 0]:
            state = self._states.pop(address)
            for i, value in enumerate((state.bytes_up, state.bytes_down, state.messages_up, state.messages_down)):
                self.retired[i] += value
        for key in [k for k in self._health if (k not in pools if pools is not None else k[1] not in keep)]:
            del self._health[key]

    def record_failure(
        self,
        pool: PoolName | str,
        address: Address,
        backends: Sequence[BackendConfig],
        now: float,
        config: PassiveHealthConfig,
    ) -> str | None:
        """Count a connect or upgrade failure in ``pool``; return a log message when it ejects the backend.

        The ejection is ``pool``'s: other pools that list the address keep using it.
        """
        state = self.health(pool, address)
        window = state.recent_failures
        window.append(now)
        while window and window[0] <= now - config.window_s:
            window.popleft()
        if len(window) < config.failures or state.ejected(now):
            return None
        ejected_now = sum(1 for b in backends if self.health(pool, b.address).ejected(now))
        if (ejected_now + 1) * 100 > config.max_ejected_percent * len(backends):
            return None  # the cap: keep serving from what is left
        factor = min(2**state.ejections, MAX_EJECTION_FACTOR)
        duration = config.ejection_s * factor
        state.ejected_until = now + duration
        state.ejections += 1
        window.clear()
        return f"ejected for {duration:g}s: {config.failures} failures within {config.window_s:g}s"

    def record_success(self, pool: PoolName | str, address: Address, now: float) -> None:
        """A session was established: a backend that served again after an ejection starts over."""
        state = self.health(pool, address)
        if state.ejections and not state.ejected(now):
            state.ejections = 0
