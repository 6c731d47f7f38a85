"""The pools section's balancing, sticky, health and passive keys (pure, no sockets)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsproxy.config.load import load_config, parse_config
from wsproxy.config.schema import HealthConfig, PassiveHealthConfig
from wsproxy.errors import ConfigErrors

HEAD = """\
listeners:
  - name: public
    bind: 127.0.0.1:8080
routes:
  - pool: chat
pools:
  chat:
"""


def write(tmp_path: Path, pool: str, secret: bytes | None = b"0123456789abcdef0123") -> Path:
    if secret is not None:
        (tmp_path / "cookie.key").write_bytes(secret + b"\n")
    path = tmp_path / "w.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(pool), "    "))
    return path


def errors(tmp_path: Path, pool: str, secret: bytes | None = b"0123456789abcdef0123") -> list[str]:
    path = write(tmp_path, pool, secret)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    return [str(e).removeprefix(str(path) + ":") for e in info.value.errors]


FULL = """\
balance: hash
hash_balance_factor: 150
retries: 1
slow_start: 30s
sticky:
  key: "cookie:wsp_chat"
  cookie: {secret_file: cookie.key, max_age: 1d, same_site: Strict}
  on_unavailable: reject
health:
  type: http
  path: /healthz
  interval: 5s
  timeout: 2s
  rise: 2
  fall: 3
  expect_status: [200, 204]
passive: {failures: 3, window: 10s, ejection: 30s, max_ejected_percent: 50}
backends:
  - address: 127.0.0.1:9001
    max_connections: 100
  - address: 127.0.0.1:9002
    weight: 2
