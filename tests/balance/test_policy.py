"""Selectors: smooth weighted round robin (exact shares, no bursts, failover order), least connections,
power of two choices, weighted rendezvous hashing with bounded loads. No I/O here."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from wsproxy.balance.policy import (
    Candidate,
    LeastConn,
    RandomTwo,
    RendezvousHash,
    Selector,
    SmoothWeightedRoundRobin,
    least_conn_order,
    make_selector,
    rendezvous_order,
)
from wsproxy.config.schema import Address, BackendConfig, PoolConfig, PoolName
from wsproxy.balance.registry import BackendState


def backends(*weights: int) -> tuple[BackendConfig, ...]:
    return tuple(BackendConfig(address=Address(f"10.0.0.{i + 1}", 9000), weight=w) for i, w in enumerate(weights))


def name(backend: BackendConfig) -> str:
    return "abcdefgh"[int(backend.address.host.rsplit(".", 1)[1]) - 1]


def candidates(pool: Sequence[BackendConfig], states: dict[Address, BackendState] | None = None) -> list[Candidate]:
    """Candidates at full config weight; ``states`` shares live counts between calls."""
    states = {} if states is None else states
    return [Candidate(b, states.setdefault(b.address, BackendState(b.address)), float(b.weight)) for b in pool]


def order(selector: Selector, pool: Sequence[BackendConfig], key: bytes | None = None) -> list[BackendConfig]:
    return [c.backend for c in selector.order(candidates(pool), key)]


def picks(selector: Selector, pool: tuple[BackendConfig, ...], n: int) -> str:
    return "".join(name(order(selector, pool)[0]) for _ in range(n))


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
    orders = ["".join(name(b) for b in order(selector, pool)) for _ in range(4)]
    assert orders == ["abcd", "bcda", "cdab", "dabc"]


def test_order_with_weights() -> None:
    pool = backends(5, 1, 1)
    selector = SmoothWeightedRoundRobin()
    orders = ["".join(name(b) for b in order(selector, pool)) for _ in range(7)]
    assert orders == ["abc", "abc", "bca", "abc", "cab", "abc", "abc"]


def test_order_of_nothing() -> None:
    assert SmoothWeightedRoundRobin().order((), None) == []


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
        assert [name(b) for b in order(selector, smaller)] in (["a", "c"], ["c", "a"])
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




# -- shared by the load-aware algorithms ------------------------------------------------------------------------------


def simulate(
    selector: Selector,
    weights: Sequence[int],
    *,
    picks_n: int = 30_000,
    live: int = 300,
    key: object = None,
    seed: int = 7,
) -> tuple[list[float], list[Candidate]]:
    """Pick ``picks_n`` times with session churn: each pick opens a session on the chosen backend, and once
    ``live`` sessions are open a random one of them ends. Returns each backend's share of the picks divided by
    its weight share (1.0 = exactly its weight) and the candidates (their live counts at the end).

    ``key`` is None (no key) or "random" (a fresh random key per session).
    """
    pool = candidates(backends(*weights))
    rng = random.Random(seed)
    sessions: list[int] = []
    counts: Counter[int] = Counter()
    for _ in range(picks_n):
        chosen = selector.order(pool, rng.randbytes(8) if key == "random" else None)[0]
        i = pool.index(chosen)
        chosen.state.active += 1
        sessions.append(i)
        counts[i] += 1
        if len(sessions) > live:
            j = rng.randrange(len(sessions))
            sessions[j], sessions[-1] = sessions[-1], sessions[j]
            pool[sessions.pop()].state.active -= 1
    total_weight = sum(weights)
    return [counts[i] / picks_n / (w / total_weight) for i, w in enumerate(weights)], pool


@pytest.mark.parametrize(
    ("make", "key", "tolerance"),
    [
        (SmoothWeightedRoundRobin, None, 0.001),
        (LeastConn, None, 0.05),
        (lambda: RandomTwo(random.Random(1)), None, 0.06),
        (RendezvousHash, "random", 0.06),
        (lambda: RendezvousHash(125), "random", 0.06),
    ],
    ids=["round_robin", "least_conn", "random_two", "hash", "hash_bounded"],
)
@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3, 4), (5, 1, 1)])
def test_distribution_follows_weights(
    make: Callable[[], Selector], key: str | None, tolerance: float, weights: tuple[int, ...]
) -> None:
    ratios, _ = simulate(make(), weights, key=key)
    assert all(abs(r - 1) <= tolerance for r in ratios), ratios


@pytest.mark.parametrize("make", [LeastConn, lambda: RandomTwo(random.Random(2))], ids=["least_conn", "random_two"])
def test_live_sessions_follow_weights(make: Callable[[], Selector]) -> None:
    """The load-aware algorithms keep live sessions close to weight x mean, not just the picks."""
    _, pool = simulate(make(), (1, 2, 3, 4), live=400)
    for candidate in pool:
        assert abs(candidate.state.active - 40 * candidate.weight) <= 0.2 * 40 * candidate.weight, candidate


# -- least_conn --------------------------------------------------------------------------------------------------------


def test_least_conn_prefers_the_less_loaded() -> None:
    pool = candidates(backends(1, 1, 1))
    for candidate, active in zip(pool, (5, 2, 9)):
        candidate.state.active = active
    assert [name(c.backend) for c in LeastConn().order(pool, None)] == ["b", "a", "c"]


def test_least_conn_weighs_the_load() -> None:
    """(active + 1) / weight: 4 sessions on weight 4 (1.25) beat 1 session on weight 1 (2.0)."""
    pool = candidates(backends(1, 4))
    pool[0].state.active, pool[1].state.active = 1, 4
    assert name(LeastConn().order(pool, None)[0].backend) == "b"
    pool[1].state.active = 8  # 2.25
    assert name(LeastConn().order(pool, None)[0].backend) == "a"


def test_least_conn_idle_heavy_backend_first() -> None:
    pool = candidates(backends(1, 3, 2))
    assert [name(c.backend) for c in LeastConn().order(pool, None)] == ["b", "c", "a"]


def test_least_conn_ties_rotate() -> None:
    pool = candidates(backends(1, 1, 1))
    selector = LeastConn()
    firsts = "".join(name(selector.order(pool, None)[0].backend) for _ in range(6))
    assert firsts == "abcabc"
    assert least_conn_order(pool, 1) == [pool[1], pool[2], pool[0]]


def test_least_conn_order_lists_everyone_once() -> None:
    pool = candidates(backends(3, 1, 2, 1))
    for candidate, active in zip(pool, (7, 0, 3, 2)):
        candidate.state.active = active
    ordered = LeastConn().order(pool, None)
    assert sorted(map(id, ordered)) == sorted(map(id, pool))
    loads = [(c.state.active + 1) / c.weight for c in ordered]
    assert loads == sorted(loads)


# -- random_two --------------------------------------------------------------------------------------------------------


def test_random_two_is_reproducible_with_a_seed() -> None:
    pool = candidates(backends(1, 2, 3, 4))
    first = RandomTwo(random.Random(9))
    second = RandomTwo(random.Random(9))
    a = "".join(name(first.order(pool, None)[0].backend) for _ in range(200))
    b = "".join(name(second.order(pool, None)[0].backend) for _ in range(200))
    assert a == b
    assert set(a) == set("bcd")  # idle "a" (load 1.0) loses to any other idle backend (0.5 at most)


def test_random_two_takes_the_less_loaded_of_two() -> None:
    """With two backends both are always drawn, so the less loaded one always wins."""
    pool = candidates(backends(1, 1))
    pool[0].state.active = 3
    selector = RandomTwo(random.Random(3))
    assert all(name(selector.order(pool, None)[0].backend) == "b" for _ in range(100))


def test_random_two_never_picks_the_most_loaded_of_three() -> None:
    pool = candidates(backends(1, 1, 1))
    for candidate, active in zip(pool, (0, 5, 50)):
        candidate.state.active = active
    selector = RandomTwo(random.Random(4))
    firsts = Counter(name(selector.order(pool, None)[0].backend) for _ in range(3000))
    assert firsts["c"] == 0
    # "a" wins unless the draw is (b, c): 1 - 1/3
    assert abs(firsts["a"] / 3000 - 2 / 3) < 0.04, firsts


def test_random_two_draws_by_weight() -> None:
    """Equal loads: the first drawn wins, and it is drawn in proportion to weight."""
    pool = candidates(backends(1, 3))
    pool[1].state.active = 2  # (0 + 1) / 1 == (2 + 1) / 3
    selector = RandomTwo(random.Random(5))
    firsts = Counter(name(selector.order(pool, None)[0].backend) for _ in range(4000))
    assert abs(firsts["b"] / 4000 - 0.75) < 0.03, firsts


def test_random_two_order_lists_everyone_once() -> None:
    pool = candidates(backends(1, 1, 1, 1, 1))
    selector = RandomTwo(random.Random(6))
    for _ in range(50):
        assert sorted(map(id, selector.order(pool, None))) == sorted(map(id, pool))
    assert selector.order(pool[:1], None) == pool[:1]
    assert selector.order((), None) == []


# -- rendezvous hashing ------------------------------------------------------------------------------------------------


def top(pool: Sequence[Candidate], key: bytes) -> BackendConfig:
    return rendezvous_order(pool, key)[0].backend


KEYS = [b"user-%d" % i for i in range(20_000)]


@pytest.mark.parametrize("n", [4, 5, 10])
def test_rendezvous_removing_one_of_n_moves_only_its_keys(n: int) -> None:
    pool = candidates(backends(*[1] * n))
    gone = pool[n // 2]
    smaller = [c for c in pool if c is not gone]
    moved = 0
    for key in KEYS:
        before, after = top(pool, key), top(smaller, key)
        if before != after:
            moved += 1
            assert before == gone.backend
        else:
            assert before != gone.backend
    assert abs(moved / len(KEYS) - 1 / n) <= 0.3 / n, moved / len(KEYS)


@pytest.mark.parametrize("n", [4, 5, 10])
def test_rendezvous_adding_one_to_make_n_moves_keys_only_to_it(n: int) -> None:
    pool = candidates(backends(*[1] * n))
    new = pool[-1]
    moved = 0
    for key in KEYS:
        before, after = top(pool[:-1], key), top(pool, key)
        if before != after:
            moved += 1
            assert after == new.backend
    assert abs(moved / len(KEYS) - 1 / n) <= 0.3 / n, moved / len(KEYS)


def test_rendezvous_respects_weights() -> None:
    weights = (1, 2, 3, 4)
    pool = candidates(backends(*weights))
    counts = Counter(name(top(pool, key)) for key in KEYS[:10_000])
    for backend in backends(*weights):
        expected = 10_000 * backend.weight / sum(weights)
        assert abs(counts[name(backend)] - expected) <= 0.06 * expected, counts


def test_rendezvous_reweighting_one_backend_moves_keys_only_to_or_from_it() -> None:
    """Slow start changes one weight at a time: the other backends keep their keys."""
    light = candidates(backends(1, 1, 1, 1))
    heavy = [*light[:3], Candidate(light[3].backend, light[3].state, 0.1)]
    for key in KEYS[:5000]:
        before, after = top(light, key), top(heavy, key)
        if before != after:
            assert before == light[3].backend


def test_rendezvous_is_stable_and_independent_of_input_order() -> None:
    pool = candidates(backends(1, 2, 3))
    twin = candidates(backends(1, 2, 3))  # other objects, other states: only addresses and weights matter
    for key in KEYS[:500]:
        ranked = [c.backend for c in rendezvous_order(pool, key)]
        assert [c.backend for c in rendezvous_order(twin[::-1], key)] == ranked
        assert [c.backend for c in rendezvous_order(pool, key)] == ranked


def test_rendezvous_known_answer() -> None:
    """The hash is BLAKE2b, not Python's salted hash(): the answer is the same in every process."""
    pool = candidates(backends(1, 1, 1, 1))
    assert "".join(name(top(pool, b"user-%d" % i)) for i in range(12)) == KNOWN_ANSWER


