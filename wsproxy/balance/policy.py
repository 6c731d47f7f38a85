"""Backend selection: in which order the backends of a pool take the next session. No I/O here.

A ``Selector`` turns the *available* backends of one pool (as ``Candidate``
objects: the config, the live registry state and the effective weight) into
the order in which the proxy should try them: the first is the choice, the
rest are the failover candidates (each backend is tried at most once per
session). Selectors keep only their own bookkeeping (round-robin scores, a tie
rotation, a random generator); live session counts belong to
``balance.registry`` and are read, never written, here.

This module is not where availability, stickiness, slow start or retries are
decided: ``balance.plan`` filters the backends, computes effective weights and
sticky keys and truncates the order. Nothing here imports trio or touches a
socket.

Theory of operation
-------------------
Every algorithm measures load the same way: ``(active + 1) / weight``, the
share of the backend's weight it would use with one more session. The ``+ 1``
makes a heavy idle backend beat a light idle one.

- ``round_robin``: nginx's smooth weighted round robin; exact shares over a
  cycle, blind to load.
- ``least_conn``: the minimum load; ties rotate so that idle backends of equal
  weight take turns instead of the first one taking everything.
- ``random_two``: the power of two choices (Mitzenmacher): draw two distinct
  backends with probability proportional to weight, keep the less loaded. Almost
  as even as ``least_conn``, but instances that share backends do not herd
  onto the same idle one.
- ``hash``: weighted rendezvous hashing (highest random weight) of a key; see
  ``rendezvous_order``. With ``balance_factor`` it bounds loads (consistent
  hashing with bounded loads, Mirrokni et al.; HAProxy ``hash-balance-factor``):
  a backend already at ``ceil(factor/100 x (total_active + 1) x weight/total_weight)``
  live sessions is passed over and the key goes to the next backend of *its*
  rendezvous order. Since ``factor > 100`` the caps add up to more than the
  sessions after this pick, so some backend is always under its cap.

A key always means stickiness: when ``order`` gets one, every selector returns
the rendezvous order of that key (only ``RendezvousHash`` adds the load bound).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config.schema import BackendConfig, PoolConfig
from .registry import BackendState

__all__ = [
    "Candidate",
    "LeastConn",
    "RandomTwo",
    "RendezvousHash",
    "Selector",
    "SmoothWeightedRoundRobin",
    "least_conn_order",
    "load",
    "make_selector",
    "rendezvous_order",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One available backend of a pool, as a selector sees it."""

    backend: BackendConfig
    state: BackendState  # live counters, read only here
    weight: float  # effective weight: config weight x slow-start factor; > 0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"backend {self.backend.address}: effective weight must be > 0, got {self.weight}")


class Selector(Protocol):
    """Chooses among the available backends of one pool."""

    def order(self, candidates: Sequence[Candidate], key: bytes | None) -> list[Candidate]:
        """All of ``candidates``, the chosen one first, then the failover candidates.

        ``key`` is a sticky key (already extracted from the request), or None.
        """
        ...


def load(candidate: Candidate) -> float:
    """The weighted load with one more session: ``(active + 1) / weight``."""
    return (candidate.state.active + 1) / candidate.weight


def least_conn_order(candidates: Sequence[Candidate], rotation: int = 0) -> list[Candidate]:
    """``candidates`` by ascending load; equal loads in config order starting at index ``rotation % n``."""
    n = len(candidates)
    if n <= 1:
        return list(candidates)
    ranked = sorted(range(n), key=lambda i: (load(candidates[i]), (i - rotation) % n))
    return [candidates[i] for i in ranked]


def rendezvous_order(candidates: Sequence[Candidate], key: bytes) -> list[Candidate]:
    """``candidates`` in the weighted rendezvous order of ``key``, highest score first.

    Each backend scores ``-weight / ln(u)``, ``u`` in (0, 1) being a stable hash
    (BLAKE2b, not Python's salted ``hash()``) of the key and the backend
    address. The backend with the top score wins with probability
    ``weight / total_weight``, and adding or removing a backend only moves keys
    to or from that backend. The order depends on nothing but the key, the
    addresses and the weights, so independent instances agree.
    """
    # Length-prefixed, so that the key cannot run into the address.
    base = hashlib.blake2b(len(key).to_bytes(4, "big") + key, digest_size=8)
    scored: list[tuple[float, str, Candidate]] = []
    for candidate in candidates:
        address = str(candidate.backend.address)
        h = base.copy()
        h.update(address.encode())
        # The top 53 bits, centred in their interval: a float strictly inside (0, 1).
        u = ((int.from_bytes(h.digest(), "big") >> 11) + 0.5) / 2.0**53
        scored.append((-candidate.weight / math.log(u), address, candidate))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [s[2] for s in scored]


