"""DNS discovery, the decisions: DNS answers → a pool's backends, and what changed. No I/O here.

``control.discovery`` asks DNS (dnspython, on trio) and hands the records to
this module, which decides everything that can be decided without a socket:

- ``from_addresses``: A/AAAA records and the configured port → backends.
- ``from_srv``: SRV records (RFC 2782) and their targets' addresses →
  backends, each with the record's priority and a balancer weight derived
  from its weight (``srv_weights``).
- ``next_lookup_s``: when to look again: the answer's TTL, clamped within
  [``MIN_LOOKUP_S``, ``interval``], so a short TTL is honoured and a long one
  does not hide a change for longer than ``interval``.
- ``diff``: the backends that appeared, disappeared, or reappeared while a
  removal drain was still pending (the drain is then called off).
- ``with_discovered`` / ``discovered``: a pool's backends are its listed
  ones (``source="config"``) followed by the found ones (``source="dns"``);
  these build the derived ``PoolConfig`` the running generation gets.
- ``carry_discovered``: a reload keeps each pool's found backends when its
  DNS question (name, type, port, resolvers) did not change.
- ``best_priority``: at pick time, only the best (lowest) priority that has an
  available backend is used; the others are backups.

It does not look anything up, wait, log or touch the registry; the trio task
in ``control.discovery`` does, and applies the result through the reload's
pieces (selectors rebuilt, health checker updated, removal drains).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from ..config.schema import Address, BackendConfig, Config, DiscoveryConfig, PoolConfig

__all__ = [
    "BackendDiff",
    "MAX_WEIGHT",
    "MIN_LOOKUP_S",
    "SrvRecord",
    "best_priority",
    "carry_discovered",
    "diff",
    "discovered",
    "from_addresses",
    "from_srv",
    "next_lookup_s",
    "same_question",
    "srv_weights",
    "with_discovered",
]

#: The shortest time between two lookups of one pool, whatever the TTL says (TTL 0 included).
MIN_LOOKUP_S: Final = 1.0
#: The largest balancer weight (``pools.NAME.backends[].weight`` allows 1..1000).
MAX_WEIGHT: Final = 1000

SOURCE_DNS: Final = "dns"


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV record (RFC 2782): ``priority weight port target``."""

    priority: int  # lower is preferred
    weight: int  # relative share within a priority, 0..65535
    port: int
    target: str  # a host name, without the final dot; "" for RFC 2782's "." (no service)


def _ip(text: str) -> str:
    """An address as ``parse_address`` writes it (IPv6 compressed), so equal endpoints compare equal."""
    return str(ipaddress.ip_address(text))


def from_addresses(addresses: Iterable[str], port: int, *, tls: bool = False) -> tuple[BackendConfig, ...]:
    """A/AAAA answers → one backend per distinct address, sorted (the order does not depend on DNS's)."""
    unique = sorted({_ip(a) for a in addresses}, key=lambda a: ipaddress.ip_address(a).packed)
    return tuple(BackendConfig(address=Address(a, port), tls=tls, source=SOURCE_DNS) for a in unique)


