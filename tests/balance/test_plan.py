"""plan_session: availability, cookie pins, sticky keys, slow start, retries, the 503s. No I/O here."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from wsproxy.balance.plan import RETRY_AFTER_FULL_S, NoBackend, Plan, cookie_for, plan_session
from wsproxy.balance.policy import Candidate, Selector, make_selector, rendezvous_order
from wsproxy.balance.sticky import cookie_value, sticky_key
from wsproxy.config.schema import (
    Address,
    BackendConfig,
    PoolConfig,
    PoolName,
    StickyConfig,
    StickyCookieConfig,
)
from wsproxy.balance.registry import Health, Registry

NOW = 1000.0
SECRET = b"k" * 32
COOKIE = StickyCookieConfig(secret=SECRET, secret_file="sticky.key", max_age_s=600.0, same_site="Lax")


def backends(*weights: int, max_connections: int = 0) -> tuple[BackendConfig, ...]:
    return tuple(
        BackendConfig(address=Address(f"10.0.0.{i + 1}", 9000), weight=w, max_connections=max_connections)
        for i, w in enumerate(weights)
    )


def name(backend: BackendConfig) -> str:
    return "abcdefgh"[int(backend.address.host.rsplit(".", 1)[1]) - 1]


def make_pool(
    *weights: int,
    balance: str = "round_robin",
    sticky: StickyConfig | None = None,
    retries: int = 2,
    slow_start_s: float = 0.0,
    max_connections: int = 0,
    factor: int = 0,
) -> PoolConfig:
    return PoolConfig(
        name=PoolName("chat"),
        balance=balance,
        backends=backends(*(weights or (1, 1, 1, 1)), max_connections=max_connections),
        retries=retries,
        slow_start_s=slow_start_s,
        sticky=sticky,
        hash_balance_factor=factor,
    )


def cookie_sticky(on_unavailable: str = "repick") -> StickyConfig:
    return StickyConfig(source="cookie", name="srv", cookie=COOKIE, on_unavailable=on_unavailable)


def up(pool: PoolConfig, registry: Registry | None = None) -> Registry:
    """A registry in which every backend of ``pool`` has been UP since long ago."""
    registry = Registry() if registry is None else registry
    for backend in pool.backends:
        registry.health("chat", backend.address).mark_up(NOW - 3600)
    return registry


def plan(
    pool: PoolConfig,
    registry: Registry,
    selector: Selector,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    target: bytes = b"/chat",
    client_ip: str = "203.0.113.9",
    claims: dict[str, object] | None = None,
    tls: bool = False,
    now: float = NOW,
) -> Plan | NoBackend:
    return plan_session(
        pool, registry, selector, now, headers=headers, target=target, client_ip=client_ip, claims=claims, tls=tls
    )


def ok(result: Plan | NoBackend) -> Plan:
    assert isinstance(result, Plan), result
    return result


def refused(result: Plan | NoBackend) -> NoBackend:
    assert isinstance(result, NoBackend), result
    return result


def names(result: Plan | NoBackend) -> str:
    return "".join(name(b) for b in ok(result).order)


def sent_back(set_cookie_header: bytes | None) -> list[tuple[bytes, bytes]]:
    """The Cookie header a browser sends after receiving ``set_cookie_header``."""
    assert set_cookie_header is not None
    return [(b"cookie", b"theme=dark; " + set_cookie_header.split(b";", 1)[0])]


# -- availability, retries, 503s ---------------------------------------------------------------------------------------


def test_plain_pool_follows_the_selector() -> None:
    pool = make_pool(1, 1, 1, 1, retries=3)
    registry, selector = up(pool), make_selector(pool)
    assert [names(plan(pool, registry, selector)) for _ in range(4)] == ["abcd", "bcda", "cdab", "dabc"]
    result = ok(plan(pool, registry, selector))
    assert result.sticky == "none" and result.set_cookie is None


@pytest.mark.parametrize(("retries", "expected"), [(0, "a"), (1, "ab"), (2, "abc"), (3, "abcd"), (10, "abcd")])
def test_order_is_cut_to_one_plus_retries(retries: int, expected: str) -> None:
    pool = make_pool(retries=retries)
    assert names(plan(pool, up(pool), make_selector(pool))) == expected


def test_unavailable_backends_are_skipped() -> None:
    pool = make_pool(1, 1, 1, 1, 1, retries=4, max_connections=2)
    registry = up(pool)
    registry.health("chat", pool.backends[0].address).health = Health.DOWN
    registry.state(pool.backends[1].address).draining = True
    registry.state(pool.backends[2].address).active = 2  # full
    registry.health("chat", pool.backends[3].address).ejected_until = NOW + 5
    selector = make_selector(pool)
    assert {names(plan(pool, registry, selector)) for _ in range(5)} == {"e"}


def test_unknown_backends_take_no_traffic() -> None:
    pool = make_pool(1, 1)
    assert refused(plan(pool, Registry(), make_selector(pool))).reason == "pool chat: every backend is not yet healthy"


def test_every_backend_down() -> None:
    pool = make_pool(1, 1, 1)
    registry = up(pool)
    for backend in pool.backends:
        registry.health("chat", backend.address).health = Health.DOWN
    result = refused(plan(pool, registry, make_selector(pool)))
    assert result == NoBackend(
        status=503,
        reason="pool chat: every backend is down",
        body="no backend available in pool chat\n",
        retry_after_s=None,
    )


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "random_two", "hash"])
def test_every_backend_full_asks_to_retry_later(balance: str) -> None:
    pool = make_pool(1, 1, 1, balance=balance, max_connections=3)
    registry = up(pool)
    for backend in pool.backends:
        registry.state(backend.address).active = 3
    result = refused(plan(pool, registry, make_selector(pool)))
    assert (result.status, result.reason, result.retry_after_s) == (
        503,
        "pool chat: every backend is full",
        RETRY_AFTER_FULL_S,
    )
    registry.state(pool.backends[1].address).active = 2  # a session ended
    assert names(plan(pool, registry, make_selector(pool))) == "b"


def test_mixed_reasons_are_counted() -> None:
    pool = make_pool(1, 1, 1, max_connections=1)
    registry = up(pool)
    registry.health("chat", pool.backends[0].address).health = Health.DOWN
    registry.state(pool.backends[1].address).active = 1
    registry.health("chat", pool.backends[2].address).health = Health.DOWN
    result = refused(plan(pool, registry, make_selector(pool)))
    assert result.reason == "pool chat: no backend available: 2 down, 1 full"
    assert result.retry_after_s == RETRY_AFTER_FULL_S


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "random_two", "hash"])
def test_max_connections_is_never_exceeded(balance: str) -> None:
    pool = make_pool(3, 1, 1, balance=balance, max_connections=4, retries=0)
    registry, selector = up(pool), make_selector(pool)
    for _ in range(12):
        registry.state(ok(plan(pool, registry, selector)).order[0].address).active += 1
    assert [registry.state(b.address).active for b in pool.backends] == [4, 4, 4]
    assert refused(plan(pool, registry, selector)).retry_after_s == RETRY_AFTER_FULL_S


# -- slow start --------------------------------------------------------------------------------------------------------


def test_slow_start_lowers_the_share_of_a_fresh_backend() -> None:
    """Up for 3 s of a 30 s ramp: a tenth of its weight, so 0.1 / 3.1 of the sessions under round robin."""
    pool = make_pool(1, 1, 1, 1, slow_start_s=30.0)
    registry = up(pool)
    registry.health("chat", pool.backends[3].address).up_since = NOW - 3
    selector = make_selector(pool)
    counts = Counter(names(plan(pool, registry, selector))[0] for _ in range(3100))
    assert counts == Counter({"a": 1000, "b": 1000, "c": 1000, "d": 100})
    later = Counter(names(plan(pool, registry, selector, now=NOW + 27))[0] for _ in range(400))  # ramp done
    assert later == Counter({"a": 100, "b": 100, "c": 100, "d": 100})


def test_slow_start_with_least_conn() -> None:
    """Least connections fills the fresh backend to about a tenth of the others' load, not to the same load."""
    pool = make_pool(1, 1, 1, 1, balance="least_conn", slow_start_s=30.0)
    registry = up(pool)
    registry.health("chat", pool.backends[3].address).up_since = NOW - 3
    selector = make_selector(pool)
    for _ in range(310):
        registry.state(ok(plan(pool, registry, selector)).order[0].address).active += 1
    actives = [registry.state(b.address).active for b in pool.backends]
    assert actives[:3] == [100, 100, 100] and 9 <= actives[3] <= 11, actives


