"""Smooth weighted round robin: exact shares, no bursts, failover order. No I/O here."""

from __future__ import annotations

from collections import Counter

import pytest

from wsproxy.balance.policy import SmoothWeightedRoundRobin, make_selector
from wsproxy.config.schema import Address, BackendConfig


def backends(*weights: int) -> tuple[BackendConfig, ...]:
    return tuple(BackendConfig(address=Address(f"10.0.0.{i + 1}", 9000), weight=w) for i, w in enumerate(weights))


def name(backend: BackendConfig) -> str:
    return "abcdefgh"[int(backend.address.host.rsplit(".", 1)[1]) - 1]


def picks(selector: SmoothWeightedRoundRobin, pool: tuple[BackendConfig, ...], n: int) -> str:
    return "".join(name(selector.order(pool)[0]) for _ in range(n))


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        ((1,), "a"),
        ((1, 1), "ab"),
        ((1, 2), "bab"),
        ((2, 1), "aba"),
        ((1, 1, 1), "abc"),
        ((5, 1, 1), "aabacaa"),  # interleaved, not aaaaabc
        ((3, 2), "ababa"),
    ],
)
def test_sequence_repeats_every_cycle(weights: tuple[int, ...], cycle: str) -> None:
    selector = SmoothWeightedRoundRobin()
    assert picks(selector, backends(*weights), 5 * len(cycle)) == cycle * 5


@pytest.mark.parametrize("weights", [(1, 1), (1, 2), (5, 1, 1), (7, 3, 1, 1), (1000, 1), (10, 20, 30)])
def test_distribution_is_exact_over_every_full_cycle(weights: tuple[int, ...]) -> None:
    pool = backends(*weights)
    selector = SmoothWeightedRoundRobin()
    total = sum(weights)
    for _ in range(3):
        counts = Counter(picks(selector, pool, total))
        assert [counts[name(b)] for b in pool] == list(weights)


def test_order_lists_every_backend_chosen_first_then_config_order_wrapping() -> None:
    pool = backends(1, 1, 1, 1)
    selector = SmoothWeightedRoundRobin()
    orders = ["".join(name(b) for b in selector.order(pool)) for _ in range(4)]
    assert orders == ["abcd", "bcda", "cdab", "dabc"]


def test_order_with_weights() -> None:
    pool = backends(5, 1, 1)
    selector = SmoothWeightedRoundRobin()
    orders = ["".join(name(b) for b in selector.order(pool)) for _ in range(7)]
    assert orders == ["abc", "abc", "bca", "abc", "cab", "abc", "abc"]


def test_order_of_nothing() -> None:
    assert SmoothWeightedRoundRobin().order(()) == []


def test_equal_config_objects_keep_the_rhythm() -> None:
    """A reload builds new BackendConfig objects for the same addresses: the sequence goes on."""
    selector = SmoothWeightedRoundRobin()
    assert picks(selector, backends(5, 1, 1), 3) == "aab"
    assert picks(selector, backends(5, 1, 1), 4) == "acaa"


def assert_shares_converge(selector: SmoothWeightedRoundRobin, pool: tuple[BackendConfig, ...], cycles: int = 50) -> None:
    """Over many cycles every backend gets its weight's share, give or take one pick."""
    total = sum(b.weight for b in pool)
    counts = Counter(picks(selector, pool, cycles * total))
    assert set(counts) <= {name(b) for b in pool}
    for backend in pool:
        assert abs(counts[name(backend)] - cycles * backend.weight) <= 1, (counts, backend)


@pytest.mark.parametrize("done", range(7))
def test_backend_removed(done: int) -> None:
    """After a backend leaves, it is never chosen and the others share by weight."""
    selector = SmoothWeightedRoundRobin()
    pool = backends(5, 1, 1)
    picks(selector, pool, done)
    smaller = (pool[0], pool[2])
    for _ in range(10):
        assert [name(b) for b in selector.order(smaller)] in (["a", "c"], ["c", "a"])
    assert_shares_converge(selector, smaller)


@pytest.mark.parametrize("done", range(7))
def test_backend_added(done: int) -> None:
    selector = SmoothWeightedRoundRobin()
    pool = backends(5, 1, 1)
    picks(selector, pool, done)
    bigger = (*pool, BackendConfig(address=Address("10.0.0.4", 9000), weight=2))
    first_cycle = picks(selector, bigger, 9)
    assert "d" in first_cycle  # the newcomer is not starved
    assert_shares_converge(selector, bigger)


def test_backend_removed_and_added_back() -> None:
    selector = SmoothWeightedRoundRobin()
    pool = backends(1, 1, 1)
    picks(selector, pool, 4)
    picks(selector, pool[:2], 5)
    assert_shares_converge(selector, pool)


def test_forgets_removed_backends() -> None:
    """Scores of backends gone from the pool do not pile up."""
    selector = SmoothWeightedRoundRobin()
    for generation in range(50):
        pool = tuple(BackendConfig(address=Address(f"10.1.{generation}.{i}", 9000)) for i in range(3))
        picks(selector, pool, 3)
    assert len(selector._scores) <= 2 * 3 + 3


def test_make_selector() -> None:
    assert isinstance(make_selector("round_robin"), SmoothWeightedRoundRobin)
    with pytest.raises(ValueError, match="least_conn"):
        make_selector("least_conn")