KNOWN_ANSWER = "cdbadadbccdd"


@pytest.mark.parametrize("make", [SmoothWeightedRoundRobin, LeastConn, RandomTwo, lambda: RendezvousHash(125)])
def test_a_key_means_rendezvous_order_for_every_selector(make: Callable[[], Selector]) -> None:
    selector = make()
    pool = candidates(backends(2, 1, 1))
    for key in KEYS[:200]:
        assert selector.order(pool, key) == rendezvous_order(pool, key)


def test_hash_without_a_key_is_least_conn() -> None:
    pool = candidates(backends(1, 1, 1))
    for candidate, active in zip(pool, (4, 1, 2)):
        candidate.state.active = active
    assert [name(c.backend) for c in RendezvousHash(125).order(pool, None)] == ["b", "c", "a"]


def test_bounded_load_moves_a_key_to_its_next_candidate() -> None:
    pool = candidates(backends(1, 1, 1, 1))
    key = KEYS[0]
    ranked = rendezvous_order(pool, key)
    ranked[0].state.active = 10  # 10 of 10: the cap is ceil(1.25 x 11 / 4) = 4
    bounded = RendezvousHash(125).order(pool, key)
    assert bounded == [*ranked[1:], ranked[0]]
    assert RendezvousHash(0).order(pool, key) == ranked  # no bound


