"""Pure tests of ``balance.rebalance``: the budget, the excess, the choice, and a whole pool simulated.

The simulation is the property the issue pins (a pool grows from 2 to 3
backends: max/mean reaches 1.25 while fewer than 2 % of the sessions are closed
per minute), checked without sockets for many pool sizes, rates and both kinds
of balancer a reconnecting client meets (``least_conn`` sends it to the
emptiest backend, ``round_robin`` sends a third of them back where they were).
The end-to-end test with real processes is ``tests/e2e/test_rebalance.py``.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.balance.rebalance import Budget, Candidate, choose, excess


def test_excess_over_the_fair_share() -> None:
    assert excess({"a": 1500, "b": 1500, "c": 0}, {"a": 1, "b": 1, "c": 1}, 1.25) == {"a": 250, "b": 250}
    assert excess({"a": 1250, "b": 1250, "c": 500}, {"a": 1, "b": 1, "c": 1}, 1.25) == {}
    assert excess({"a": 1251, "b": 1249, "c": 500}, {"a": 1, "b": 1, "c": 1}, 1.25) == {"a": 1}
    assert excess({}, {"a": 1}, 1.25) == {}


def test_excess_follows_weights() -> None:
    # b has weight 2: its fair share is 2/3 of 900 = 600, so 700 is fine for it (limit 750)
    assert excess({"a": 200, "b": 700}, {"a": 1, "b": 2}, 1.25) == {}
    assert excess({"a": 500, "b": 400}, {"a": 1, "b": 2}, 1.25) == {"a": 125}


def test_small_pools_stay_still() -> None:
    """2 sessions on 3 backends at 1, 1, 0 are as even as they can be: nothing moves them."""
    serving = {"a": 1, "b": 1, "c": 1}
    assert excess({"a": 1, "b": 1}, serving, 1.25) == {}
    assert excess({"a": 2}, serving, 1.25) == {"a": 1}
    assert excess({"a": 2, "b": 1, "c": 1}, serving, 1.25) == {}  # ceil(4/3) = 2


def sessions_of(counts: dict[str, int]) -> list[Candidate[str]]:
    ages = itertools.count(1000, -1)
    return [Candidate(f"{b}{i}", b, float(next(ages))) for b, n in counts.items() for i in range(n)]


def test_choose_oldest_of_the_most_loaded_first() -> None:
    candidates = sessions_of({"a": 14, "b": 10, "c": 0})  # mean 8, limit 10: a has 4 too many
    chosen = choose(candidates, {"a": 1, "b": 1, "c": 1}, 1.25, 3)
    assert [c.key for c in chosen] == ["a0", "a1", "a2"]  # a0 is the oldest
    chosen = choose(candidates, {"a": 1, "b": 1, "c": 1}, 1.25, 100)
    assert [c.key for c in chosen] == ["a0", "a1", "a2", "a3"]  # no more than the excess


def test_choose_shares_the_budget_by_remaining_excess() -> None:
    candidates = sessions_of({"a": 30, "b": 26, "c": 4})  # mean 20, limit 25: a 5, b 1
    chosen = choose(candidates, {"a": 1, "b": 1, "c": 1}, 1.25, 4)
    assert [c.backend for c in chosen] == ["a", "a", "a", "a"]  # a is down to 26, like b
    chosen = choose(candidates, {"a": 1, "b": 1, "c": 1}, 1.25, 6)
    assert sorted(c.backend for c in chosen) == ["a", "a", "a", "a", "a", "b"]


def test_choose_ignores_backends_that_do_not_serve() -> None:
    candidates = sessions_of({"a": 30, "b": 10, "d": 50})  # d is draining: its sessions are the drain's
    chosen = choose(candidates, {"a": 1, "b": 1}, 1.25, 100)
    assert {c.backend for c in chosen} == {"a"} and len(chosen) == 5  # mean 20, limit 25
    assert choose(candidates, {"a": 1, "b": 1}, 1.25, 0) == []


def test_budget_never_bursts() -> None:
    budget = Budget(rate_per_s=0.01)  # 1 % a second of 1,000 sessions: 10 a second, ticks of 1 s
    assert budget.refill(1000, 1.0) == 10
    assert budget.refill(1000, 3600.0) == 10  # an hour of nothing to do is not saved up
    budget.spend(10)
    assert budget.refill(1000, 0.5) == 5
    small = Budget(rate_per_s=0.01)  # 10 sessions: one close every 10 s
    assert [small.refill(10, 1.0) for _ in range(10)] == [0] * 9 + [1]


@settings(max_examples=60)
@given(
    rate=st.floats(min_value=0.0001, max_value=0.05),
    sessions=st.integers(min_value=0, max_value=5000),
    steps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=60),
)
def test_budget_closes_at_most_rate_times_window_plus_one(rate: float, sessions: int, steps: list[float]) -> None:
    budget = Budget(rate_per_s=rate)
    spent = 0
    elapsed = 0.0
    for step in steps:
        elapsed += step
        allowed = budget.refill(sessions, step)
        budget.spend(allowed)
        spent += allowed
    assert spent <= rate * sessions * elapsed + 1e-6


def simulate(
    total: int, rate_per_s: float, balancer: str, seed: int, *, tick_s: float = 5.0, horizon_s: float = 3600.0
) -> tuple[float, float, float]:
    """Grow a pool from 2 to 3 backends with ``total`` sessions, rebalance until even.

    Returns (seconds to max/mean ≤ 1.25, the most closes in any 60 s, final max/mean).
    A closed session reconnects at once and the balancer places it.
    """
    rng = random.Random(seed)
    ages = itertools.count()
    live: dict[str, list[Candidate[str]]] = {"a": [], "b": [], "c": []}
    for i in range(total):
        backend = "ab"[i % 2]
        live[backend].append(Candidate(f"s{next(ages)}", backend, 0.0))
    weights = {"a": 1, "b": 1, "c": 1}
    budget = Budget(rate_per_s, tick_s)
    closes_at: list[float] = []
    rr = itertools.cycle("abc")
    now = 0.0
    reached: float | None = None
    while now < horizon_s:
        now += tick_s
        counts = {b: len(v) for b, v in live.items()}
        if reached is None and max(counts.values()) <= 1.25 * total / 3:
            reached = now
            break
        allowed = budget.refill(total, tick_s)
        if not allowed:
            continue
        # each backend's list is in arrival order: the first is the oldest
        candidates = [Candidate(c.key, b, float(len(v) - i)) for b, v in live.items() for i, c in enumerate(v)]
        chosen = choose(candidates, weights, 1.25, allowed)
        budget.spend(len(chosen))
        for victim in chosen:
            queue = live[victim.backend]
            assert queue[0].key == victim.key  # the oldest of its backend
            del queue[0]
            closes_at.append(now)
            if balancer == "least_conn":
                target = min(live, key=lambda b: (len(live[b]), rng.random()))
            else:
                target = next(rr)
            live[target].append(Candidate(f"s{next(ages)}", target, 0.0))
    worst = 0
    first = 0
    for last, t in enumerate(closes_at):  # in time order: a sliding 60 s window
        while closes_at[first] <= t - 60:
            first += 1
        worst = max(worst, last - first + 1)
    counts = {b: len(v) for b, v in live.items()}
    return (reached if reached is not None else math.inf), worst, max(counts.values()) * 3 / total


@pytest.mark.parametrize("balancer", ["least_conn", "round_robin"])
@pytest.mark.parametrize("total", [300, 3000])
def test_growing_pool_evens_out_gently(balancer: str, total: int) -> None:
    """The issue's figure: max/mean ≤ 1.25 reached, under 2 % of the sessions closed in any minute."""
    reached_s, worst_minute, final = simulate(total, 0.01 / 60, balancer, seed=total, horizon_s=3 * 3600)
    assert final <= 1.25
    assert worst_minute < 0.02 * total
    assert reached_s < (60 * 60 if balancer == "least_conn" else 2 * 60 * 60)


@settings(max_examples=25, deadline=None)
@given(total=st.integers(min_value=30, max_value=2000), percent_per_min=st.floats(min_value=0.2, max_value=1.9), seed=st.integers(0, 99))
def test_growing_pool_property(total: int, percent_per_min: float, seed: int) -> None:
    reached_s, worst_minute, final = simulate(total, percent_per_min / 100 / 60, "least_conn", seed, horizon_s=6 * 3600)
    assert final <= 1.25 + 3 / total  # one session of rounding on a small pool
    assert worst_minute <= percent_per_min / 100 * total + 1  # the budget's bound