# -- cookie pins -------------------------------------------------------------------------------------------------------


def test_new_client_gets_a_cookie_for_the_first_backend() -> None:
    pool = make_pool(sticky=cookie_sticky())
    result = ok(plan(pool, up(pool), make_selector(pool)))
    assert result.sticky == "new"
    value = cookie_value(SECRET, "chat", result.order[0].address).encode()
    assert result.set_cookie == b"srv=" + value + b"; Path=/; Max-Age=600; HttpOnly; SameSite=Lax"
    assert result.set_cookie == cookie_for(pool, result.order[0], tls=False)


def test_cookie_is_secure_on_tls() -> None:
    pool = make_pool(sticky=cookie_sticky())
    result = ok(plan(pool, up(pool), make_selector(pool), tls=True))
    assert result.set_cookie is not None and b"; Secure;" in result.set_cookie


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "random_two", "hash"])
def test_cookie_pins_every_later_session(balance: str) -> None:
    pool = make_pool(sticky=cookie_sticky(), balance=balance)
    registry, selector = up(pool), make_selector(pool)
    first = ok(plan(pool, registry, selector))
    registry.state(first.order[0].address).active += 5  # the pinned backend becomes the busiest
    for _ in range(20):
        again = ok(plan(pool, registry, selector, headers=sent_back(first.set_cookie)))
        assert again.order[0] == first.order[0]
        assert (again.sticky, again.set_cookie) == ("hit", None)
        assert len(again.order) == 3 and len(set(again.order)) == 3


