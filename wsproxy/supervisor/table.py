"""What the supervisor decides, without I/O: the worker table, restart backoff, the two-phase reload,
how the limits of a config are split across workers, and a config's fingerprint.

Restart backoff
---------------
A worker that exits is restarted after ``Backoff.delay_s``: 0.1 s after the
first exit, doubled for each exit in a row up to 10 s; a worker that ran for
``STABLE_S`` resets the count. While a slot has no running worker, another
worker accepts on its sockets (``adopt``), so the connections that reach its
socket are served and not left in a queue nobody reads.

Reload: "apply in all, report per worker, no worker left on a config the others refused"
-------------------------------------------------------------------------------------------
The supervisor loads and validates the file once (files included), keeping
the texts of the YAML files it read (``config.snapshot``), and opens the
sockets of new listeners for every slot: what can fail, fails there, before
any worker is asked. Then a ``ReloadRound``:

1. ``prepare`` to every ready worker, with that snapshot: each composes the
   config from it (it builds its own, since a config holds TLS contexts, which
   do not travel) and reports ``prepared`` with its errors, or with the
   fingerprint of what it loaded. A worker that loaded something else (a file
   the config references, such as a token file, changed in between) counts
   as a refusal.
2. When every worker answered (or exited: it is no longer part of the round),
   the round decides: ``commit`` everywhere if all prepared the same config,
   else ``abandon`` everywhere. Nothing changed anywhere before this point.
3. ``commit`` cannot fail for a reason the supervisor did not already check
   (the sockets are open, the config validated); a worker that still reports
   a failure is restarted, and starts on the new config like the others.

The outcome (applied, or the errors per worker) is logged, counted and
answered to ``POST /reload``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from ..config.schema import Config, RateConfig

#: A worker that ran this long before exiting is restarted after the first delay again.
STABLE_S = 10.0
#: The first restart delay, and the largest.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 10.0


@dataclass(slots=True)
class Backoff:
    """Restart delays of one slot: 0.1, 0.2, 0.4 ... 10 s, reset by a worker that ran STABLE_S."""

    exits_in_a_row: int = 0

    def exited(self, ran_s: float) -> float:
        """Record an exit after ``ran_s`` seconds of life; the delay before the next start."""
        if ran_s >= STABLE_S:
            self.exits_in_a_row = 0
        delay: float = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(self.exits_in_a_row, 30))
        self.exits_in_a_row += 1
        return delay


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, not yet serving
    READY = "ready"  # serving (accepting on its slot's sockets)
    RETIRING = "retiring"  # not accepting; its sessions go on until they end or upgrade.timeout
    DOWN = "down"  # no process (waiting for the restart delay)


@dataclass(slots=True)
class WorkerSlot:
    """Slot ``index`` of the table: its current worker process and its history."""

    index: int
    pid: int | None = None
    state: WorkerState = WorkerState.DOWN
    started_at: float = 0.0  # trio time of the last spawn
    started_unix: float | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    report: dict[str, Any] | None = None  # the last status it sent
    metrics: str = ""  # the last metrics text it sent
    adopted_by: int | None = None  # the slot whose worker accepts on this slot's sockets while it is down


def adopter(slots: list[WorkerSlot], orphan: int) -> int | None:
    """The READY slot that should accept on ``orphan``'s sockets: the one adopting the fewest, lowest index first."""
    ready = [s for s in slots if s.state is WorkerState.READY and s.index != orphan]
    if not ready:
        return None
    load = {s.index: sum(1 for o in slots if o.adopted_by == s.index) for s in ready}
    return min(ready, key=lambda s: (load[s.index], s.index)).index


class RoundState(enum.Enum):
    PREPARING = "preparing"
    COMMITTING = "committing"
    APPLIED = "applied"
    ABANDONED = "abandoned"