class SmoothWeightedRoundRobin:
    """Weighted round robin that interleaves instead of bursting (nginx's "smooth" variant).

    Each pick adds every backend's weight to its running score, chooses the
    highest score and subtracts the total weight from it. With weights 5, 1, 1
    the sequence is a a b a c a a, not a a a a a b c. The failover candidates
    follow the chosen backend in config order, wrapping around. A sticky key
    overrides the rotation (rendezvous order) and does not advance it.
    """

    __slots__ = ("_scores",)

    def __init__(self) -> None:
        self._scores: dict[str, float] = {}  # keyed by address, so a reload keeps the rhythm

    def order(self, candidates: Sequence[Candidate], key: bytes | None) -> list[Candidate]:
        if key is not None:
            return rendezvous_order(candidates, key)
        if len(candidates) < 2:  # (one candidate: its score would gain its weight and lose it again)
            return list(candidates)
        scores = self._scores
        total = 0.0
        best_index = 0
        best_score: float | None = None
        for i, candidate in enumerate(candidates):
            address = str(candidate.backend.address)
            score = scores.get(address, 0.0) + candidate.weight
            scores[address] = score
            total += candidate.weight
            if best_score is None or score > best_score:
                best_index, best_score = i, score
        chosen = candidates[best_index]
        scores[str(chosen.backend.address)] -= total
        if len(scores) > 2 * len(candidates):  # forget backends a reload removed
            live = {str(c.backend.address) for c in candidates}
            for address in [a for a in scores if a not in live]:
                del scores[address]
        return list(candidates[best_index:]) + list(candidates[:best_index])


class LeastConn:
    """Weighted least connections over live sessions; ties rotate."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, candidates: Sequence[Candidate], key: bytes | None) -> list[Candidate]:
        if key is not None:
            return rendezvous_order(candidates, key)
        return least_conn_order(candidates, next(self._turn))


class RandomTwo:
    """The power of two choices on weighted least connections.

    Two distinct candidates are drawn with probability proportional to their
    weight; the less loaded one comes first (the first drawn on a tie), the
    other second, and the rest follow in least-connections order.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def _draw(self, candidates: Sequence[Candidate], skip: int) -> int:
        """An index drawn with probability proportional to weight, never ``skip``."""
        total = sum(c.weight for i, c in enumerate(candidates) if i != skip)
        point = self._rng.random() * total
        last = -1
        for i, candidate in enumerate(candidates):
            if i == skip:
                continue
            last = i
            point -= candidate.weight
            if point < 0:
                return i
        return last  # float rounding left a sliver at the end

    def order(self, candidates: Sequence[Candidate], key: bytes | None) -> list[Candidate]:
        if key is not None:
            return rendezvous_order(candidates, key)
        if len(candidates) <= 1:
            return list(candidates)
        first = self._draw(candidates, -1)
        second = self._draw(candidates, first)
        if load(candidates[second]) < load(candidates[first]):
            first, second = second, first
        rest = [c for i, c in enumerate(candidates) if i != first and i != second]
        return [candidates[first], candidates[second], *least_conn_order(rest)]


class RendezvousHash:
    """Weighted rendezvous hashing of the sticky key, optionally with bounded loads.

    ``balance_factor`` is ``hash_balance_factor``: 0 for no bound, else a
    percentage above 100. Backends at their cap go to the end of the order
    (still in rendezvous order), so they remain last-resort failover
    candidates. Without a key (the request lacks it) the order is least
    connections, ties rotating.
    """

    __slots__ = ("balance_factor", "_turn")

    def __init__(self, balance_factor: int = 0) -> None:
        self.balance_factor = balance_factor
        self._turn = itertools.count()

    def caps(self, candidates: Sequence[Candidate]) -> list[int]:
        """Each candidate's bound on live sessions, counting the session being placed."""
        factor = self.balance_factor
        total_active = sum(c.state.active for c in candidates)
        total_weight = sum(c.weight for c in candidates)
        # One division last, so that integral bounds stay exact (1100 x 1 / 100 is 11.0, not 11.000000000000002).
        return [
            math.ceil(factor * (total_active + 1) * c.weight / (100 * total_weight) - 1e-9) for c in candidates
        ]

    def order(self, candidates: Sequence[Candidate], key: bytes | None) -> list[Candidate]:
        if key is None:
            return least_conn_order(candidates, next(self._turn))
        ranked = rendezvous_order(candidates, key)
        if not self.balance_factor or len(ranked) <= 1:
            return ranked
        caps = self.caps(ranked)
        under = [c for c, cap in zip(ranked, caps) if c.state.active < cap]
        over = [c for c, cap in zip(ranked, caps) if c.state.active >= cap]
        return under + over


def make_selector(pool: PoolConfig) -> Selector:
    """The selector for a pool's ``balance`` setting (validated by the config loader)."""
    balance = pool.balance
    if balance == "round_robin":
        return SmoothWeightedRoundRobin()
    if balance == "least_conn":
        return LeastConn()
    if balance == "random_two":
        return RandomTwo()
    if balance == "hash":
        return RendezvousHash(pool.hash_balance_factor)
    raise ValueError(f"pool {pool.name}: unknown balancing algorithm {balance!r}")