@pytest.mark.parametrize(
    ("factor", "active", "cap"), [(125, 0, 1), (125, 7, 3), (150, 7, 3), (200, 10, 6), (110, 99, 28)]
)
def test_bounded_load_caps(factor: int, active: int, cap: int) -> None:
    """ceil(factor/100 x (total + 1) x weight / total_weight), exact where it is an integer."""
    pool = candidates(backends(1, 1, 1, 1))
    pool[0].state.active = active
    assert RendezvousHash(factor).caps(pool) == [cap] * 4


def test_bounded_load_caps_are_weighted() -> None:
    pool = candidates(backends(1, 3))
    pool[0].state.active = 7  # total + 1 = 8: 1.25 x 8 x 1/4 = 2.5, 1.25 x 8 x 3/4 = 7.5
    assert RendezvousHash(125).caps(pool) == [3, 8]


def skewed_keys(rng: random.Random) -> bytes:
    """80% of sessions from 5 keys, the rest from many."""
    return b"hot-%d" % rng.randrange(5) if rng.random() < 0.8 else b"cold-%d" % rng.randrange(100_000)


@pytest.mark.parametrize("weights", [(1,) * 8, (1, 2, 3, 4, 1, 2, 3, 4)])
def test_bounded_load_holds_under_skew_while_sessions_grow(weights: tuple[int, ...]) -> None:
    """No backend above ceil(1.25 x sessions x weight share) after any pick; unbounded hashing breaks it."""
    rng = random.Random(11)
    results = {}
    for factor in (125, 0):
        pool = candidates(backends(*weights))
        selector = RendezvousHash(factor)
        total_weight = sum(weights)
        worst = 0.0
        for sessions in range(1, 2001):
            selector.order(pool, skewed_keys(rng))[0].state.active += 1
            for c in pool:
                worst = max(worst, c.state.active / math.ceil(1.25 * sessions * c.weight / total_weight - 1e-9))
        results[factor] = worst
    assert results[125] <= 1.0
    assert results[0] > 2.0  # the test can fail: five hot keys pile onto at most five backends