@dataclass(slots=True)
class ReloadRound:
    """One two-phase reload across the workers (see the module docstring)."""

    number: int
    fingerprint: str  # of the config the supervisor loaded
    waiting: set[int]  # slots whose answer to the current phase is awaited
    state: RoundState = RoundState.PREPARING
    errors: list[str] = field(default_factory=list)  # "worker N (pid P): message"
    restart: set[int] = field(default_factory=set)  # slots that failed to commit: restart them
    _pids: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def begin(cls, number: int, fingerprint: str, slots: dict[int, int | None]) -> ReloadRound:
        """A round over ``slots`` (slot → pid): prepare is sent to each of them."""
        round_ = cls(number, fingerprint, set(slots))
        round_._pids = dict(slots)
        if not slots:  # no worker is serving: the new config is simply what the next ones start with
            round_.state = RoundState.APPLIED
        return round_

    @property
    def done(self) -> bool:
        return self.state in (RoundState.APPLIED, RoundState.ABANDONED)

    def _who(self, slot: int) -> str:
        return f"worker {slot} (pid {self._pids.get(slot)})"

    def prepared(self, slot: int, errors: list[str], fingerprint: str | None) -> RoundState:
        """A worker's answer to ``prepare``; returns the state (COMMITTING: send commit, ABANDONED: abandon)."""
        if self.state is not RoundState.PREPARING or slot not in self.waiting:
            return self.state
        self.waiting.discard(slot)
        if errors:
            self.errors.extend(f"{self._who(slot)}: {error}" for error in errors)
        elif fingerprint != self.fingerprint:
            self.errors.append(
                f"{self._who(slot)}: loaded a different config than the supervisor (the file changed during the reload)"
            )
        return self._advance()

    def committed(self, slot: int, errors: list[str]) -> RoundState:
        if self.state is not RoundState.COMMITTING or slot not in self.waiting:
            return self.state
        self.waiting.discard(slot)
        if errors:
            self.errors.extend(f"{self._who(slot)}: {error} (restarting it on the new config)" for error in errors)
            self.restart.add(slot)
        return self._advance()

    def gone(self, slot: int) -> RoundState:
        """The worker of ``slot`` exited: it is no longer part of the round (its restart loads the outcome)."""
        self.waiting.discard(slot)
        return self._advance() if not self.done else self.state

    def _advance(self) -> RoundState:
        if self.waiting:
            return self.state
        if self.state is RoundState.PREPARING:
            if self.errors:
                self.state = RoundState.ABANDONED
            else:
                self.state = RoundState.COMMITTING
                self.waiting = {s for s in self._pids}
        elif self.state is RoundState.COMMITTING:
            self.state = RoundState.APPLIED
        return self.state

    def committing_to(self, alive: set[int]) -> set[int]:
        """The slots to send ``commit`` to (those still alive); the others leave the round."""
        self.waiting &= alive
        if not self.waiting and self.state is RoundState.COMMITTING:
            self.state = RoundState.APPLIED
        return set(self.waiting)


def split_limits(config: Config, workers: int) -> Config:
    """``config`` as one of ``workers`` workers enforces it: the whole-proxy limits divided, rounded up.

    ``limits.max_connections`` (when set: the default comes from each process's own
    descriptor limit), ``max_connections_per_ip``, ``handshake_rate_per_ip`` and each
    backend's ``max_connections`` are per process; a worker gets ceil(limit / N) of each, so the proxy as a whole
    holds at most limit + N - 1. Connections reach workers by the kernel's
    SO_REUSEPORT hash of the 4-tuple, so a worker may reach its share while
    another has room: a client can be refused a little before the whole proxy
    holds the limit (README, "Workers").
    """
    if workers <= 1:
        return config
    limits = config.limits
    rate = limits.handshake_rate_per_ip
    split = dataclasses.replace(
        limits,
        max_connections=math.ceil(limits.max_connections / workers) if limits.max_connections else limits.max_connections,
        max_connections_per_ip=math.ceil(limits.max_connections_per_ip / workers),
        handshake_rate_per_ip=(
            None if rate is None
            else RateConfig(rate_per_s=rate.rate_per_s / workers, burst=math.ceil(rate.burst / workers))
        ),
    )
    pools = {
        name: dataclasses.replace(
            pool,
            backends=tuple(
                dataclasses.replace(b, max_connections=math.ceil(b.max_connections / workers)) for b in pool.backends
            ),
        )
        for name, pool in config.pools.items()
    }
    return dataclasses.replace(config, limits=split, pools=pools)


def hello_refusal(hello: dict[str, Any], version: str, fingerprint: str) -> str | None:
    """Why a worker's ``hello`` keeps it from starting (None: it may start).

    Checked in this order: another version (the package was upgraded on disk
    under a running proxy), the worker's own load errors, then a config other
    than the one in effect (``fingerprint``: a file it references changed).
    """
    if hello.get("version") != version:
        return (
            f"the installed wsproxy is {hello.get('version')}, this supervisor and its workers run {version}:"
            " `wsproxy upgrade` (or a restart) moves the whole proxy to it"
        )
    if hello.get("errors"):
        return "; ".join(hello["errors"])
    if hello.get("fingerprint") != fingerprint:
        return (
            "the config loaded differs from the config in effect (a file it references changed since"
            " it was loaded); reload to apply it"
        )
    return None


def fingerprint(config: Config) -> str:
    """A digest of everything a config says (secrets included, as digests), to tell two loads apart.

    Objects built at load time count by their type only, and positions in
    the file (``where``) and the file's name (``source``) not at all: two
    loads of the same file compare equal, and so do two files that say the
    same in other lines. The contents of certificate files are not part of it
    (their names are).
    """
    digest = hashlib.sha256()
    _feed(digest, config)
    return digest.hexdigest()[:32]


def _feed(digest: hashlib._Hash, value: object) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode() + b"(")
        for f in dataclasses.fields(value):
            if f.name in ("source", "where"):
                continue
            digest.update(f.name.encode() + b"=")
            _feed(digest, getattr(value, f.name))
        digest.update(b")")
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, (frozenset, set)):
        digest.update(b"<")
        for text in sorted(repr(item) for item in value):
            digest.update(text.encode())
        digest.update(b">")
    elif isinstance(value, bytes):
        digest.update(b"b" + hashlib.sha256(value).digest())
    elif value is None or isinstance(value, (bool, int, float, str, enum.Enum)):
        digest.update(repr(value).encode() + b",")
    else:  # objects built at load time (ssl.SSLContext, compiled patterns...): their type only
        digest.update(type(value).__name__.encode() + b",")
