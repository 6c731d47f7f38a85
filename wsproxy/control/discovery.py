"""DNS discovery: one trio task per pool with ``discovery``, looking up its backends.

::

    Discovery (in the App's control nursery)
    ├── _run(pool chat)   lookup → apply what changed → sleep TTL within [1s, interval] → lookup …
    └── _run(pool feed)   …

The lookups are dnspython's async resolver on its trio backend: UDP, and TCP
when an answer comes back truncated (dnspython retries over TCP by itself),
against ``resolvers`` or, without them, the system's (``/etc/resolv.conf``,
its search list and ``ndots`` included). ``DnsLookup`` turns the answers into
records and ``balance.discovery`` turns the records into backends (SRV
priority and weight, TTL clamp, the diff); this module only asks, waits,
logs, counts, and hands the new pool to the App.

What counts as what
-------------------
- An answer, even an empty one, is the truth: NXDOMAIN, a name without
  records of the type, or a lone SRV record with target "." (RFC 2782: no
  service) empties the found set. The backends that leave drain exactly as if
  a reload had removed them (``Drainer.drain_removed``: ``drain.timeout``,
  then 1012 spread over ``drain.spread``), so a name that is empty for a
  moment (a rollout) costs nothing if it comes back within the drain timeout:
  a reappearing backend calls its drain off.
- A failed lookup (timeout, SERVFAIL, REFUSED, no resolver configured, or an
  SRV target whose addresses could not be looked up) keeps the last found set
  (``on_error: keep``) or empties it (``empty``), is logged as
  ``event=discovery_failed`` and counted in
  ``wsproxy_discovery_failures_total{pool}``; the next try comes after
  ``interval``.

Applying a change is the App's (``App.swap_pool``): the derived
``PoolConfig`` replaces the pool in the running generation, its selector is
rebuilt, its health checker updated (a new backend is checked at once and,
once UP, ramps up with ``slow_start``), and the removed backends drain.

This module is not the balancer (``balance``), nor the drain
(``control.drain``), nor the loader (``config.pools``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..balance.discovery import (
    SrvRecord,
    diff,
    discovered,
    from_addresses,
    from_srv,
    next_lookup_s,
    with_discovered,
)
from ..config.schema import Address, BackendConfig, DiscoveryConfig, PoolConfig, PoolName, hostport
from ..errors import WsproxyError
from ..log import log_event

log = logging.getLogger("wsproxy.control.discovery")

#: One lookup (every server and retry, SRV targets included) gets at most this long (or ``interval``)...
LOOKUP_TIMEOUT_S = 5.0
#: ...and one query to one server at most this long.
QUERY_TIMEOUT_S = 2.0
#: Where the system's resolver is configured (nameservers, search list, ndots).
RESOLV_CONF = "/etc/resolv.conf"
#: How long ``start`` waits for the first lookups before the listeners open anyway.
FIRST_LOOKUP_WAIT_S = LOOKUP_TIMEOUT_S + 1.0


class LookupFailed(WsproxyError):
    """A lookup that gave no answer; ``reason`` is short and says what was seen."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _server(server: object) -> str:
    """dnspython's "Do53:127.0.0.1@5353" as "127.0.0.1:5353" (the form of ``discovery.resolvers``)."""
    text = str(server).removeprefix("Do53:")
    host, at, port = text.rpartition("@")
    return hostport(host, int(port)) if at and port.isdigit() else text


def _why(exc: BaseException) -> str:
    """A short reason for a dnspython error (its own messages run to several lines)."""
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return f"timed out after {exc.kwargs.get('timeout', 0):.1f}s"
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        seen = []
        for server, _tcp, _port, error, *rest in exc.kwargs.get("errors", []):
            response = rest[0] if rest else None
            code = dns.rcode.to_text(response.rcode()) if response is not None else type(error).__name__
            seen.append(f"{_server(server)} {code}")
        return "no server answered: " + (", ".join(dict.fromkeys(seen)) or "none configured")
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return f"no resolver configured ({RESOLV_CONF} has no nameserver; set discovery.resolvers)"
    if isinstance(exc, OSError):
        return f"socket error: {exc.strerror or exc}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


