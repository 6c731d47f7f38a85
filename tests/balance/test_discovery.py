"""DNS discovery's decisions (balance/discovery.py): no sockets, no event loop."""

from __future__ import annotations

import dataclasses

from wsproxy.balance.discovery import (
    MIN_LOOKUP_S,
    SrvRecord,
    best_priority,
    carry_discovered,
    diff,
    discovered,
    from_addresses,
    from_srv,
    next_lookup_s,
    same_question,
    srv_weights,
    with_discovered,
)
from wsproxy.balance.plan import Plan, plan_session
from wsproxy.balance.policy import make_selector
from wsproxy.config.schema import (
    Address,
    BackendConfig,
    BackendTlsConfig,
    Config,
    DiscoveryConfig,
    ListenerConfig,
    ListenerName,
    PoolConfig,
    PoolName,
    RouteConfig,
)
from wsproxy.balance.registry import Registry

CHAT = PoolName("chat")
SRV_Q = DiscoveryConfig(dns="_ws._tcp.chat.example", type="SRV")


def pool(*backends: BackendConfig, discovery: DiscoveryConfig | None = SRV_Q, **kw: object) -> PoolConfig:
    return PoolConfig(name=CHAT, backends=tuple(backends), discovery=discovery, **kw)  # type: ignore[arg-type]


def config(*pools: PoolConfig) -> Config:
    return Config(
        source="<test>",
        listeners=(ListenerConfig(name=ListenerName("l"), bind=Address("127.0.0.1", 0)),),
        routes=(RouteConfig(pool=CHAT),),
        pools={p.name: p for p in pools},
    )


def listed(host: str, port: int = 9000) -> BackendConfig:
    return BackendConfig(address=Address(host, port))


def test_a_records_become_one_backend_per_address_sorted_and_normalised() -> None:
    found = from_addresses(["10.0.0.3", "10.0.0.1", "10.0.0.3", "2001:db8:0:0::1"], 9000)
    assert [str(b.address) for b in found] == ["10.0.0.1:9000", "10.0.0.3:9000", "[2001:db8::1]:9000"]
    assert all(b.source == "dns" and b.priority == 0 and b.weight == 1 for b in found)
    assert from_addresses([], 9000) == ()


def test_srv_records_keep_priority_weight_and_port_of_every_target_address() -> None:
    records = [
        SrvRecord(10, 60, 9001, "a.chat"),
        SrvRecord(10, 20, 9002, "b.chat"),
        SrvRecord(20, 0, 9003, "c.chat"),
        SrvRecord(10, 5, 9004, "gone.chat"),  # no address: left out
    ]
    found = from_srv(records, {"a.chat": ["10.0.0.1", "10.0.0.2"], "b.chat": ["10.0.0.1"], "c.chat": ["10.0.0.9"]})
    assert [(str(b.address), b.priority, b.weight) for b in found] == [
        ("10.0.0.1:9001", 10, 60),
        ("10.0.0.1:9002", 10, 20),
        ("10.0.0.2:9001", 10, 60),
        ("10.0.0.9:9003", 20, 1),  # weight 0 is the smallest balancer weight
    ]


def test_srv_target_dot_alone_means_no_service_and_duplicates_keep_their_best_priority() -> None:
    assert from_srv([SrvRecord(0, 0, 0, "")], {}) == ()
    twice = from_srv(
        [SrvRecord(20, 9, 9001, "a"), SrvRecord(10, 3, 9001, "a"), SrvRecord(10, 7, 9001, "a")], {"a": ["10.0.0.1"]}
    )
    assert [(b.priority, b.weight) for b in twice] == [(10, 7)]


def test_srv_weights_keep_ratios_within_the_balancer_range() -> None:
    assert srv_weights([1, 3, 0]) == [1, 3, 1]
    assert srv_weights([1000, 10]) == [1000, 10]
    assert srv_weights([65535, 32768, 10]) == [1000, 500, 1]
    assert srv_weights([]) == []


