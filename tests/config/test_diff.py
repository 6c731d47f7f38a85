"""The reload plans of ``config.diff``: old config vs new, without sockets or trio."""

from __future__ import annotations

import dataclasses

from wsproxy.config.schema import (
    Address,
    BackendConfig,
    DrainConfig,
    HealthConfig,
    ListenerConfig,
    ListenerName,
    PoolConfig,
    PoolName,
)
from wsproxy.config.diff import (
    CheckerAction,
    addresses_in_use,
    plan_checkers,
    plan_listeners,
    removed_backends,
)

from tests.kit.servers import make_config

A, B, C = (Address("127.0.0.1", p) for p in (9001, 9002, 9003))


def listener(name: str, port: int, host: str = "127.0.0.1") -> ListenerConfig:
    return ListenerConfig(name=ListenerName(name), bind=Address(host, port))


def pool(name: str, *addresses: Address, drain: DrainConfig | None = None, health: HealthConfig | None = None) -> PoolConfig:
    return PoolConfig(
        name=PoolName(name),
        backends=tuple(BackendConfig(address=a) for a in addresses),
        drain=drain or DrainConfig(),
        health=health,
    )


def with_pools(*pools: PoolConfig):  # type: ignore[no-untyped-def]
    return dataclasses.replace(make_config([]), pools={p.name: p for p in pools})


def test_a_renamed_listener_keeps_its_socket_and_a_moved_one_gets_a_new_one() -> None:
    running = {"web": Address("127.0.0.1", 80), "tls": Address("127.0.0.1", 443)}
    plan = plan_listeners(running, [listener("public", 80), listener("tls", 443, "0.0.0.0")])
    assert dict(plan.reuse) == {"public": "web"}
    assert [spec.name for spec in plan.open] == ["tls"]
    assert plan.close == ("tls",)  # the old 127.0.0.1:443 closes; its port may block the new bind (App frees it)


def test_one_running_listener_is_taken_once() -> None:
    running = {"a": Address("127.0.0.1", 80)}
    plan = plan_listeners(running, [listener("a", 80), listener("b", 81)])
    assert dict(plan.reuse) == {"a": "a"} and [s.name for s in plan.open] == ["b"] and plan.close == ()


def test_removed_backends_drain_with_the_new_settings_or_the_removed_pools() -> None:
    old_drain, new_drain = DrainConfig(timeout_s=1.0), DrainConfig(timeout_s=2.0)
    old = with_pools(pool("chat", A, B, drain=old_drain), pool("gone", C, drain=old_drain))
    new = with_pools(pool("chat", A, drain=new_drain))
    assert sorted(removed_backends(old, new)) == sorted([(PoolName("chat"), B, new_drain), (PoolName("gone"), C, old_drain)])
    assert removed_backends(new, new) == []
    assert addresses_in_use(new) == {A}


def test_checker_plan() -> None:
    checks = HealthConfig()
    new = {p.name: p for p in (pool("kept", A), pool("added", B), pool("gained", C, health=checks), pool("quiet", C))}
    running = {PoolName("kept"): True, PoolName("gone"): True, PoolName("gained"): False, PoolName("quiet"): False}
    assert plan_checkers(running, new) == {
        PoolName("gone"): CheckerAction.STOP,
        PoolName("kept"): CheckerAction.UPDATE,
        PoolName("added"): CheckerAction.START,
        PoolName("gained"): CheckerAction.START,  # its checker returned (no checks then): a new one runs them
        PoolName("quiet"): CheckerAction.UPDATE,  # still no checks: the finished checker takes the pool
    }