def test_a_pinned_backend_is_followed_by_the_least_loaded() -> None:
    pool = make_pool(sticky=cookie_sticky(), retries=3)
    registry = up(pool)
    for backend, active in zip(pool.backends, (0, 7, 2, 5)):
        registry.state(backend.address).active = active
    pin = [(b"cookie", b"srv=" + cookie_value(SECRET, "chat", pool.backends[1].address).encode())]
    assert names(plan(pool, registry, make_selector(pool), headers=pin)) == "bacd"


@pytest.mark.parametrize(
    "value",
    [
        b"AAAAAAAAAAAAAAAAAAAAAA",
        cookie_value(SECRET, "other-pool", Address("10.0.0.2", 9000)).encode(),
        cookie_value(b"x" * 32, "chat", Address("10.0.0.2", 9000)).encode(),
        b"10.0.0.2:9000",
    ],
    ids=["forged", "foreign-pool", "other-secret", "plain-address"],
)
def test_cookies_it_did_not_sign_are_ignored(value: bytes) -> None:
    pool = make_pool(sticky=cookie_sticky(), retries=0)
    registry, selector = up(pool), make_selector(pool)
    seen: Counter[str] = Counter()
    for _ in range(8):
        result = ok(plan(pool, registry, selector, headers=[(b"cookie", b"srv=" + value)]))
        assert result.sticky == "miss"
        assert result.set_cookie == cookie_for(pool, result.order[0], tls=False)
        seen[name(result.order[0])] += 1
    assert seen == Counter({"a": 2, "b": 2, "c": 2, "d": 2})  # balanced as if there were no cookie