class DnsLookup:
    """The DNS question of one pool's ``discovery``; the backends it returns are plain
    (``with_discovered`` gives them the pool's TLS)."""

    def __init__(self, settings: DiscoveryConfig) -> None:
        self.settings = settings
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        settings = self.settings
        if settings.resolvers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port) for a in settings.resolvers]
        else:
            resolver = dns.asyncresolver.Resolver(RESOLV_CONF)  # raises NoResolverConfiguration without nameservers
        resolver.lifetime = min(LOOKUP_TIMEOUT_S, settings.interval_s)
        resolver.timeout = min(QUERY_TIMEOUT_S, resolver.lifetime)
        resolver.cache = None  # TTLs are honoured by when we ask, not by a cache in between
        return resolver

    async def lookup(self) -> tuple[tuple[BackendConfig, ...], float | None]:
        """(backends found, the smallest TTL among the answers used or None); raises ``LookupFailed``.

        The system's configuration is read again for every lookup (a changed
        ``/etc/resolv.conf`` applies at the next one); explicit resolvers are
        set up once.
        """
        budget_s = min(LOOKUP_TIMEOUT_S, self.settings.interval_s)
        try:
            if self._resolver is None or not self.settings.resolvers:
                self._resolver = self._make_resolver()
            with trio.move_on_after(budget_s):
                if self.settings.type == "SRV":
                    return await self._srv(self._resolver)
                addresses, ttl = await self._addresses(self._resolver, self.settings.dns, self.settings.type, self._search)
                return from_addresses(addresses, self.settings.port), ttl
        except (dns.exception.DNSException, OSError) as exc:
            raise LookupFailed(_why(exc)) from None
        raise LookupFailed(f"timed out after {budget_s:g}s")

    @property
    def _search(self) -> bool:
        """The system's search list applies to the system's resolver only (explicit resolvers: names are absolute)."""
        return not self.settings.resolvers

    @staticmethod
    async def _addresses(
        resolver: dns.asyncresolver.Resolver, name: str, kind: str, search: bool = False
    ) -> tuple[list[str], float | None]:
        """The addresses of ``name`` (A or AAAA); none, with no TTL, for NXDOMAIN or no records of that type."""
        try:
            answer = await resolver.resolve(name, kind, search=search)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        rrset = answer.rrset
        if rrset is None:
            return [], None
        return [rdata.to_text() for rdata in rrset], float(rrset.ttl)

    async def _srv(self, resolver: dns.asyncresolver.Resolver) -> tuple[tuple[BackendConfig, ...], float | None]:
        try:
            answer = await resolver.resolve(self.settings.dns, "SRV", search=self._search)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return (), None
        rrset = answer.rrset
        if rrset is None:
            return (), None
        ttls = [float(rrset.ttl)]
        records = [
            SrvRecord(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True) if r.target != dns.name.root else "")
            for r in rrset
        ]
        # Targets' addresses: from the additional section when the server sent them (Consul
        # and CoreDNS do), else asked for, A then AAAA.
        extra: dict[str, list[str]] = {}
        for extra_rrset in answer.response.additional:
            if extra_rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                name = extra_rrset.name.to_text(omit_final_dot=True)
                extra.setdefault(name, []).extend(rdata.to_text() for rdata in extra_rrset)
                ttls.append(float(extra_rrset.ttl))
        addresses: dict[str, list[str]] = {}
        for target in dict.fromkeys(r.target for r in records if r.target):
            if target in extra:
                addresses[target] = extra[target]
                continue
            found, ttl = await self._addresses(resolver, target + ".", "A")
            if not found:
                found, ttl = await self._addresses(resolver, target + ".", "AAAA")
            addresses[target] = found
            if ttl is not None:
                ttls.append(ttl)
        return from_srv(records, addresses), min(ttls)


@dataclass(slots=True)
class PoolDiscovery:
    """What /status shows of one pool's discovery."""

    settings: DiscoveryConfig
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    lookups: int = 0
    failures: int = 0  # failed lookups (wsproxy_discovery_failures_total)
    last_error: str | None = None  # why the last lookup failed; None after a good one
    last_lookup_unix: float | None = None
    next_lookup_s: float | None = None  # the delay chosen after the last lookup
    first_done: trio.Event = field(default_factory=trio.Event)


