"""Rebalancing: which sessions of an over-loaded backend to close now. No I/O here.

After a pool grows, its old sessions stay where they were: new sessions go
to the new backend, but a WebSocket may live for hours. ``pools.NAME.rebalance``
closes the oldest sessions of over-loaded backends with 1012 (the client
reconnects, and the balancer places it), slowly enough that neither the
backends nor the clients notice a wave.

Theory of operation
-------------------
Only the *serving* backends of the pool count (health up, not draining, not
ejected; sessions on the others are a drain's business). Over them, with
weights ``w`` (all 1 unless configured):

- the fair share of backend ``b`` is ``mean_b = total × w_b / Σw``, where
  ``total`` is the sessions on serving backends;
- ``b`` is over-loaded when it holds more than its limit, ``max(max_skew ×
  mean_b, ceil(mean_b))``. The ``ceil`` keeps small pools still: 2 sessions on
  3 backends are as even as they can be at 1, 1, 0, and closing one would only
  move it round;
- its excess is what it holds above the limit (rounded up).

``choose`` spends a budget of closes on the excess: one at a time to the
backend with the largest remaining excess, taking that backend's oldest
session first (the oldest has had the longest run, and is the likeliest to
outlive every other reason to move). Sessions whose close is already ordered
are not passed in.

``Budget`` is the rate: ``rate`` is a fraction of the pool's sessions per
second (``1%/min`` in the YAML is 0.01/60: ``config.durations.parse_fraction_rate``).
Credit accrues with time and is capped at one tick's worth (or one close, whichever is more), so a quiet
period never turns into a burst; from the start, the closes never exceed
``rate × sessions × elapsed``, and over any window they stay within ``rate ×
sessions × window`` plus the cap.

What this is not: the trio task that gathers the sessions and closes the ones
chosen (``control.rebalance``), nor the choice of where a reconnecting client
goes (``balance.policy``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Budget", "Candidate", "choose", "excess"]

B = TypeVar("B", bound=Hashable)  # a backend (its address)

@dataclass(frozen=True, slots=True)
class Candidate(Generic[B]):
    """One open session: an opaque key, its backend, its age."""

    key: str
    backend: B
    age_s: float


def excess(counts: Mapping[B, int], weights: Mapping[B, int], max_skew: float) -> dict[B, int]:
    """Sessions above their limit, per over-loaded backend (see the module's theory).

    ``counts`` and ``weights`` cover the serving backends only.
    """
    total = sum(counts.get(b, 0) for b in weights)
    total_weight = sum(weights.values())
    if not total or total_weight <= 0:
        return {}
    result = {}
    for backend, weight in weights.items():
        mean = total * weight / total_weight
        limit = max(max_skew * mean, math.ceil(mean - 1e-9))
        over = counts.get(backend, 0) - limit
        if over > 1e-9:
            result[backend] = math.ceil(over - 1e-9)
    return result


def choose(
    sessions: Sequence[Candidate[B]], weights: Mapping[B, int], max_skew: float, budget: int
) -> list[Candidate[B]]:
    """The sessions to close now: at most ``budget``, oldest first from the most over-loaded backend.

    ``sessions`` may include sessions on backends that are not in ``weights``
    (not serving): they are neither counted nor chosen.
    """
    if budget <= 0:
        return []
    by_backend: dict[B, list[Candidate[B]]] = {}
    for session in sessions:
        if session.backend in weights:
            by_backend.setdefault(session.backend, []).append(session)
    counts = {backend: len(listed) for backend, listed in by_backend.items()}
    over = excess(counts, weights, max_skew)
    if not over:
        return []
    queues = {backend: sorted(by_backend[backend], key=lambda s: -s.age_s) for backend in over}
    # A max-heap of (remaining excess, current count) per backend; ties by insertion order.
    heap = [(-extra, -counts[backend], index, backend) for index, (backend, extra) in enumerate(over.items())]
    heapq.heapify(heap)
    taken: dict[B, int] = {}
    chosen: list[Candidate[B]] = []
    while heap and len(chosen) < budget:
        neg_extra, neg_count, index, backend = heapq.heappop(heap)
        position = taken.get(backend, 0)
        chosen.append(queues[backend][position])
        taken[backend] = position + 1
        if neg_extra + 1 < 0:
            heapq.heappush(heap, (neg_extra + 1, neg_count + 1, index, backend))
    return chosen


@dataclass(slots=True)
class Budget:
    """Closes allowed so far: ``rate_per_s`` of the pool's sessions per second, without bursts."""

    rate_per_s: float
    max_credit_s: float = 1.0  # credit is capped at this many seconds' worth (the caller's tick), or one close
    credit: float = 0.0

    def refill(self, sessions: int, elapsed_s: float) -> int:
        """Add ``elapsed_s`` worth of credit for a pool of ``sessions``; the whole closes now allowed.

        Credit only ever grows by ``rate × sessions × elapsed``, so what is spent
        never exceeds that over any run of calls.
        """
        allowance = self.rate_per_s * sessions * max(0.0, elapsed_s)
        cap = max(1.0, self.rate_per_s * sessions * self.max_credit_s)
        self.credit = min(self.credit + allowance, cap)
        return int(self.credit + 1e-9)

    def spend(self, closes: int) -> None:
        self.credit = max(0.0, self.credit - closes)
