"""Sessions under the operator's hand: listing them, closing them, and capping them per identity.

``SessionControl`` is one App's: it reads the App's table of established
sessions (``App.sessions``) and owns the per-identity count
(``proto.identity_caps.IdentityTable``). It serves

- the sessions API (``control.admin_http``): ``records`` for ``GET
  /sessions``, ``close_session`` and ``close_identity`` for the two POSTs;
- the gate (``edge.session``): ``admit`` when a request has passed
  authentication, ``established`` once it relays, ``release`` when it ends.

Closing is an order to the session's relay (``RelayDriver.finish``), which
places the close frames at frame boundaries itself: the operator's code and
reason to the client, 1001 to the backend. Each order is logged (``event=
session_closed_by_admin`` or ``event=identity_limit``) and the session's end
is counted in ``wsproxy_sessions_closed_total`` with ``outcome="admin"`` or
``outcome="identity_limit"``.

What this is not: the HTTP (``control.admin_http``), the paging rules
(``control.sessions``), or the cap's arithmetic (``proto.identity_caps``).
Nothing here awaits.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..balance.sticky import sticky_key
from ..log import field as logged
from ..log import log_event
from ..proto.frames import CLOSE_GOING_AWAY
from ..proto.handshake import Rejection, Upgrade
from ..proto.identity_caps import CLOSE_OLDEST_CODE, CLOSE_OLDEST_REASON, Evict, IdentityKey, IdentityTable
from ..proto.relay import By, Outcome
from ..proto.routing import route_label
from .sessions import CloseOrder, SessionRecord

if TYPE_CHECKING:
    from ..config.schema import LimitsConfig, PoolConfig
    from ..edge.session import Session

log = logging.getLogger("wsproxy.control.admin")
gate_log = logging.getLogger("wsproxy.edge.session")  # the cap's closes belong to the session's story

#: Hex digits of SHA-256 that name a sticky-key identity in logs (the key itself may be a secret header).
STICKY_DIGEST_HEX = 16


def identity_of(
    session: Session, pool: PoolConfig, up: Upgrade, claims: Mapping[str, object] | None
) -> tuple[IdentityKey, str] | None:
    """The capped identity of a session that passed the gate, and how the log names it; None: not capped.

    Who authenticated (``session.identity``: a token's name, a JWT subject, an
    mTLS subject) first; else the pool's sticky key (not a cookie pin), as
    ``sticky:POOL:DIGEST``, a namespace no authenticated name can reach.
    """
    if session.identity != "-":
        return IdentityKey("id:" + session.identity), f"identity {session.identity!r}"
    sticky = pool.sticky
    if sticky is None or sticky.source == "cookie":
        return None
    headers = list(up.request.headers)
    key = sticky_key(sticky, headers=headers, target=up.target, client_ip=session.client_ip, claims=claims)
    if key is None:
        return None
    digest = hashlib.sha256(key).hexdigest()[:STICKY_DIGEST_HEX]
    return IdentityKey(f"sticky:{pool.name}:{digest}"), f"sticky key {digest} of pool {pool.name}"


class SessionControl:
    """One App's sessions API and per-identity caps (see the module docstring)."""

    def __init__(self, sessions: Mapping[str, Session]) -> None:
        self.sessions = sessions
        self.identities = IdentityTable()

    # -- GET /sessions ------------------------------------------------------------------

    def records(self) -> list[SessionRecord]:
        """Every established session, as the sessions API shows it."""
        now = time.monotonic()
        records = []
        for session in list(self.sessions.values()):
            relay, route, backend = session.relay, session.route, session.backend
            if relay is None or route is None or backend is None:
                continue
            records.append(
                SessionRecord(
                    id=session.conn_id,
                    peer=session.peer,
                    identity=None if session.identity == "-" else session.identity,
                    route=route_label(route),
                    pool=route.pool,
                    backend=str(backend.address),
                    age_s=max(0.0, now - session.started),
                    up_bytes=relay.bytes_up,
                    down_bytes=relay.bytes_down,
                    up_msgs=relay.up.scanner.messages,
                    down_msgs=relay.down.scanner.messages,
                )
            )
        return records

    # -- POST /sessions/ID/close, POST /identities/IDENTITY/close -------------------------

    def close_session(self, conn_id: str, order: CloseOrder, *, by: str) -> int | None:
        """Close one session; None if there is no such session, else how many closes this started (0 or 1)."""
        session = self.sessions.get(conn_id)
        if session is None or session.relay is None:
            return None
        return self._close(session, order, by)

    def close_identity(self, identity: str, order: CloseOrder, *, by: str) -> int:
        """Close every session of ``identity`` (the gate's name for it); how many closes this started."""
        return sum(self._close(s, order, by) for s in list(self.sessions.values()) if s.identity == identity)

    def _close(self, session: Session, order: CloseOrder, by: str) -> int:
        relay = session.relay
        if relay is None or relay.machine.closed_by is not By.NONE:
            return 0  # already ending: the first reason stands
        session.log.peer_event(
            log, logging.INFO, "session_closed_by_admin",
            identity=logged(session.identity), code=order.code, reason=order.reason, admin_peer=by,
        )  # fmt: skip
        relay.finish(order.code, CLOSE_GOING_AWAY, order.reason, Outcome.ADMIN)
        return 1

    # -- the cap, for edge.session ------------------------------------------------------------

    def admit(
        self, session: Session, identity: tuple[IdentityKey, str], limits: LimitsConfig
    ) -> Rejection | None:
        """Count ``session`` against its identity's cap: None (admitted; the oldest closed if need be) or the 429."""
        key, label = identity
        verdict = self.identities.admit(
            key, session.conn_id, limit=limits.max_sessions_per_identity, policy=limits.on_identity_limit, label=label
        )
        if isinstance(verdict, Rejection):
            return verdict
        session.cap_key = key
        if isinstance(verdict, Evict):
            for conn_id in verdict.conn_ids:
                old = self.sessions.get(conn_id)
                if old is None or old.relay is None or old.relay.machine.closed_by is not By.NONE:
                    continue  # ending already (a peer, a drain, an operator): it no longer counts either
                log_event(
                    gate_log,
                    logging.INFO,
                    "identity_limit",
                    action='close_oldest',
                    **old.log.peer_fields,  # the closed session's conn and peer (after the action, as documented)
                    who=label,
                    for_conn=session.conn_id,
                    limit=limits.max_sessions_per_identity,
                )  # fmt: skip
                old.relay.finish(CLOSE_OLDEST_CODE, CLOSE_GOING_AWAY, CLOSE_OLDEST_REASON, Outcome.IDENTITY_LIMIT)
        return None

    def established(self, session: Session) -> None:
        if session.cap_key is not None:
            self.identities.established(session.cap_key, session.conn_id)

    def release(self, session: Session) -> None:
        if session.cap_key is not None:
            self.identities.release(session.cap_key, session.conn_id)
            session.cap_key = None