def test_bounded_load_holds_under_skew_with_churn() -> None:
    """With sessions ending at random, the chosen backend never goes above its cap."""
    rng = random.Random(12)
    pool = candidates(backends(*[1] * 10))
    selector = RendezvousHash(125)
    live: list[Candidate] = []
    peak = 0
    for _ in range(30_000):
        chosen = selector.order(pool, skewed_keys(rng))[0]
        chosen.state.active += 1
        live.append(chosen)
        assert chosen.state.active <= math.ceil(1.25 * len(live) / 10)
        if len(live) > 500:
            peak = max(peak, chosen.state.active)
            live.pop(rng.randrange(len(live))).state.active -= 1
    assert peak == math.ceil(1.25 * 501 / 10)  # the bound is reached (80% of the keys want 5 backends), not passed


# -- make_selector -----------------------------------------------------------------------------------------------------


def pool_config(balance: str, factor: int = 0) -> PoolConfig:
    return PoolConfig(name=PoolName("chat"), balance=balance, backends=backends(1), hash_balance_factor=factor)


def test_make_selector() -> None:
    assert isinstance(make_selector(pool_config("round_robin")), SmoothWeightedRoundRobin)
    assert isinstance(make_selector(pool_config("least_conn")), LeastConn)
    assert isinstance(make_selector(pool_config("random_two")), RandomTwo)
    selector = make_selector(pool_config("hash", 150))
    assert isinstance(selector, RendezvousHash) and selector.balance_factor == 150
    with pytest.raises(ValueError, match="maglev"):
        make_selector(pool_config("maglev"))


def test_candidate_weight_must_be_positive() -> None:
    backend = backends(1)[0]
    with pytest.raises(ValueError, match="10.0.0.1:9000"):
        Candidate(backend, BackendState(backend.address), 0.0)
