"""``pools.NAME.discovery``: what the loader accepts, and every error at its position (pure, no sockets)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsproxy.config.load import load_config
from wsproxy.config.schema import Address, DiscoveryConfig, PoolName
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


def write(tmp_path: Path, pool: str) -> Path:
    path = tmp_path / "w.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(pool), "    "))
    return path


def errors(tmp_path: Path, pool: str) -> list[str]:
    path = write(tmp_path, pool)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    return [str(e).removeprefix(str(path) + ":") for e in info.value.errors]


def test_the_pinned_srv_shape_with_no_backends_list(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        discovery: {dns: "_ws._tcp.chat.example", type: SRV, interval: 5s, resolvers: ["127.0.0.1:5353"], on_error: keep}
        """)
    pool = load_config(str(path)).pools[PoolName("chat")]
    assert pool.backends == ()
    assert pool.discovery == DiscoveryConfig(
        dns="_ws._tcp.chat.example", type="SRV", interval_s=5.0, resolvers=(Address("127.0.0.1", 5353),), on_error="keep"
    )


def test_a_records_with_a_port_beside_listed_backends_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        discovery:
          dns: chat.default.svc.cluster.local
          type: AAAA
          port: 9000
          resolvers: ["[::1]:53"]
        backends: []
        """)
    pool = load_config(str(path)).pools[PoolName("chat")]
    assert pool.discovery == DiscoveryConfig(
        dns="chat.default.svc.cluster.local", type="AAAA", port=9000, resolvers=(Address("::1", 53),)
    )
    assert pool.discovery.interval_s == 5.0 and pool.discovery.on_error == "keep"
    both = write(tmp_path, """\
        discovery: {dns: chat.service.consul, type: A, port: 9000}
        backends: [{address: "127.0.0.1:9001"}]
        """)
    pool = load_config(str(both)).pools[PoolName("chat")]
    assert [str(b.address) for b in pool.backends] == ["127.0.0.1:9001"] and pool.discovery is not None
    assert pool.discovery.resolvers == ()  # the system's


def test_every_discovery_error_is_located(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        discovery:
          dns: "chat example"
          type: MX
          interval: 500ms
          resolvers: ["dns.example:53", "127.0.0.1", "127.0.0.1:53", "127.0.0.1:53"]
          on_error: retry
          ttl: 5s
        """)
    assert found == [
        '9:12: pools.chat.discovery.dns: expected a DNS name like "chat.default.svc.cluster.local", got "chat example"',
        "10:13: pools.chat.discovery.type: unknown record type \"MX\" (expected one of: A, AAAA, SRV)",
        "11:17: pools.chat.discovery.interval: must be at least 1s, got 0.5s",
        '12:19: pools.chat.discovery.resolvers[0]: a resolver is an IP address and a port ("127.0.0.1:53", "[::1]:53"), got "dns.example:53"',
        '12:37: pools.chat.discovery.resolvers[1]: expected "host:port", got "127.0.0.1"',
        '12:66: pools.chat.discovery.resolvers[3]: duplicate resolver "127.0.0.1:53" (first at line 12)',
        '13:17: pools.chat.discovery.on_error: unknown on_error "retry" (expected one of: keep, empty)',
        '14:7: pools.chat.discovery: unknown key "ttl" (expected one of: dns, type, port, interval, resolvers, on_error)',
    ]


def test_port_goes_with_a_and_aaaa_only_and_a_pool_needs_something(tmp_path: Path) -> None:
    assert errors(tmp_path, "discovery: {dns: chat.example, type: A}\n") == [
        "8:42: pools.chat.discovery.type: type A needs \"port\" beside it (the backends' port: A records carry none)"
    ]
    assert errors(tmp_path, "discovery: {dns: _ws._tcp.chat.example, type: SRV, port: 9000}\n") == [
        "8:62: pools.chat.discovery.port: port applies to A and AAAA lookups only (SRV records carry the port)"
    ]
    assert errors(tmp_path, "discovery: {type: SRV, resolvers: []}\n") == [
        '8:16: pools.chat.discovery: missing required key "dns"',
        "8:39: pools.chat.discovery.resolvers: expected at least one resolver; leave resolvers out to use the system's",
    ]
    assert errors(tmp_path, "retries: 1\n") == [
        '8:5: pools.chat: a pool needs "backends", "discovery" (backends from DNS) or both'
    ]
    assert errors(tmp_path, "backends: []\n") == ["8:15: pools.chat.backends: a pool needs at least one backend"]