def unavailable(how: str, registry: Registry, backend: BackendConfig) -> None:
    state = registry.state(backend.address)
    if how == "down":
        registry.health("chat", backend.address).health = Health.DOWN
    elif how == "draining":
        state.draining = True
    elif how == "full":
        state.active = backend.max_connections
    elif how == "ejected":
        registry.health("chat", backend.address).ejected_until = NOW + 30


@pytest.mark.parametrize("how", ["down", "draining", "full", "ejected"])
def test_pinned_backend_unavailable_repick(how: str) -> None:
    pool = make_pool(sticky=cookie_sticky("repick"), max_connections=10)
    registry, selector = up(pool), make_selector(pool)
    pinned = pool.backends[2]
    headers = [(b"cookie", b"srv=" + cookie_value(SECRET, "chat", pinned.address).encode())]
    unavailable(how, registry, pinned)
    result = ok(plan(pool, registry, selector, headers=headers))
    assert result.sticky == "repick"
    assert pinned not in result.order
    assert result.set_cookie == cookie_for(pool, result.order[0], tls=False)  # the pin moves with the client
    moved = ok(plan(pool, registry, selector, headers=sent_back(result.set_cookie)))
    assert (moved.order[0], moved.sticky) == (result.order[0], "hit")


@pytest.mark.parametrize("how", ["down", "draining", "full", "ejected"])
def test_pinned_backend_unavailable_reject(how: str) -> None:
    pool = make_pool(sticky=cookie_sticky("reject"), max_connections=10)
    registry = up(pool)
    pinned = pool.backends[2]
    unavailable(how, registry, pinned)
    headers = [(b"cookie", b"srv=" + cookie_value(SECRET, "chat", pinned.address).encode())]
    result = refused(plan(pool, registry, make_selector(pool), headers=headers))
    assert result.status == 503
    assert result.reason == f"pool chat: pinned backend 10.0.0.3:9000 unavailable ({how}, reject)"
    assert result.body == "no backend available in pool chat\n"
    assert result.retry_after_s == (RETRY_AFTER_FULL_S if how == "full" else None)
    # Clients without a pin are still served.
    assert ok(plan(pool, registry, make_selector(pool))).sticky == "new"


def test_pinned_backend_comes_back() -> None:
    pool = make_pool(sticky=cookie_sticky("reject"))
    registry, selector = up(pool), make_selector(pool)
    pinned = pool.backends[1]
    headers = [(b"cookie", b"srv=" + cookie_value(SECRET, "chat", pinned.address).encode())]
    state = registry.health(pool.name, pinned.address)
    state.record_check(False, "connection refused", NOW, rise=2, fall=1)
    assert isinstance(plan(pool, registry, selector, headers=headers), NoBackend)
    state.record_check(True, "", NOW + 5, rise=2, fall=1)
    state.record_check(True, "", NOW + 10, rise=2, fall=1)
    result = ok(plan(pool, registry, selector, headers=headers, now=NOW + 10))
    assert (result.order[0], result.sticky, result.set_cookie) == (pinned, "hit", None)


def test_cookie_pin_with_every_backend_down_is_a_pool_503() -> None:
    pool = make_pool(1, 1, sticky=cookie_sticky("repick"))
    registry = up(pool)
    for backend in pool.backends:
        registry.health("chat", backend.address).health = Health.DOWN
    headers = [(b"cookie", b"srv=" + cookie_value(SECRET, "chat", pool.backends[0].address).encode())]
    result = refused(plan(pool, registry, make_selector(pool), headers=headers))
    assert result.reason == "pool chat: every backend is down"


def test_cookie_for() -> None:
    pool = make_pool(sticky=cookie_sticky())
    header = cookie_for(pool, pool.backends[3], tls=True)
    value = cookie_value(SECRET, "chat", pool.backends[3].address).encode()
    assert header is not None and header.startswith(b"srv=" + value + b"; ")
    assert b"; Secure;" in header
    assert cookie_for(make_pool(), pool.backends[3], tls=True) is None
    assert cookie_for(make_pool(sticky=StickyConfig(source="ip")), pool.backends[3], tls=True) is None


