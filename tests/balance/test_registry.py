"""Pure tests of ``BackendState``, ``HealthState`` and ``Registry``: no event loop, times are plain floats.

Active health (``record_check``): UNKNOWN → UP on the first pass, DOWN after
``fall`` failures, DOWN → UP after ``rise`` passes, and the messages that say
so; a model check over random check sequences. Passive health
(``record_failure``): ejection after ``failures`` within ``window_s``, doubling
up to 10x, the ``max_ejected_percent`` cap, ``record_success``. Slow start and
``available()``, including slow start after an ejection ends and health kept per
(pool, address) so that one pool's checks never take an address out of another
pool. What is not here: the trio loops that call these
(``test_health``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.config.schema import Address, BackendConfig, PassiveHealthConfig, PoolName
from wsproxy.balance.registry import (
    MAX_EJECTION_FACTOR,
    SLOW_START_FLOOR,
    BackendState,
    Health,
    HealthState,
    Registry,
    unavailable_because,
)

A = Address("10.0.0.1", 9000)
B = Address("10.0.0.2", 9000)
P = PoolName("chat")
Q = PoolName("other")


def backends(n: int) -> tuple[BackendConfig, ...]:
    return tuple(BackendConfig(address=Address(f"10.0.0.{i + 1}", 9000)) for i in range(n))


def checks(
    state: HealthState, results: str, *, rise: int = 2, fall: int = 3, reason: str = "connect refused"
) -> list[str]:
    """Feed "+" (pass) and "-" (fail) results one second apart; return the change messages."""
    messages = []
    for i, result in enumerate(results):
        message = state.record_check(result == "+", reason, float(i), rise=rise, fall=fall)
        if message is not None:
            messages.append(message)
    return messages


# --- active health: record_check ------------------------------------------------------


def test_new_backend_is_unknown_and_takes_no_traffic() -> None:
    state = Registry().health(P, A)
    assert state.health is Health.UNKNOWN
    assert not Registry().available(P, BackendConfig(address=A), 0.0)


def test_unknown_to_up_on_the_first_pass_whatever_rise_says() -> None:
    state = HealthState(P, A)
    assert checks(state, "+", rise=5) == ["unknown -> up: 1 consecutive passes"]
    assert state.health is Health.UP and state.up_since == 0.0
    assert (state.last_check, state.last_check_at) == ("ok", 0.0)


def test_unknown_to_down_after_fall() -> None:
    state = HealthState(P, A)
    assert checks(state, "--") == []
    assert state.health is Health.UNKNOWN
    assert checks(state, "-") == ["unknown -> down: 3 consecutive failures: connect refused"]
    assert state.failures == 3 and state.health is Health.DOWN


def test_up_to_down_after_fall_consecutive_failures() -> None:
    state = HealthState(P, A)
    assert checks(state, "+--+--") == ["unknown -> up: 1 consecutive passes"]  # a pass resets the count
    assert state.health is Health.UP
    message = state.record_check(False, "timed out after 2s", 10.0, rise=2, fall=3)
    assert message == "up -> down: 3 consecutive failures: timed out after 2s"
    assert state.health is Health.DOWN and state.up_since is None
    assert state.last_check == "timed out after 2s" and state.last_check_at == 10.0


def test_down_to_up_after_rise_consecutive_passes() -> None:
    state = HealthState(P, A)
    checks(state, "+---")
    assert state.health is Health.DOWN
    assert checks(state, "++-++", rise=3) == []  # a failure resets the passes
    assert state.record_check(True, "", 20.0, rise=3, fall=3) == "down -> up: 3 consecutive passes"
    assert state.health is Health.UP and state.up_since == 20.0


def test_no_message_without_a_change() -> None:
    state = HealthState(P, A)
    checks(state, "+")
    assert checks(state, "++++--+") == []
    checks(state, "---")
    assert checks(state, "-----") == []


def test_mark_up_for_start_healthy_then_down_after_fall() -> None:
    state = HealthState(P, A)
    state.mark_up(5.0)
    assert state.health is Health.UP and state.up_since == 5.0
    state.mark_up(6.0)  # already up: slow start is not restarted
    assert state.up_since == 5.0
    assert checks(state, "---", fall=3)[-1] == "up -> down: 3 consecutive failures: connect refused"


def model_health(results: list[bool], rise: int, fall: int) -> Health:
    """The documented rules, written out straight."""
    health, passes, failures = Health.UNKNOWN, 0, 0
    for ok in results:
        passes, failures = (passes + 1, 0) if ok else (0, failures + 1)
        if ok and (health is Health.UNKNOWN or (health is Health.DOWN and passes >= rise)):
            health = Health.UP
        elif not ok and failures >= fall:
            health = Health.DOWN
    return health


@given(st.lists(st.booleans(), max_size=40), st.integers(1, 5), st.integers(1, 5))
def test_record_check_matches_the_rules(results: list[bool], rise: int, fall: int) -> None:
    state = HealthState(P, A)
    changes = 0
    for i, ok in enumerate(results):
        before = state.health
        message = state.record_check(ok, "r", float(i), rise=rise, fall=fall)
        assert (message is not None) == (state.health is not before)
        changes += message is not None
        assert state.health is model_health(results[: i + 1], rise, fall)
    assert (state.up_since is not None) == (state.health is Health.UP)


# --- passive health: record_failure / record_success ----------------------------------

PASSIVE = PassiveHealthConfig(failures=3, window_s=10.0, ejection_s=30.0, max_ejected_percent=50)


def test_ejected_after_failures_within_the_window() -> None:
    registry, pool = Registry(), backends(4)
    assert registry.record_failure(P, A, pool, 0.0, PASSIVE) is None
    assert registry.record_failure(P, A, pool, 1.0, PASSIVE) is None
    assert registry.record_failure(P, A, pool, 2.0, PASSIVE) == "ejected for 30s: 3 failures within 10s"
    state = registry.health(P, A)
    assert state.ejected(2.0) and state.ejected(31.9) and not state.ejected(32.0)
    assert not state.recent_failures  # the window starts over


def test_failures_outside_the_window_do_not_count() -> None:
    registry, pool = Registry(), backends(4)
    registry.record_failure(P, A, pool, 0.0, PASSIVE)
    registry.record_failure(P, A, pool, 5.0, PASSIVE)
    assert registry.record_failure(P, A, pool, 10.0, PASSIVE) is None  # the one at 0.0 is exactly window_s old
    assert registry.record_failure(P, A, pool, 11.0, PASSIVE) is not None  # 5, 10, 11


def test_failures_while_ejected_do_not_extend_it() -> None:
    registry, pool = Registry(), backends(4)
    for t in (0.0, 1.0, 2.0):
        registry.record_failure(P, A, pool, t, PASSIVE)
    for t in (3.0, 4.0, 5.0):
        assert registry.record_failure(P, A, pool, t, PASSIVE) is None
    assert registry.health(P, A).ejected_until == 32.0


def test_ejection_doubles_up_to_ten_times() -> None:
    registry, pool = Registry(), backends(4)
    now, durations = 0.0, []
    for _ in range(6):
        for _ in range(PASSIVE.failures):
            message = registry.record_failure(P, A, pool, now, PASSIVE)
            now += 0.1
        assert message is not None
        durations.append(registry.health(P, A).ejected_until - (now - 0.1))
        now = registry.health(P, A).ejected_until  # fail again right after it ends
    assert durations == pytest.approx([30.0, 60.0, 120.0, 240.0, 300.0, 300.0])
    assert MAX_EJECTION_FACTOR == 10


def test_record_success_after_an_ejection_resets_the_doubling() -> None:
    registry, pool = Registry(), backends(4)
    for t in (0.0, 1.0, 2.0):
        registry.record_failure(P, A, pool, t, PASSIVE)
    registry.record_success(P, A, 10.0)  # still ejected (a session that was already underway): no reset
    assert registry.health(P, A).ejections == 1
    registry.record_success(P, A, 40.0)
    assert registry.health(P, A).ejections == 0
    for t in (50.0, 51.0, 52.0):
        message = registry.record_failure(P, A, pool, t, PASSIVE)
    assert message == "ejected for 30s: 3 failures within 10s"


def test_max_ejected_percent_caps_ejections_in_a_pool() -> None:
    registry, pool = Registry(), backends(4)  # 50% of 4: two at most
    addresses = [b.address for b in pool]
    for address in addresses:
        for t in (0.0, 1.0, 2.0):
            message = registry.record_failure(P, address, pool, t, PASSIVE)
    assert [registry.health(P, a).ejected(3.0) for a in addresses] == [True, True, False, False]
    assert message is None
    # a capped backend keeps its failures in the window: once a slot is free, its next failure ejects it
    assert registry.record_failure(P, addresses[2], pool, 9.0, PASSIVE) is None
    registry.health(P, addresses[0]).ejected_until = 9.5  # (as if it had been ejected earlier)
    assert registry.record_failure(P, addresses[2], pool, 9.5, PASSIVE) == "ejected for 30s: 3 failures within 10s"


def test_max_ejected_percent_never_ejects_the_only_backend_below_100() -> None:
    registry, pool = Registry(), backends(1)
    for t in (0.0, 1.0, 2.0):
        assert registry.record_failure(P, pool[0].address, pool, t, PASSIVE) is None
    everything = PassiveHealthConfig(failures=3, window_s=10.0, ejection_s=30.0, max_ejected_percent=100)
    assert registry.record_failure(P, pool[0].address, pool, 3.0, everything) is not None


# --- slow start, availability, the registry ----------------------------------------


def test_weight_factor_ramps_up_over_slow_start() -> None:
    state = HealthState(P, A)
    assert state.weight_factor(0.0, 10.0) == 1.0  # never up: no ramp to apply
    state.mark_up(100.0)
    assert state.weight_factor(100.0, 10.0) == SLOW_START_FLOOR
    assert state.weight_factor(100.1, 10.0) == SLOW_START_FLOOR
    assert state.weight_factor(102.5, 10.0) == pytest.approx(0.25)
    assert state.weight_factor(109.0, 10.0) == pytest.approx(0.9)
    assert state.weight_factor(110.0, 10.0) == 1.0
    assert state.weight_factor(100.0, 0.0) == 1.0  # slow start off


def test_weight_factor_ramps_again_after_an_ejection_ends() -> None:
    """Issue 17 item 6: the end of a passive ejection is a recovery, like DOWN -> UP."""
    registry, pool = Registry(), backends(4)
    state = registry.health(P, A)
    state.mark_up(0.0)
    assert state.weight_factor(1000.0, 6.0) == 1.0  # long up: full weight
    for t in (1000.0, 1000.1, 1000.2):
        registry.record_failure(P, A, pool, t, PASSIVE)
    assert state.ejected(1000.2) and state.ejected_until == pytest.approx(1030.2)
    assert state.weight_factor(1030.2, 6.0) == SLOW_START_FLOOR  # back, at the floor
    assert state.weight_factor(1033.2, 6.0) == pytest.approx(0.5)
    assert state.weight_factor(1036.2, 6.0) == 1.0
    assert state.weight_factor(1030.2, 0.0) == 1.0  # slow start off: full weight at once


def test_weight_factor_ramps_from_the_later_of_up_and_the_end_of_an_ejection() -> None:
    state = HealthState(P, A)
    state.mark_up(0.0)
    state.ejected_until = 5.0  # an ejection ended at 5 ...
    state.record_check(False, "r", 6.0, rise=1, fall=1)
    state.record_check(True, "", 20.0, rise=1, fall=1)  # ... then DOWN, and UP again at 20
    assert state.weight_factor(23.0, 6.0) == pytest.approx(0.5)


def test_available_needs_up_not_draining_not_full_not_ejected() -> None:
    backend = BackendConfig(address=A, max_connections=2)
    registry = Registry()
    state, health = registry.state(A), registry.health(P, A)
    health.mark_up(0.0)
    assert registry.available(P, backend, 0.0)
    state.draining = True
    assert not registry.available(P, backend, 0.0)
    assert unavailable_because(state, health, backend, 0.0) == "draining"
    state.draining = False
    state.active = 2
    assert state.full(backend) and not registry.available(P, backend, 0.0)
    assert unavailable_because(state, health, backend, 0.0) == "full"
    state.active = 1
    assert not state.full(backend) and registry.available(P, backend, 0.0)
    health.ejected_until = 5.0
    assert not registry.available(P, backend, 4.9) and registry.available(P, backend, 5.0)
    assert unavailable_because(state, health, backend, 4.9) == "ejected"
    health.record_check(False, "r", 6.0, rise=1, fall=1)
    assert not registry.available(P, backend, 6.0)
    assert unavailable_because(state, health, backend, 6.0) == "down"


def test_no_connection_limit_means_never_full() -> None:
    registry = Registry()
    registry.state(A).active = 10_000
    registry.health(P, A).mark_up(0.0)
    assert not registry.state(A).full(BackendConfig(address=A)) and registry.available(P, BackendConfig(address=A), 0.0)


def test_health_is_per_pool_one_pools_down_leaves_the_other_pool_alone() -> None:
    """Issue 17 item 7: a pool without checks kept answering 503 because another pool's check failed the address."""
    registry, backend = Registry(), BackendConfig(address=A)
    registry.health(Q, A).mark_up(0.0)  # pool "other": no active checks, healthy
    registry.health(P, A).record_check(False, "connect refused", 1.0, rise=1, fall=1)  # pool "chat": DOWN
    assert registry.health(P, A).health is Health.DOWN and not registry.available(P, backend, 1.0)
    assert registry.health(Q, A).health is Health.UP and registry.available(Q, backend, 1.0)