"""


def test_a_full_pool_loads(tmp_path: Path) -> None:
    pool = load_config(str(write(tmp_path, FULL))).pools["chat"]
    assert pool.balance == "hash" and pool.hash_balance_factor == 150
    assert pool.retries == 1 and pool.slow_start_s == 30
    assert pool.sticky is not None and pool.sticky.source == "cookie" and pool.sticky.name == "wsp_chat"
    assert pool.sticky.on_unavailable == "reject"
    assert pool.sticky.cookie is not None
    assert pool.sticky.cookie.secret == b"0123456789abcdef0123"  # relative to the config file, stripped
    assert pool.sticky.cookie.max_age_s == 86400 and pool.sticky.cookie.same_site == "Strict"
    assert pool.health == HealthConfig(type="http", path="/healthz", interval_s=5, timeout_s=2, rise=2, fall=3, expect_status=(200, 204))
    assert pool.passive == PassiveHealthConfig(failures=3, window_s=10, ejection_s=30, max_ejected_percent=50)
    assert pool.backends[0].max_connections == 100 and pool.backends[1].max_connections == 0


def test_defaults(tmp_path: Path) -> None:
    pool = load_config(str(write(tmp_path, "health:\npassive:\nbackends:\n  - address: 127.0.0.1:9001\n"))).pools["chat"]
    assert pool.health == HealthConfig() and pool.passive == PassiveHealthConfig()
    assert pool.sticky is None and pool.retries == 2 and pool.slow_start_s == 0 and pool.hash_balance_factor == 0


@pytest.mark.parametrize(
    "key",
    ['"ip"', '"header:X-User"', '"query:room"', '"claim:sub"'],
)
def test_sticky_keys_without_cookie(tmp_path: Path, key: str) -> None:
    pool = load_config(str(write(tmp_path, f"sticky: {{key: {key}}}\nbackends:\n  - address: 127.0.0.1:9001\n"))).pools["chat"]
    assert pool.sticky is not None and pool.sticky.on_unavailable == "repick"


BACKENDS = "backends:\n  - address: 127.0.0.1:9001\n"


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ("hash_balance_factor: 80\n", '8:26: pools.chat.hash_balance_factor: must be 0 (no bound) or more than 100 (a percentage of the mean load), got 80'),
        ("sticky: {key: \"cookie\"}\n", '8:19: pools.chat.sticky.key: expected "cookie:NAME", "header:NAME", "query:NAME", "ip", "claim:NAME" or "identity", got "cookie"'),
        ("sticky: {key: \"identity:x\"}\n", '8:19: pools.chat.sticky.key: expected "cookie:NAME", "header:NAME", "query:NAME", "ip", "claim:NAME" or "identity", got "identity:x"'),
        ("sticky: {key: \"ip:x\"}\n", '8:19: pools.chat.sticky.key: expected "cookie:NAME", "header:NAME", "query:NAME", "ip", "claim:NAME" or "identity", got "ip:x"'),
        ("sticky: {key: \"cookie:s\"}\n", "8:19: pools.chat.sticky.key: a cookie key needs a cookie mapping with secret_file (the key that signs the cookie)"),
        ("sticky: {key: ip, cookie: {secret_file: cookie.key}}\n", '8:31: pools.chat.sticky.cookie: cookie settings only apply to a "cookie:NAME" key, not "ip"'),
        ("sticky: {key: \"cookie:a b\"}\n", "8:19: pools.chat.sticky.key: a cookie name is an HTTP token (letters, digits and !#$%&'*+-.^_`|~), got \"a b\""),
        ("sticky: {key: ip, on_unavailable: drop}\n", '8:39: pools.chat.sticky.on_unavailable: unknown on_unavailable "drop" (expected one of: repick, reject)'),
        ("health: {type: icmp}\n", '8:20: pools.chat.health.type: unknown health check type "icmp" (expected one of: tcp, http, websocket)'),
        ("health: {type: websocket, expect_status: [200]}\n", '8:46: pools.chat.health.expect_status: expect_status applies to http checks only, not "websocket"'),
        ("health: {type: http, expect_status: [99]}\n", "8:42: pools.chat.health.expect_status[0]: expected an integer in 100..599, got 99"),
        ("health: {path: healthz}\n", '8:20: pools.chat.health.path: expected a path starting with "/", got "healthz"'),
        ("health: {start_healthy: yes please}\n", '8:29: pools.chat.health.start_healthy: expected true or false, got "yes please"'),
        ("passive: {max_ejected_percent: 101}\n", "8:36: pools.chat.passive.max_ejected_percent: expected an integer in 0..100, got 101"),
        ("passive: {window: 10}\n", '8:23: pools.chat.passive.window: a duration needs a unit (ms, s, m, h or d), got "10"'),
    ],
)
def test_pool_errors(tmp_path: Path, pool: str, expected: str) -> None:
    assert errors(tmp_path, pool + BACKENDS) == [expected]


def test_cookie_secret_file_problems(tmp_path: Path) -> None:
    pool = "sticky: {key: \"cookie:s\", cookie: {secret_file: cookie.key}}\n" + BACKENDS
    missing = errors(tmp_path, pool, secret=None)
    assert len(missing) == 1 and "pools.chat.sticky.cookie.secret_file: cannot read" in missing[0]
    assert "No such file or directory" in missing[0]
    short = errors(tmp_path, pool, secret=b"short")
    assert len(short) == 1 and short[0].endswith("is 5 bytes; at least 16 are needed")


def test_max_connections_must_be_an_integer() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config(HEAD + "    backends:\n      - {address: 127.0.0.1:9001, max_connections: -1}\n", "t.yaml")
    assert [str(e) for e in info.value.errors] == [
        "t.yaml:9:52: pools.chat.backends[0].max_connections: expected an integer in 0..10000000, got -1"
    ]


def test_rebalance(tmp_path: Path) -> None:
    from wsproxy.config.schema import RebalanceConfig

    path = write(tmp_path, "rebalance: {max_skew: 1.5, rate: 2%/min, sticky: true}\n" + BACKENDS)
    assert load_config(str(path)).pools["chat"].rebalance == RebalanceConfig(max_skew=1.5, rate_per_s=0.02 / 60, sticky=True)  # type: ignore[index]
    path = write(tmp_path, "rebalance: {}\n" + BACKENDS)
    assert load_config(str(path)).pools["chat"].rebalance == RebalanceConfig()  # type: ignore[index]
    path = write(tmp_path, BACKENDS)
    assert load_config(str(path)).pools["chat"].rebalance is None  # type: ignore[index]


@pytest.mark.parametrize(
    "pool, expected",
    [
        ("rebalance: {max_skew: 1}\n", '8:27: pools.chat.rebalance.max_skew: expected a number above 1 (and at most 100), like 1.25, got 1'),
        ("rebalance: {max_skew: lots}\n", '8:27: pools.chat.rebalance.max_skew: expected a number above 1 (and at most 100), like 1.25, got "lots"'),
        ("rebalance: {rate: 1/min}\n", "8:23: pools.chat.rebalance.rate: expected a share of sessions per time like \"1%/min\", \"0.5%/s\" or \"10%/h\", got '1/min'"),
        ("rebalance: {rate: 0%/s}\n", "8:23: pools.chat.rebalance.rate: the share must be more than 0 % and at most 100 %, got '0%/s'"),
        ("rebalance: {skew: 2}\n", None),
    ],
)
def test_rebalance_errors(tmp_path: Path, pool: str, expected: str | None) -> None:
    found = errors(tmp_path, pool + BACKENDS)
    if expected is None:
        assert len(found) == 1 and "pools.chat.rebalance" in found[0] and "skew" in found[0]
    else:
        assert found == [expected]


def test_backend_names_are_optional_valid_and_unique_in_their_pool() -> None:
    from wsproxy.config.load import parse_config
    from wsproxy.errors import ConfigErrors

    head = 'listeners:\n  - name: main\n    bind: "127.0.0.1:0"\nroutes:\n  - pool: p\npools:\n  p:\n    backends:\n'
    config = parse_config(head + '      - {address: "127.0.0.1:9001", name: chat-1}\n      - {address: "127.0.0.1:9002"}\n', "t.yaml")
    assert [b.name for b in config.pools["p"].backends] == ["chat-1", None]  # type: ignore[index]
    bad = head + '      - {address: "127.0.0.1:9001", name: chat-1}\n      - {address: "127.0.0.1:9002", name: chat-1}\n'
    bad += '      - {address: "127.0.0.1:9003", name: "chat 3"}\n'
    try:
        parse_config(bad, "t.yaml")
    except ConfigErrors as exc:
        messages = [str(e) for e in exc.errors]
    else:
        raise AssertionError("accepted")
    assert any(m.startswith("t.yaml:10:43: pools.p.backends[1].name: duplicate backend name \"chat-1\" (first at line 9)") for m in messages), messages
    assert any("pools.p.backends[2].name: expected a backend name" in m for m in messages), messages
