"""Backend state that outlives a config generation. No I/O here.

The ``Registry`` maps a backend address to its ``BackendState``. Entries are
keyed by address, not by config object, so a reload that keeps a backend keeps
its counters, health and ejections. It is created by the application and
passed down: there is no module-level state.

Theory of operation
-------------------
A backend's availability for a new session is the conjunction of four
independent facts, each with its own owner:

- health (active checks, ``control.health``): UNKNOWN until the first result;
  a new backend is UP after its first pass, a DOWN one after ``rise``
  consecutive passes; any backend is DOWN after ``fall`` consecutive failures.
  In a pool without active checks the health checker marks every backend UP.
  UNKNOWN backends take no traffic unless the pool says ``start_healthy``.
- ejection (passive health, the session code): ``failures`` connect or upgrade
  failures within ``window_s`` eject the backend for ``ejection_s``, doubled for
  each ejection in a row (at most 10x), and never more than
  ``max_ejected_percent`` of a pool at once.
- draining (operator or reload): no new sessions.
- capacity: ``active < max_connections``.

Slow start: a backend that became UP ``t`` seconds ago has its weight scaled
by ``max(0.05, t / slow_start_s)`` until ``t`` reaches ``slow_start_s``.

All times are ``trio.current_time()`` values passed in by the caller.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..config.schema import Address, BackendConfig, PassiveHealthConfig

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
    address: Address
    active: int = 0  # established sessions
    total: int = 0  # sessions ever established
    # what the sessions that have ended relayed (live ones are counted by their relays)
    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
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
    ejected_until: float = 0.0
    ejections: int = 0  # ejections in a row (reset by a success after an ejection)
    # -- operator
    draining: bool = False
    drain_reason: str = ""  # "admin" or "unhealthy"
    drain_epoch: int = 0  # bumped by every drain and undrain: a pending drain checks it is still current

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

    def available(self, now: float, backend: BackendConfig) -> bool:
        """May this backend take a new session now?"""
        return (
            self.health is Health.UP
            and not self.draining
            and not now < self.ejected_until
            and not (backend.max_connections and self.active >= backend.max_connections)
        )

    def full(self, backend: BackendConfig) -> bool:
        return bool(backend.max_connections) and self.active >= backend.max_connections

    def weight_factor(self, now: float, slow_start_s: float) -> float:
        """The share of its weight the backend gets now (slow start)."""
        if not slow_start_s or self.up_since is None:
            return 1.0
        elapsed = now - self.up_since
        if elapsed >= slow_start_s:
            return 1.0
        return max(SLOW_START_FLOOR, elapsed / slow_start_s)


class Registry:
    __slots__ = ("_states", "retired")

    def __init__(self) -> None:
        self._states: dict[Address, BackendState] = {}
        #: bytes up, bytes down, messages up, messages down of forgotten backends (process totals keep them)
        self.retired = [0, 0, 0, 0]

    def state(self, address: Address) -> BackendState:
        """The state of ``address``, created on first use."""
        state = self._states.get(address)
        if state is None:
            state = self._states[address] = BackendState(address)
        return state

    def __iter__(self) -> Iterator[BackendState]:
        return iter(self._states.values())

    def forget(self, keep: set[Address]) -> None:
        """Drop the state of backends no pool has any more and no session uses."""
        for address in [a for a, s in self._states.items() if a not in keep and s.active == 0]:
            state = self._states.pop(address)
            for i, value in enumerate((state.bytes_up, state.bytes_down, state.messages_up, state.messages_down)):
                self.retired[i] += value

    def record_failure(
        self, address: Address, pool: Sequence[BackendConfig], now: float, config: PassiveHealthConfig
    ) -> str | None:
        """Count a connect or upgrade failure; return a log message when it ejects the backend."""
        state = self.state(address)
        window = state.recent_failures
        window.append(now)
        while window and window[0] <= now - config.window_s:
            window.popleft()
        if len(window) < config.failures or state.ejected(now):
            return None
        ejected_now = sum(1 for b in pool if self.state(b.address).ejected(now))
        if (ejected_now + 1) * 100 > config.max_ejected_percent * len(pool):
            return None  # the cap: keep serving from what is left
        factor = min(2**state.ejections, MAX_EJECTION_FACTOR)
        duration = config.ejection_s * factor
        state.ejected_until = now + duration
        state.ejections += 1
        window.clear()
        return f"ejected for {duration:g}s: {config.failures} failures within {config.window_s:g}s"

    def record_success(self, address: Address, now: float) -> None:
        """A session was established: a backend that served again after an ejection starts over."""
        state = self.state(address)
        if state.ejections and not state.ejected(now):
            state.ejections = 0

