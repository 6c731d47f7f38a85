"""balance.registry.Lease: a session's count in its backend's ``active``, released exactly once. No I/O."""

from __future__ import annotations

from wsproxy.balance.registry import Lease, Registry
from wsproxy.config.schema import Address, BackendConfig

A = Address("10.0.0.1", 9000)
B = Address("10.0.0.2", 9000)


def test_a_lease_counts_one_active_session_until_released() -> None:
    registry = Registry()
    lease = registry.lease(A)
    assert registry.state(A).active == 1 and lease.state is registry.state(A) and not lease.released
    lease.release()
    assert registry.state(A).active == 0 and lease.released


def test_release_twice_is_release_once() -> None:
    registry = Registry()
    kept = registry.lease(A)
    lease = registry.lease(A)
    for _ in range(3):  # every path that may end a session calls it
        lease.release()
    assert registry.state(A).active == 1  # the other session still counts
    kept.release()
    kept.release()
    assert registry.state(A).active == 0


def test_leases_count_per_address() -> None:
    registry = Registry()
    leases = [registry.lease(A), registry.lease(A), registry.lease(B)]
    assert (registry.state(A).active, registry.state(B).active) == (2, 1)
    assert registry.state(A).full(BackendConfig(address=A, max_connections=2))  # max_connections sees them
    leases[0].release()
    assert not registry.state(A).full(BackendConfig(address=A, max_connections=2))
    assert (registry.state(A).active, registry.state(B).active) == (1, 1)


def test_a_leased_backend_survives_forget_and_its_release_counts_where_it_was_taken() -> None:
    registry = Registry()
    lease = registry.lease(A)
    registry.forget(keep=set())  # gone from every pool, but a session still holds it
    assert registry.state(A) is lease.state and lease.state.active == 1
    lease.release()
    registry.forget(keep=set())
    assert [state.address for state in registry] == []


def test_a_lease_of_a_state_of_its_own() -> None:
    lease = Lease(Registry().state(A))
    assert lease.state.active == 1
    lease.release()
    lease.release()
    assert lease.state.active == 0