def srv_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535) → balancer weights (1..1000), ratios kept as far as integers allow.

    RFC 2782 gives weight 0 "a very small chance" beside others; here it counts
    as the smallest balancer weight, 1. Weights up to 1000 are taken as they
    are; when one is larger, all are scaled so that the largest is 1000.
    """
    top = max(weights, default=0)
    if top <= MAX_WEIGHT:
        return [max(1, w) for w in weights]
    return [max(1, round(w * MAX_WEIGHT / top)) for w in weights]


def from_srv(
    records: Sequence[SrvRecord], addresses: Mapping[str, Sequence[str]], *, tls: bool = False
) -> tuple[BackendConfig, ...]:
    """SRV answers and each target's addresses → backends (an address of a target is a backend).

    A target without addresses is left out (the lookup decides whether that
    is a failure). RFC 2782: a lone record whose target is "." says the
    service is decidedly not available: no backend. An endpoint listed twice
    keeps its best priority and, within it, its largest weight.
    """
    if len(records) == 1 and records[0].target == "":
        return ()
    weights = srv_weights([r.weight for r in records])
    best: dict[Address, tuple[int, int]] = {}  # address → (priority, weight)
    for record, weight in zip(records, weights):
        for ip in addresses.get(record.target, ()):
            address = Address(_ip(ip), record.port)
            seen = best.get(address)
            if seen is None or (record.priority, -weight) < (seen[0], -seen[1]):
                best[address] = (record.priority, weight)
    ordered = sorted(best.items(), key=lambda item: (item[1][0], ipaddress.ip_address(item[0].host).packed, item[0].port))
    return tuple(
        BackendConfig(address=address, tls=tls, weight=weight, priority=priority, source=SOURCE_DNS)
        for address, (priority, weight) in ordered
    )


def next_lookup_s(ttl_s: float | None, interval_s: float) -> float:
    """Seconds until the next lookup: the TTL within [MIN_LOOKUP_S, interval]; ``interval`` without a TTL."""
    if ttl_s is None:
        return interval_s
    floor = min(MIN_LOOKUP_S, interval_s)
    return min(interval_s, max(floor, ttl_s))


@dataclass(frozen=True, slots=True)
class BackendDiff:
    """What one lookup changed in a pool's found backends (addresses, in the new answer's order)."""

    appeared: tuple[Address, ...]  # new in the pool; ``reappeared`` is a part of them
    disappeared: tuple[Address, ...]  # gone from the answer: drained like a reload removal
    reappeared: tuple[Address, ...]  # back while a removal drain was pending: the drain is called off
    changed: tuple[Address, ...]  # still there with another weight or priority

    def __bool__(self) -> bool:
        return bool(self.appeared or self.disappeared or self.changed)


def diff(
    current: Sequence[BackendConfig], found: Sequence[BackendConfig], draining: Collection[Address] = ()
) -> BackendDiff:
    """Compare the found backends with the ``current`` ones; ``draining``: addresses with a pending removal drain."""
    before = {b.address: b for b in current}
    after = {b.address: b for b in found}
    appeared = tuple(a for a in after if a not in before)
    return BackendDiff(
        appeared=appeared,
        disappeared=tuple(a for a in before if a not in after),
        reappeared=tuple(a for a in appeared if a in draining),
        changed=tuple(
            a for a, b in after.items()
            if a in before and (before[a].weight, before[a].priority) != (b.weight, b.priority)
        ),
    )


def discovered(pool: PoolConfig) -> tuple[BackendConfig, ...]:
    """The backends of ``pool`` that DNS found."""
    return tuple(b for b in pool.backends if b.source == SOURCE_DNS)


def with_discovered(pool: PoolConfig, found: Sequence[BackendConfig]) -> PoolConfig:
    """``pool`` with ``found`` as its DNS backends, after its listed ones.

    A found address that the list has already is left out (the listed one,
    with its weight and limits, wins). In a pool with a ``tls`` mapping every
    found backend speaks TLS, as every listed one does.
    """
    listed = tuple(b for b in pool.backends if b.source != SOURCE_DNS)
    taken = {b.address for b in listed}
    tls = pool.tls is not None
    extra = tuple(
        b if b.tls == tls else dataclasses.replace(b, tls=tls) for b in found if b.address not in taken
    )
    return dataclasses.replace(pool, backends=listed + extra)


def same_question(a: DiscoveryConfig | None, b: DiscoveryConfig | None) -> bool:
    """Whether two discovery settings ask DNS the same question (what was found stays true)."""
    if a is None or b is None:
        return False
    return (a.dns.rstrip(".").lower(), a.type, a.port, a.resolvers) == (b.dns.rstrip(".").lower(), b.type, b.port, b.resolvers)


def carry_discovered(old: Config, new: Config) -> Config:
    """``new`` (just loaded) with the found backends of ``old`` for every pool whose DNS question is the same."""
    pools = dict(new.pools)
    carried = False
    for name, pool in new.pools.items():
        before = old.pools.get(name)
        if before is not None and same_question(before.discovery, pool.discovery):
            found = discovered(before)
            if found:
                pools[name] = with_discovered(pool, found)
                carried = True
    return dataclasses.replace(new, pools=pools) if carried else new


class _HasBackend(Protocol):  # the part of ``policy.Candidate`` that best_priority reads
    @property
    def backend(self) -> BackendConfig: ...


_C = TypeVar("_C", bound=_HasBackend)


def best_priority(available: Sequence[_C]) -> list[_C]:
    """The available candidates of the best (lowest) priority among them: the others are backups.

    Listed backends have priority 0; found ones the priority of their SRV
    record (A/AAAA: 0).
    """
    if not available:
        return []
    top = min(c.backend.priority for c in available)
    return [c for c in available if c.backend.priority == top]