class Discovery:
    """The discovery tasks of one App.

    ``current`` gives the running generation's pool of a name; ``swap`` puts a
    derived pool in its place (``App.swap_pool``); ``removing`` gives the
    addresses of a pool whose removal drain is pending (for the log's
    ``reappeared``). Failures are counted per pool and survive a reload that
    keeps the pool (the counter is monotonic for Prometheus).
    """

    def __init__(
        self,
        current: Callable[[PoolName], PoolConfig | None],
        swap: Callable[[PoolConfig], None],
        removing: Callable[[PoolName], Iterable[Address]] = lambda pool: (),
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.current = current
        self.swap = swap
        self.removing = removing
        self.clock = clock or time.time
        self.pools: dict[PoolName, PoolDiscovery] = {}
        self.failures_total: dict[PoolName, int] = {}
        self._nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery, pools: Mapping[PoolName, PoolConfig]) -> None:
        """Start a task per discovering pool and wait (at most FIRST_LOOKUP_WAIT_S) for their first lookups."""
        self._nursery = nursery
        self.update(pools)
        with trio.move_on_after(FIRST_LOOKUP_WAIT_S):
            for state in list(self.pools.values()):
                await state.first_done.wait()

    def update(self, pools: Mapping[PoolName, PoolConfig]) -> None:
        """After a reload: stop what is gone, restart what changed (an immediate lookup), keep the rest."""
        for name in [n for n, s in self.pools.items() if (p := pools.get(n)) is None or p.discovery != s.settings]:
            self.pools.pop(name).scope.cancel()
        if self._nursery is None:
            return
        for name, pool in pools.items():
            if pool.discovery is not None and name not in self.pools:
                state = self.pools[name] = PoolDiscovery(pool.discovery)
                self._nursery.start_soon(self._run, name, state)

    def stop(self) -> None:
        for state in self.pools.values():
            state.scope.cancel()
        self.pools.clear()

    async def _run(self, name: PoolName, state: PoolDiscovery) -> None:
        settings = state.settings
        lookup = DnsLookup(settings)
        with state.scope:
            while True:
                state.lookups += 1
                state.last_lookup_unix = self.clock()
                try:
                    found, ttl_s = await lookup.lookup()
                except LookupFailed as exc:
                    self._failed(name, state, exc.reason)
                    delay_s = settings.interval_s
                else:
                    state.last_error = None
                    self._apply(name, found, ttl_s)
                    delay_s = next_lookup_s(ttl_s, settings.interval_s)
                state.next_lookup_s = delay_s
                state.first_done.set()
                await trio.sleep(delay_s)

    def _failed(self, name: PoolName, state: PoolDiscovery, reason: str) -> None:
        settings = state.settings
        state.failures += 1
        state.last_error = reason
        self.failures_total[name] = self.failures_total.get(name, 0) + 1
        pool = self.current(name)
        kept = len(discovered(pool)) if pool is not None else 0
        log_event(
            log,
            logging.WARNING,
            "discovery_failed",
            pool=name,
            dns=settings.dns,
            type=settings.type,
            reason=reason,
            action="kept_last_set" if settings.on_error == "keep" else "emptied",
            backends=kept if settings.on_error == "keep" else 0,
        )
        if settings.on_error == "empty":
            self._apply(name, (), None)

    def _apply(self, name: PoolName, found: Sequence[BackendConfig], ttl_s: float | None) -> None:
        pool = self.current(name)
        if pool is None or pool.discovery is None:
            return
        new = with_discovered(pool, found)
        change = diff(discovered(pool), discovered(new), set(self.removing(name)))
        if not change:
            return
        self.swap(new)
        log_event(
            log,
            logging.INFO,
            "discovered",
            pool=name,
            dns=pool.discovery.dns,
            backends=len(discovered(new)),
            appeared=",".join(map(str, change.appeared)) or "-",
            disappeared=",".join(map(str, change.disappeared)) or "-",
            reappeared=",".join(map(str, change.reappeared)) or "-",
            changed=",".join(map(str, change.changed)) or "-",
            ttl_s="-" if ttl_s is None else f"{ttl_s:g}",
        )

    def status(self, name: PoolName) -> dict[str, object] | None:
        """The ``discovery`` object of a pool in ``/status``."""
        state = self.pools.get(name)
        if state is None:
            return None
        settings = state.settings
        return {
            "dns": settings.dns,
            "type": settings.type,
            "lookups": state.lookups,
            "failures": self.failures_total.get(name, 0),
            "last_error": state.last_error,
            "last_lookup_unix": state.last_lookup_unix,
            "next_lookup_s": state.next_lookup_s,
        }


class DiscoveryCollector(Collector):
    """``wsproxy_discovery_failures_total{pool}`` and ``wsproxy_discovered_backends{pool}``, read at scrape time."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def describe(self) -> Iterable[CounterMetricFamily]:
        return ()

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        discovery = self.discovery
        failures = CounterMetricFamily(
            "wsproxy_discovery_failures", "DNS discovery lookups that failed (the set was kept or emptied per on_error).",
            labels=["pool"],
        )
        found = GaugeMetricFamily(
            "wsproxy_discovered_backends", "Backends a pool has from DNS discovery now.", labels=["pool"]
        )
        for name in sorted(discovery.pools):  # pools that discover now (a reload may remove one)
            failures.add_metric([name], discovery.failures_total.get(name, 0))
        for name in sorted(discovery.pools):
            pool = discovery.current(name)
            found.add_metric([name], len(discovered(pool)) if pool is not None else 0)
        yield failures
        yield found


__all__ = ["Discovery", "DiscoveryCollector", "DnsLookup", "LookupFailed"]