# -- sticky keys -------------------------------------------------------------------------------------------------------


RequestWith = Callable[[str], dict[str, Any]]  # a key value -> the plan() arguments that carry it
KEY_SOURCES: list[tuple[StickyConfig, RequestWith]] = [
    (StickyConfig(source="header", name="X-User"), lambda k: {"headers": [(b"x-user", k.encode())]}),
    (StickyConfig(source="query", name="room"), lambda k: {"target": b"/chat?v=1&room=" + k.encode()}),
    (StickyConfig(source="ip"), lambda k: {"client_ip": k}),
    (StickyConfig(source="claim", name="sub"), lambda k: {"claims": {"sub": k}}),
]
KEY_IDS = ["header", "query", "ip", "claim"]


def client(n: int) -> str:
    """A key value that works for every source (it is also an IP address)."""
    return f"198.51.{n // 250}.{n % 250}"


@pytest.mark.parametrize(("sticky", "request_with"), KEY_SOURCES, ids=KEY_IDS)
@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "random_two", "hash"])
def test_same_key_same_backend(sticky: StickyConfig, request_with: RequestWith, balance: str) -> None:
    pool = make_pool(1, 2, 1, 3, sticky=sticky, balance=balance)
    registry, selector = up(pool), make_selector(pool)
    homes: Counter[str] = Counter()
    for n in range(400):
        kwargs = request_with(client(n))
        first = ok(plan(pool, registry, selector, **kwargs))
        assert first.sticky == "hit" and first.set_cookie is None
        registry.state(first.order[0].address).active += 1  # load does not move a key (no balance factor)
        for _ in range(3):
            assert ok(plan(pool, registry, selector, **kwargs)).order == first.order
        homes[name(first.order[0])] += 1
    assert set(homes) == set("abcd")  # keys spread, by weight
    assert homes["d"] > homes["b"] > homes["a"]


def test_query_key_is_percent_decoded() -> None:
    pool = make_pool(sticky=StickyConfig(source="query", name="room"))
    registry, selector = up(pool), make_selector(pool)
    plain = ok(plan(pool, registry, selector, target=b"/chat?room=caf%C3%A9+au+lait"))
    other = ok(plan(pool, registry, selector, target=b"/chat?x=1&room=caf%c3%a9%20au%20lait"))
    assert plain.order == other.order


def test_missing_key_falls_back_to_the_balancer() -> None:
    pool = make_pool(sticky=StickyConfig(source="header", name="X-User"), retries=3)
    registry, selector = up(pool), make_selector(pool)
    orders = [ok(plan(pool, registry, selector, headers=[(b"x-other", b"1")])) for _ in range(4)]
    assert [names(o) for o in orders] == ["abcd", "bcda", "cdab", "dabc"]
    assert {o.sticky for o in orders} == {"miss"}


@pytest.mark.parametrize(("sticky", "request_with"), KEY_SOURCES, ids=KEY_IDS)
def test_key_home_down_repick_and_come_back(sticky: StickyConfig, request_with: RequestWith) -> None:
    pool = make_pool(1, 1, 1, 1, 1, sticky=sticky)
    registry, selector = up(pool), make_selector(pool)
    for n in range(50):
        kwargs = request_with(client(n))
        home = ok(plan(pool, registry, selector, **kwargs))
        registry.health("chat", home.order[0].address).health = Health.DOWN
        away = ok(plan(pool, registry, selector, **kwargs))
        assert away.sticky == "repick"
        assert away.order[:2] == home.order[1:]  # the next candidates of the same key
        registry.health("chat", home.order[0].address).mark_up(NOW)
        back = ok(plan(pool, registry, selector, **kwargs))
        assert (back.order, back.sticky) == (home.order, "hit")


