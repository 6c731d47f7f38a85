"""Backend selection: which backend takes the next session. No I/O here.

A ``Selector`` turns the backends of one pool into the order in which the
proxy should try them: the first is the choice, the rest are the failover
candidates (each backend is tried at most once per session). Selectors keep
only their own bookkeeping (e.g. round-robin weights); backend state such as
live session counts belongs to ``control.registry`` and is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..config.schema import BackendConfig


class Selector(Protocol):
    """Chooses among the backends of one pool."""

    def order(self, backends: Sequence[BackendConfig]) -> list[BackendConfig]:
        """All of ``backends``, the chosen one first, then the failover candidates."""
        ...


class SmoothWeightedRoundRobin:
    """Weighted round robin that interleaves instead of bursting (nginx's "smooth" variant).

    Each pick adds every backend's weight to its running score, chooses the
    highest score and subtracts the total weight from it. With weights 5, 1, 1
    the sequence is a a b a c a a, not a a a a a b c. The failover candidates
    follow the chosen backend in config order, wrapping around.
    """

    __slots__ = ("_scores",)

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}  # keyed by address, so a reload keeps the rhythm

    def order(self, backends: Sequence[BackendConfig]) -> list[BackendConfig]:
        if not backends:
            return []
        scores = self._scores
        total = 0
        best_index = 0
        best_score = None
        for i, backend in enumerate(backends):
            key = str(backend.address)
            score = scores.get(key, 0) + backend.weight
            scores[key] = score
            total += backend.weight
            if best_score is None or score > best_score:
                best_index, best_score = i, score
        chosen = backends[best_index]
        scores[str(chosen.address)] -= total
        if len(scores) > 2 * len(backends):  # forget backends a reload removed
            live = {str(b.address) for b in backends}
            for key in [k for k in scores if k not in live]:
                del scores[key]
        return list(backends[best_index:]) + list(backends[:best_index])


def make_selector(balance: str) -> Selector:
    """The selector for a pool's ``balance`` setting (validated by the config loader)."""
    if balance == "round_robin":
        return SmoothWeightedRoundRobin()
    raise ValueError(f"unknown balancing algorithm {balance!r}")
