"""The ``pools`` section: backends, balancing, stickiness and health. No I/O but one:
the sticky cookie's ``secret_file`` is read here, at load time, so that a
missing or empty secret is a config error with its position, like any other.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from yaml.nodes import Node, ScalarNode

from wsproxy.config import gate
from wsproxy.config.durations import parse_fraction_rate, quote
from wsproxy.config.reader import At, Reader, given
from wsproxy.config.schema import (
    BALANCE_ALGORITHMS,
    DISCOVERY_TYPES,
    HEALTH_CHECK_TYPES,
    STICKY_SOURCES,
    Address,
    BackendConfig,
    DiscoveryConfig,
    DrainConfig,
    HealthConfig,
    PassiveHealthConfig,
    PoolConfig,
    PoolName,
    RebalanceConfig,
    StickyConfig,
    StickyCookieConfig,
)

#: RFC 7230 §3.2.6 token: what a cookie or header name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

#: The smallest secret accepted for signing sticky cookies.
MIN_SECRET_BYTES = 16

#: The shortest ``discovery.interval``: a lookup per second per pool at most.
MIN_DISCOVERY_INTERVAL_S = 1.0

#: A DNS name: labels of letters, digits, "-" and "_" (SRV's "_ws._tcp"), dot-separated, an optional final dot.
_DNS_NAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


def pools(r: Reader, at: At | None) -> tuple[dict[PoolName, PoolConfig], set[str] | None]:
    """The pools that are valid, and the names of all pools (``None`` if there is no
    mapping of pools at all, so that routes are not also reported as dangling)."""
    entries = r.entries(at, "a mapping of pool names to pools")
    if at is None or entries is None:
        return {}, None
    if not entries:
        r.error(at, "at least one pool is required")
    result = {}
    for name_at, pool_at in entries.values():
        name = r.name(name_at, "a pool name")
        fields = r.fields(
            pool_at,
            optional=(
                "backends", "discovery", "balance", "hash_balance_factor", "retries", "slow_start", "sticky", "health",
                "passive", "tls", "drain", "rebalance",
            ),
            what="a pool (balance, backends, ...)",
        )
        if fields is None:
            continue
        if "backends" not in fields and "discovery" not in fields:
            r.error(pool_at, 'a pool needs "backends", "discovery" (backends from DNS) or both')
        balance = r.choice(fields.get("balance"), BALANCE_ALGORITHMS, "balance algorithm")
        discovery = _discovery(r, fields.get("discovery"))
        backends = _backends(r, fields.get("backends"), empty_ok="discovery" in fields)
        factor = _balance_factor(r, fields.get("hash_balance_factor"))
        retries = r.integer(fields.get("retries"), 0, 10)
        slow_start = r.duration(fields.get("slow_start"))
        sticky = _sticky(r, fields.get("sticky"))
        health = _health(r, fields.get("health"))
        passive = _passive(r, fields.get("passive"))
        tls = gate.backend_tls(r, fields.get("tls"))
        drain = _drain(r, fields.get("drain"))
        rebalance = _rebalance(r, fields.get("rebalance"))
        if tls is not None:  # a pool-level tls mapping: every backend speaks TLS
            backends = tuple(dataclasses.replace(b, tls=True) for b in backends)
        if name is not None:
            pool = PoolConfig(
                name=PoolName(name),
                backends=backends,
                sticky=sticky,
                health=health,
                passive=passive,
                tls=tls,
                discovery=discovery,
                rebalance=rebalance,
                **given(
                    drain=drain,
                    balance=balance,
                    hash_balance_factor=factor,
                    retries=retries,
                    slow_start_s=slow_start,
                ),
            )
            result[pool.name] = pool
    return result, set(entries)


def _backends(r: Reader, at: At | None, *, empty_ok: bool = False) -> tuple[BackendConfig, ...]:
    items = r.items(at, "backends")
    if at is None or items is None:
        return ()
    if not items and not empty_ok:
        r.error(at, "a pool needs at least one backend")
    addresses: dict[Address, Node] = {}
    names: dict[str, Node] = {}
    backends = []
    for item in items:
        fields = r.fields(
            item,
            required=("address",),
            optional=("weight", "max_connections", "name"),
            what="a backend (address, weight, max_connections, name)",
        )
        if fields is None:
            continue
        address_at = fields.get("address")
        tls = False
        text = address_at.node.value if address_at is not None and isinstance(address_at.node, ScalarNode) else None
        if address_at is not None and text is not None and "://" in text:
            scheme, _, rest = text.partition("://")
            if scheme not in ("ws", "wss"):
                r.error(address_at, f'expected "host:port", "ws://host:port" or "wss://host:port", got {quote(text)}')
                continue
            tls = scheme == "wss"
            address_at = At(ScalarNode("tag:yaml.org,2002:str", rest, address_at.node.start_mark, address_at.node.end_mark), address_at.path)
        address = r.address(address_at, allow_port_zero=False)
        weight = r.integer(fields.get("weight"), 1, 1000)
        max_connections = r.integer(fields.get("max_connections"), 0, 10_000_000)
        name = r.name(fields.get("name"), "a backend name")
        if name is not None:
            r.unique(names, name, fields["name"], "backend name")
        if address is not None:
            r.unique(addresses, address, fields["address"], "backend address")
            backends.append(
                BackendConfig(
                    address=address, tls=tls, **given(weight=weight, max_connections=max_connections, name=name)
                )
            )
    return tuple(backends)


def _discovery(r: Reader, at: At | None) -> DiscoveryConfig | None:
    """``discovery: {dns, type, port, interval, resolvers, on_error}``: backends from DNS."""
    fields = r.fields(
        at,
        required=("dns", "type"),
        optional=("port", "interval", "resolvers", "on_error"),
        what="a discovery mapping (dns, type, port, interval, resolvers, on_error)",
    )
    if fields is None:
        return None
    name = r.text(fields.get("dns"), "a DNS name")
    if name is not None and not _DNS_NAME.fullmatch(name):
        r.error(fields["dns"], f'expected a DNS name like "chat.default.svc.cluster.local", got {quote(name)}')
        name = None
    kind = r.choice(fields.get("type"), DISCOVERY_TYPES, "record type")
    port = r.integer(fields.get("port"), 1, 65535)
    if kind in ("A", "AAAA") and "port" not in fields:
        r.error(fields["type"], f'type {kind} needs "port" beside it (the backends\' port: {kind} records carry none)')
    elif kind == "SRV" and "port" in fields:
        r.error(fields["port"], "port applies to A and AAAA lookups only (SRV records carry the port)")
        port = None
    interval = r.duration(fields.get("interval"))
    if interval is not None and interval < MIN_DISCOVERY_INTERVAL_S:
        r.error(fields["interval"], f"must be at least {MIN_DISCOVERY_INTERVAL_S:g}s, got {interval:g}s")
        interval = None
    resolvers = _resolvers(r, fields.get("resolvers"))
    on_error = r.choice(fields.get("on_error"), ("keep", "empty"), "on_error")
    if name is None or kind is None or (kind != "SRV" and port is None):
        return None
    return DiscoveryConfig(
        dns=name,
        type=kind,
        **given(port=port, interval_s=interval, resolvers=resolvers, on_error=on_error),
    )


def _resolvers(r: Reader, at: At | None) -> tuple[Address, ...] | None:
    """DNS servers as ``"ip:port"`` (``"[v6]:port"``): a name would need a resolver to find the resolver."""
    items = r.items(at, '"ip:port" strings')
    if at is None or items is None:
        return None
    if not items:
        r.error(at, "expected at least one resolver; leave resolvers out to use the system's")
        return None
    seen: dict[Address, Node] = {}
    result = []
    for item in items:
        address = r.address(item, allow_port_zero=False)
        if address is None:
            continue
        try:
            ipaddress.ip_address(address.host)
        except ValueError:
            r.error(item, f'a resolver is an IP address and a port ("127.0.0.1:53", "[::1]:53"), got {quote(str(address))}')
            continue
        r.unique(seen, address, item, "resolver")
        result.append(address)
    return tuple(result)


def _balance_factor(r: Reader, at: At | None) -> int | None:
    """A percentage above 100 (125 = no backend above 1.25 x the mean), or 0 for no bound."""
    factor = r.integer(at, 0, 10_000)
    if at is not None and factor is not None and 0 < factor <= 100:
        r.error(at, f"must be 0 (no bound) or more than 100 (a percentage of the mean load), got {factor}")
        return None
    return factor


def _sticky(r: Reader, at: At | None) -> StickyConfig | None:
    fields = r.fields(at, required=("key",), optional=("cookie", "on_unavailable"), what="a sticky mapping (key, cookie, on_unavailable)")
    if fields is None:
        return None
    key = r.text(fields.get("key"), '"cookie:NAME", "header:NAME", "query:NAME", "ip", "claim:NAME" or "identity"')
    on_unavailable = r.choice(fields.get("on_unavailable"), ("repick", "reject"), "on_unavailable")
    cookie = _cookie(r, fields.get("cookie"))
    if key is None:
        return None
    source, _, name = key.partition(":")
    key_at = fields["key"]
    bare = source in ("ip", "identity")  # the sources without a name
    if source not in STICKY_SOURCES or bare != (name == "") or (not bare and not name.strip()):
        r.error(key_at, f'expected "cookie:NAME", "header:NAME", "query:NAME", "ip", "claim:NAME" or "identity", got {quote(key)}')
        return None
    if source in ("cookie", "header") and not _TOKEN.fullmatch(name):
        r.error(key_at, f"a {source} name is an HTTP token (letters, digits and !#$%&'*+-.^_`|~), got {quote(name)}")
        return None
    if source == "cookie" and cookie is None and "cookie" not in fields:
        r.error(key_at, "a cookie key needs a cookie mapping with secret_file (the key that signs the cookie)")
        return None
    if source != "cookie" and "cookie" in fields:
        r.error(fields["cookie"], f'cookie settings only apply to a "cookie:NAME" key, not {quote(key)}')
        return None
    return StickyConfig(source=source, name=name, cookie=cookie, **given(on_unavailable=on_unavailable))


def _cookie(r: Reader, at: At | None) -> StickyCookieConfig | None:
    fields = r.fields(at, required=("secret_file",), optional=("max_age", "same_site"), what="a cookie mapping (secret_file, max_age, same_site)")
    if fields is None:
        return None
    max_age = r.duration(fields.get("max_age"))
    same_site = r.choice(fields.get("same_site"), ("Strict", "Lax", "None"), "same_site")
    read = r.read(fields.get("secret_file"))
    if read is None:
        return None
    path, secret = read[0], read[1].strip()
    if len(secret) < MIN_SECRET_BYTES:
        r.error(fields["secret_file"], f"the secret in {path} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
        return None
    return StickyCookieConfig(
        secret=secret, secret_file=path, **given(max_age_s=max_age, same_site=same_site)
    )


def _health(r: Reader, at: At | None) -> HealthConfig | None:
    fields = r.fields(
        at,
        optional=("type", "path", "interval", "timeout", "rise", "fall", "expect_status", "start_healthy"),
        what="a health mapping (type, path, interval, timeout, rise, fall, expect_status, start_healthy)",
        null_is_empty=True,
    )
    if fields is None:
        return None
    path = r.text(fields.get("path"), 'a path starting with "/"')
    if path is not None and not path.startswith("/"):
        r.error(fields["path"], f'expected a path starting with "/", got {quote(path)}')
        path = None
    health = HealthConfig(
        **given(
            type=r.choice(fields.get("type"), HEALTH_CHECK_TYPES, "health check type"),
            path=path,
            interval_s=r.duration(fields.get("interval")),
            timeout_s=r.duration(fields.get("timeout")),
            rise=r.integer(fields.get("rise"), 1, 100),
            fall=r.integer(fields.get("fall"), 1, 100),
            expect_status=r.integers(fields.get("expect_status"), 100, 599),
            start_healthy=r.boolean(fields.get("start_healthy")),
        )
    )
    if "expect_status" in fields and health.type != "http":
        r.error(fields["expect_status"], f'expect_status applies to http checks only, not {quote(health.type)}')
    return health


def _drain(r: Reader, at: At | None) -> DrainConfig | None:
    fields = r.fields(
        at,
        optional=("timeout", "spread", "close_timeout", "on_unhealthy"),
        what="a drain mapping (timeout, spread, close_timeout, on_unhealthy)",
        null_is_empty=True,
    )
    if fields is None:
        return None
    return DrainConfig(
        **given(
            timeout_s=r.duration_or_zero(fields.get("timeout")),
            spread_s=r.duration_or_zero(fields.get("spread")),
            close_timeout_s=r.duration(fields.get("close_timeout")),
            on_unhealthy=r.boolean(fields.get("on_unhealthy")),
        )
    )


def _passive(r: Reader, at: At | None) -> PassiveHealthConfig | None:
    fields = r.fields(
        at,
        optional=("failures", "window", "ejection", "max_ejected_percent"),
        what="a passive mapping (failures, window, ejection, max_ejected_percent)",
        null_is_empty=True,
    )
    if fields is None:
        return None
    return PassiveHealthConfig(
        **given(
            failures=r.integer(fields.get("failures"), 1, 1000),
            window_s=r.duration(fields.get("window")),
            ejection_s=r.duration(fields.get("ejection")),
            max_ejected_percent=r.integer(fields.get("max_ejected_percent"), 0, 100),
        )
    )


def _rebalance(r: Reader, at: At | None) -> RebalanceConfig | None:
    """``rebalance: {max_skew: 1.25, rate: 1%/min, sticky: false}`` (balance.rebalance)."""
    fields = r.fields(
        at, optional=("max_skew", "rate", "sticky"), what='a rebalance mapping (max_skew, rate: "1%/min", sticky)',
        null_is_empty=True,
    )
    if fields is None:
        return None
    skew = r.number(fields.get("max_skew"), 1, 100, "a number above 1 (and at most 100), like 1.25")
    rate_at = fields.get("rate")
    rate = None
    rate_text = r.text(rate_at, 'a share of sessions per time, like "1%/min"')
    if rate_at is not None and rate_text is not None:
        try:
            rate = parse_fraction_rate(rate_text)
        except ValueError as exc:
            r.error(rate_at, str(exc))
    sticky = r.boolean(fields.get("sticky"))
    return RebalanceConfig(**given(max_skew=skew, rate_per_s=rate, sticky=sticky))