def test_key_home_down_reject() -> None:
    sticky = StickyConfig(source="header", name="X-User", on_unavailable="reject")
    pool = make_pool(sticky=sticky)
    registry, selector = up(pool), make_selector(pool)
    headers = [(b"x-user", b"alice")]
    home = ok(plan(pool, registry, selector, headers=headers)).order[0]
    registry.state(home.address).draining = True
    result = refused(plan(pool, registry, selector, headers=headers))
    assert result.reason == f"pool chat: pinned backend {home.address} unavailable (draining, reject)"
    assert result.retry_after_s is None


def test_key_over_the_balance_factor_moves_to_its_next_candidate() -> None:
    sticky = StickyConfig(source="header", name="X-User")
    pool = make_pool(1, 1, 1, 1, balance="hash", factor=125, sticky=sticky)
    registry, selector = up(pool), make_selector(pool)
    headers = [(b"x-user", b"alice")]
    home = ok(plan(pool, registry, selector, headers=headers))
    registry.state(home.order[0].address).active = 10  # cap: ceil(1.25 x 11 / 4) = 4
    moved = ok(plan(pool, registry, selector, headers=headers))
    assert (moved.order[0], moved.sticky) == (home.order[1], "repick")


def test_hot_keys_with_a_balance_factor_stay_under_the_bound() -> None:
    """80% of sessions from 5 keys on 8 backends: no backend above ceil(1.25 x mean)."""
    sticky = StickyConfig(source="claim", name="sub")
    pool = make_pool(*[1] * 8, balance="hash", factor=125, sticky=sticky, retries=0)
    registry, selector = up(pool), make_selector(pool)
    rng = random.Random(3)
    for sessions in range(1, 1601):
        sub = f"hot-{rng.randrange(5)}" if rng.random() < 0.8 else f"user-{rng.randrange(10**6)}"
        registry.state(ok(plan(pool, registry, selector, claims={"sub": sub})).order[0].address).active += 1
        assert max(registry.state(b.address).active for b in pool.backends) <= -(-125 * sessions // 800)


# -- many instances, no shared state -----------------------------------------------------------------------------------


def instance(sticky: StickyConfig, balance: str) -> tuple[PoolConfig, Registry, Selector]:
    """A separate proxy process: its own config objects, registry and selector."""
    pool = make_pool(1, 2, 3, 1, 1, sticky=sticky, balance=balance)
    return pool, up(pool), make_selector(pool)


@pytest.mark.parametrize(("sticky", "request_with"), KEY_SOURCES, ids=KEY_IDS)
@pytest.mark.parametrize("balance", ["round_robin", "hash"])
def test_two_instances_agree_on_keys(sticky: StickyConfig, request_with: RequestWith, balance: str) -> None:
    one, two = instance(sticky, balance), instance(sticky, balance)
    # Different local loads must not matter (no balance factor).
    two[1].state(two[0].backends[2].address).active = 40
    for n in range(300):
        kwargs = request_with(client(n))
        assert ok(plan(*one, **kwargs)).order == ok(plan(*two, **kwargs)).order


def test_two_instances_agree_on_cookies() -> None:
    one, two = instance(cookie_sticky(), "round_robin"), instance(cookie_sticky(), "least_conn")
    for _ in range(10):
        issued = ok(plan(*one))
        honoured = ok(plan(*two, headers=sent_back(issued.set_cookie)))
        assert (honoured.order[0], honoured.sticky) == (issued.order[0], "hit")


def test_key_home_matches_rendezvous_order_over_the_whole_pool() -> None:
    """The plan's notion of a key's home is the public rendezvous order; the session code can log it."""
    sticky = StickyConfig(source="ip")
    pool, registry, selector = instance(sticky, "least_conn")
    everyone = [Candidate(b, registry.state(b.address), float(b.weight)) for b in pool.backends]
    for n in range(100):
        key = sticky_key(sticky, headers=[], target=b"/", client_ip=client(n), claims=None)
        assert key is not None
        home = rendezvous_order(everyone, key)[0].backend
        assert ok(plan(pool, registry, selector, client_ip=client(n))).order[0] == home
