"""Session lifetimes in a running proxy: deadlines set at the gate, met by the sweeper, revocations applied by reloads.

- ``admit`` runs once per session, after the gate let it in: a credential on
  the route's revoked list is refused (403, ``reason=revoked``); otherwise the
  session gets its ``deadline``, the earlier of its token's expiry
  (``auth.enforce_expiry``) and forward auth's lifetime (``forward.lifetime_from``),
  with the jitter rules of ``proto.lifetime``; ``established`` adds
  ``max_session_age``, counted from the 101.
- ``due`` is asked by the idle sweeper on each pass (``control.sweeper``): a
  session past its deadline is told to close, at a frame boundary, with the
  deadline's code (1008 token expired, 1012 session lifetime reached) to the
  client and 1001 to the backend.
- ``revoke_open`` runs after each applied reload (the reload re-read every
  ``revoked_file``): open sessions whose ``jti`` or subject is now listed are
  closed with 1008 "token revoked", spread over ``min(drain.spread, 50 ms ×
  count)`` of their pool, so a handful goes at once and thousands do not
  reconnect in the same second.

A session is checked against the list of *its* route as the new config has it:
the route with the same host and path (the list of its own config when the
reload removed the route).

What this is not: the decisions (``proto.lifetime``), nor the close frames
(``RelayDriver.finish``). No sockets here.
"""

from __future__ import annotations

import logging
from functools import partial
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from ..config.schema import Config, PoolName, RouteConfig
from ..log import log_event
from ..proto.frames import CLOSE_GOING_AWAY
from ..proto.handshake import Rejection
from ..proto.lifetime import (
    Deadline,
    End,
    age_deadline,
    expiry_deadline,
    lifetime_deadline,
    revocation_keys,
    revoked_by,
)
from ..proto.relay import Outcome
from .drain import close_spread

if TYPE_CHECKING:
    from ..edge.gate import Admitted
    from ..edge.refusal import Refused
    from ..edge.session import Session

log = logging.getLogger("wsproxy.lifetime")

#: The outcome (metrics label) of each kind of end.
OUTCOMES = {End.TOKEN_EXPIRED: Outcome.TOKEN_EXPIRED, End.REVOKED: Outcome.REVOKED, End.LIFETIME: Outcome.LIFETIME}
#: Revoked sessions are closed over this much per session (at most ``drain.spread``).
REVOKE_SLOT_S = 0.05


def admit(session: Session, route: RouteConfig, admitted: Admitted, now: float, now_unix: float, rng: random.Random) -> Refused | None:
    """Refuse a revoked credential, or give the session its deadline (``now``: trio clock)."""
    auth = route.auth
    deadline: Deadline | None = None
    if auth is not None:
        keys = revocation_keys(admitted.identity, admitted.claims)
        session.revocation_keys = keys
        kind = revoked_by(auth.revoked, keys)
        if kind is not None:
            from ..edge.refusal import Reason, Refused

            return Refused.of(Reason.REVOKED, Rejection(403, f"credential revoked: its {kind} is listed in {auth.revoked_file}"))
        if auth.enforce_expiry and auth.jwt is not None and admitted.claims is not None:
            expiry = expiry_deadline(admitted.claims, auth.jwt.leeway_s, now_unix, rng.random())
            if expiry is not None:  # Unix seconds → the trio clock the sweeper keeps
                deadline = Deadline(now + (expiry.at - now_unix), expiry.end)
        if admitted.lifetime is not None:
            answered, seconds = admitted.lifetime
            deadline = lifetime_deadline(seconds, answered, rng.random()).earlier(deadline)
    session.deadline = deadline
    return None


def established(session: Session, route: RouteConfig, now: float, rng: random.Random) -> None:
    """Both handshakes are done (``now``: trio clock): ``max_session_age`` counts from here."""
    if route.max_session_age_s is not None:
        session.deadline = age_deadline(route.max_session_age_s, now, rng.random()).earlier(session.deadline)


def end(session: Session, why: End) -> None:
    """Close ``session`` for ``why``: its code to the client, 1001 to the backend, at a frame boundary."""
    relay = session.relay
    if relay is None or session.draining:
        return
    session.draining = True
    relay.finish(why.client_code, CLOSE_GOING_AWAY, why.reason, OUTCOMES[why])


def due(session: Session, now: float) -> bool:
    """The sweeper's question: has ``session`` reached its deadline? If so it is told to close."""
    deadline = session.deadline
    if deadline is None or now < deadline.at or session.draining:
        return False
    end(session, deadline.end)
    return True


def _route_now(config: Config, route: RouteConfig) -> RouteConfig:
    return next((r for r in config.routes if r.host == route.host and r.path == route.path), route)


async def revoke_open(sessions: Mapping[str, Session], config: Config, rng: random.Random) -> None:
    """After a reload: close the open sessions whose credential the new lists revoke (spread)."""
    if not any(route.auth is not None and route.auth.revoked for route in config.routes):
        return
    by_pool: dict[str, list[Session]] = {}
    for session in list(sessions.values()):
        if session.route is None or session.relay is None or session.draining or not session.revocation_keys:
            continue
        auth = _route_now(config, session.route).auth
        if auth is not None and revoked_by(auth.revoked, session.revocation_keys) is not None:
            session.draining = True  # ordered: neither the sweeper nor the next reload orders it again
            by_pool.setdefault(session.route.pool, []).append(session)
    async with trio.open_nursery() as nursery:
        for pool_name, listed in by_pool.items():
            pool = config.pools.get(PoolName(pool_name))
            spread_s = min(pool.drain.spread_s if pool is not None else 0.0, REVOKE_SLOT_S * len(listed))
            log_event(
                log,
                logging.INFO,
                "revoked_closing",
                pool=pool_name,
                sessions=len(listed),
                spread_s=spread_s,
            )
            nursery.start_soon(partial(
                close_spread, listed, spread_s, End.REVOKED.client_code, CLOSE_GOING_AWAY, End.REVOKED.reason,
                Outcome.REVOKED, live=sessions, rng=rng,
            ))  # fmt: skip
