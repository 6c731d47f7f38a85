"""The balancing decision for one new session: which backends to try, in which order. No I/O here.

``plan_session`` reads a snapshot of the registry and the request's sticky
inputs and returns a verdict that already holds the reaction, in the style of
the ``proto`` stages:

- ``Plan``: the backends to dial in order (the choice first, then at most
  ``retries`` failover candidates), the ``Set-Cookie`` value to add to the
  101 when a pin cookie must be (re)issued, and a word for the log line;
- ``NoBackend``: the 503 to answer, with its log reason, body and
  ``Retry-After``.

It does not dial, wait, count sessions or change the registry: the session
code does that, and calls ``cookie_for`` when it fails over to a backend other
than the first, so that the client's pin follows the backend it really got.

Theory of operation
-------------------
1. Every backend of the pool becomes a ``Candidate`` with its effective weight
   (config weight x the pool's slow-start factor); those that
   ``Registry.available`` says may take a session of this pool now stay in
   the running (health and ejection are the pool's own, draining and
   capacity the address's), and of those only the best SRV priority
   (``discovery.best_priority``; listed backends are 0).
2. Stickiness, by source:

   - ``cookie:NAME``: a cookie that verifies pins its backend. Pinned and
     available: that backend first (sticky ``hit``), the others after it by
     least load. Pinned but unavailable (down, draining, ejected, full):
     ``reject`` answers 503, ``repick`` lets the selector choose and issues a
     new cookie (``repick``). No cookie (``new``) or one that does not verify
     (``miss``): the selector chooses and a cookie is issued.
   - a key (``header``, ``query``, ``ip``, ``claim``): the key's *home* is the
     top of its rendezvous order over every backend of the pool. Home
     unavailable and ``reject``: 503. Otherwise the selector orders the
     available backends by the key (``RendezvousHash`` may pass over a backend
     at its load bound): ``hit`` when the home comes first, ``repick`` when
     not. No key in the request: the selector's plain order (``miss``).
   - no sticky config: the selector's plain order (``none``).

3. The order is cut to ``1 + retries`` backends.

When the home or pinned backend recovers, new sessions of its keys and
cookies go back to it: nothing is remembered here, the hash and the cookie
simply point at it again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..config.schema import BackendConfig, PoolConfig
from .registry import Registry, unavailable_because
from .discovery import best_priority
from .policy import Candidate, Selector, least_conn_order, rendezvous_order
from .sticky import cookie_value, pinned_backend, request_cookie, set_cookie, sticky_key

__all__ = ["NoBackend", "Plan", "RETRY_AFTER_FULL_S", "cookie_for", "plan_session"]

#: ``Retry-After`` of the 503 when backends are only full: sessions end, capacity returns.
RETRY_AFTER_FULL_S: Final = 5


@dataclass(frozen=True, slots=True)
class Plan:
    """Dial these backends in order; add ``set_cookie`` to the 101 if the first one takes the session."""

    order: tuple[BackendConfig, ...]  # try in this order (1 + retries at most), never empty
    set_cookie: bytes | None  # a Set-Cookie value for the 101, when a (new) cookie pin must be issued
    sticky: str  # "hit" | "miss" | "new" | "repick" | "none": for the log line


@dataclass(frozen=True, slots=True)
class NoBackend:
    """Answer 503: no backend of the pool can take this session."""

    status: int  # 503
    reason: str  # for the log, e.g. "pool chat: every backend is down"
    body: str  # short response body naming the pool
    retry_after_s: int | None  # Retry-After when capacity will come back (backends full), else None


def cookie_for(pool: PoolConfig, backend: BackendConfig, *, tls: bool) -> bytes | None:
    """The ``Set-Cookie`` value pinning ``backend``, or None if the pool does not pin with a cookie."""
    sticky = pool.sticky
    if sticky is None or sticky.source != "cookie" or sticky.cookie is None:
        return None
    value = cookie_value(sticky.cookie.secret, pool.name, backend.address)
    return set_cookie(sticky.name, value, sticky.cookie, secure=tls)


def plan_session(
    pool: PoolConfig,
    registry: Registry,
    selector: Selector,
    now: float,
    *,
    headers: Sequence[tuple[bytes, bytes]],
    target: bytes,
    client_ip: str,
    claims: Mapping[str, object] | None = None,
    tls: bool = False,
    identity: str | None = None,
) -> Plan | NoBackend:
    """Decide where a new session of ``pool`` goes (see the module docstring)."""
    everyone = []
    open_now = []  # those that may take a session now (Registry.available, from the states looked up once)
    for b in pool.backends:
        state, health = registry.state(b.address), registry.health(pool.name, b.address)
        candidate = Candidate(b, state, b.weight * health.weight_factor(now, pool.slow_start_s))
        everyone.append(candidate)
        if registry.available_with(state, health, b, now):
            open_now.append(candidate)
    available = best_priority(open_now)  # SRV backups wait
    sticky = pool.sticky

    if sticky is None:
        if not available:
            return _no_backend(pool, registry, everyone, now)
        return _plan(pool, selector.order(available, None), None, "none")

    if sticky.source == "cookie":
        if sticky.cookie is None:  # the loader refuses this; plain balancing if it ever happens
            if not available:
                return _no_backend(pool, registry, everyone, now)
            return _plan(pool, selector.order(available, None), None, "none")
        value = request_cookie(headers, sticky.name)
        pinned = None if value is None else pinned_backend(value, sticky.cookie.secret, pool.name, pool.backends)
        if pinned is None:
            label = "new" if value is None else "miss"
        else:
            pin = next(c for c in everyone if c.backend is pinned)
            if registry.available(pool.name, pin.backend, now):  # a pin wins over SRV priority
                # Failover after the pin goes by least load: it leaves the selector's rotation alone.
                rest = least_conn_order([c for c in available if c is not pin])
                return _plan(pool, [pin, *rest], None, "hit")
            if sticky.on_unavailable == "reject":
                return _pinned_unavailable(pool, registry, pin, now)
            label = "repick"
        if not available:
            return _no_backend(pool, registry, everyone, now)
        order = selector.order(available, None)
        return _plan(pool, order, cookie_for(pool, order[0].backend, tls=tls), label)

    key = sticky_key(sticky, headers=headers, target=target, client_ip=client_ip, claims=claims, identity=identity)
    if key is None:
        if not available:
            return _no_backend(pool, registry, everyone, now)
        return _plan(pool, selector.order(available, None), None, "miss")
    home = rendezvous_order(everyone, key)[0]
    if not registry.available(pool.name, home.backend, now) and sticky.on_unavailable == "reject":
        return _pinned_unavailable(pool, registry, home, now)
    if not available:
        return _no_backend(pool, registry, everyone, now)
    order = selector.order(available, key)
    return _plan(pool, order, None, "hit" if order[0] is home else "repick")


def _plan(pool: PoolConfig, order: Sequence[Candidate], cookie: bytes | None, sticky: str) -> Plan:
    """A plan of at most ``1 + retries`` backends: each is tried once."""
    return Plan(order=tuple([c.backend for c in order[: 1 + max(0, pool.retries)]]), set_cookie=cookie, sticky=sticky)


def _unavailable_because(pool: PoolConfig, registry: Registry, candidate: Candidate, now: float) -> str:
    address = candidate.backend.address
    return unavailable_because(candidate.state, registry.health(pool.name, address), candidate.backend, now)


def _body(pool: PoolConfig) -> str:
    return f"no backend available in pool {pool.name}\n"


def _no_backend(pool: PoolConfig, registry: Registry, everyone: Sequence[Candidate], now: float) -> NoBackend:
    """The 503 for a pool none of whose backends may take a session."""
    reasons = [_unavailable_because(pool, registry, c, now) for c in everyone]
    if not reasons:
        reason = f"pool {pool.name}: no backends"
    elif len(set(reasons)) == 1:
        reason = f"pool {pool.name}: every backend is {reasons[0]}"
    else:
        counts = ", ".join(f"{reasons.count(r)} {r}" for r in dict.fromkeys(reasons))
        reason = f"pool {pool.name}: no backend available: {counts}"
    retry_after_s = RETRY_AFTER_FULL_S if "full" in reasons else None
    return NoBackend(status=503, reason=reason, body=_body(pool), retry_after_s=retry_after_s)


def _pinned_unavailable(pool: PoolConfig, registry: Registry, pin: Candidate, now: float) -> NoBackend:
    """The 503 of ``on_unavailable: reject``."""
    why = _unavailable_because(pool, registry, pin, now)
    return NoBackend(
        status=503,
        reason=f"pool {pool.name}: pinned backend {pin.backend.address} unavailable ({why}, reject)",
        body=_body(pool),
        retry_after_s=RETRY_AFTER_FULL_S if why == "full" else None,
    )