def test_passive_ejection_is_per_pool() -> None:
    registry, pool = Registry(), backends(4)
    registry.health(P, A).mark_up(0.0)
    registry.health(Q, A).mark_up(0.0)
    for t in (1.0, 2.0, 3.0):
        registry.record_failure(P, A, pool, t, PASSIVE)
    assert registry.health(P, A).ejected(3.0) and not registry.health(Q, A).ejected(3.0)
    assert registry.available(Q, pool[0], 3.0) and not registry.available(P, pool[0], 3.0)


def test_draining_and_sessions_stay_per_address() -> None:
    registry, backend = Registry(), BackendConfig(address=A, max_connections=1)
    registry.health(P, A).mark_up(0.0)
    registry.health(Q, A).mark_up(0.0)
    registry.state(A).active = 1  # one session through pool "chat" fills the backend for both
    assert not registry.available(Q, backend, 0.0)
    registry.state(A).active = 0
    registry.state(A).draining = True  # the operator drained the address
    assert not registry.available(P, backend, 0.0) and not registry.available(Q, backend, 0.0)


def test_registry_keys_by_address_and_forgets_only_idle_unknown_ones() -> None:
    registry = Registry()
    assert registry.state(A) is registry.state(Address("10.0.0.1", 9000))
    assert registry.health(P, A) is registry.health("chat", Address("10.0.0.1", 9000))
    assert registry.health(P, A) is not registry.health(Q, A)
    registry.state(B).active = 1
    registry.state(Address("10.0.0.3", 9000))
    q_health = registry.health(Q, A)
    p_health = registry.health(P, A)
    registry.forget(keep={A}, pools={(P, A)})
    assert {s.address for s in registry} == {A, B}  # B still has a session
    assert registry.health(P, A) is p_health  # still configured: kept
    assert registry.health(Q, A) is not q_health  # pool "other" no longer lists A: its health starts over


def test_forgotten_backends_keep_their_share_of_the_process_totals() -> None:
    registry = Registry()
    for address, n in ((A, 10), (B, 20)):
        state = registry.state(address)
        state.bytes_up, state.bytes_down, state.messages_up, state.messages_down = n, n + 1, n + 2, n + 3
    C = Address("10.0.0.3", 9000)
    registry.state(C).active = 1  # in use: kept although no pool has it
    registry.forget(keep={A})
    assert {s.address for s in registry} == {A, C}
    assert registry.retired == [20, 21, 22, 23]