def test_the_ttl_decides_the_next_lookup_within_the_floor_and_the_interval() -> None:
    assert next_lookup_s(3, 5.0) == 3
    assert next_lookup_s(0, 5.0) == MIN_LOOKUP_S
    assert next_lookup_s(3600, 5.0) == 5.0
    assert next_lookup_s(None, 5.0) == 5.0
    assert next_lookup_s(0, 1.0) == 1.0


def test_diff_names_what_appeared_disappeared_reappeared_and_changed() -> None:
    a, b, c = (BackendConfig(address=Address(f"10.0.0.{i}", 9000), source="dns") for i in (1, 2, 3))
    change = diff([a, b], [b, c, dataclasses.replace(a, weight=5)], draining={c.address})
    assert change.appeared == (c.address,)
    assert change.reappeared == (c.address,)
    assert change.disappeared == ()
    assert change.changed == (a.address,)
    gone = diff([a, b], [b])
    assert gone.disappeared == (a.address,) and gone
    assert not diff([a, b], [b, a])


def test_found_backends_follow_the_listed_ones_which_win_on_the_same_address() -> None:
    static = listed("10.0.0.1")
    found = from_addresses(["10.0.0.1", "10.0.0.2"], 9000)
    merged = with_discovered(pool(static), found)
    assert merged.backends == (static, found[1])
    assert discovered(merged) == (found[1],)
    again = with_discovered(merged, from_addresses(["10.0.0.3"], 9000))
    assert [str(b.address) for b in again.backends] == ["10.0.0.1:9000", "10.0.0.3:9000"]
    emptied = with_discovered(again, ())
    assert emptied.backends == (static,)


def test_found_backends_speak_tls_in_a_pool_with_a_tls_mapping() -> None:
    merged = with_discovered(pool(tls=BackendTlsConfig()), from_addresses(["10.0.0.2"], 9443))
    assert [b.tls for b in merged.backends] == [True]


def test_a_reload_keeps_the_found_set_only_for_the_same_question() -> None:
    found = from_addresses(["10.0.0.2"], 9000)
    running = config(with_discovered(pool(listed("10.0.0.1")), found))
    loaded = config(pool(listed("10.0.0.1"), discovery=dataclasses.replace(SRV_Q, interval_s=9.0, on_error="empty")))
    assert carry_discovered(running, loaded).pools[CHAT].backends == (listed("10.0.0.1"), found[0])
    renamed = config(pool(listed("10.0.0.1"), discovery=dataclasses.replace(SRV_Q, dns="_ws._tcp.other.example")))
    assert carry_discovered(running, renamed).pools[CHAT].backends == (listed("10.0.0.1"),)
    dropped = config(pool(listed("10.0.0.1"), discovery=None))
    assert carry_discovered(running, dropped).pools[CHAT].backends == (listed("10.0.0.1"),)
    assert same_question(SRV_Q, dataclasses.replace(SRV_Q, dns="_WS._tcp.chat.example."))
    assert not same_question(SRV_Q, None)


def test_only_the_best_priority_with_an_available_backend_takes_sessions() -> None:
    primary = BackendConfig(address=Address("10.0.0.1", 9000), priority=10, weight=3, source="dns")
    second = BackendConfig(address=Address("10.0.0.2", 9000), priority=10, weight=1, source="dns")
    backup = BackendConfig(address=Address("10.0.0.9", 9000), priority=20, source="dns")
    chat = pool(primary, second, backup)
    registry = Registry()
    for b in chat.backends:
        registry.health(chat.name, b.address).mark_up(0.0)
    selector = make_selector(chat)

    def picks(n: int, *, backup_allowed: bool = False) -> list[Address]:
        result = []
        for _ in range(n):
            plan = plan_session(chat, registry, selector, 100.0, headers=[], target=b"/", client_ip="10.1.1.1")
            assert isinstance(plan, Plan)
            result.append(plan.order[0].address)
            assert backup_allowed or backup not in plan.order  # not even as a failover candidate
        return result

    first = picks(40)
    assert first.count(primary.address) == 30 and first.count(second.address) == 10  # SRV weights 3:1
    registry.state(primary.address).draining = True
    registry.state(second.address).draining = True
    assert set(picks(5, backup_allowed=True)) == {backup.address}
    assert best_priority([]) == []
