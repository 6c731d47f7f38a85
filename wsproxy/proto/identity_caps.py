"""Per-identity session caps: who holds how many sessions, and the verdict for one more. No I/O here.

``limits.max_sessions_per_identity: N`` bounds the sessions one identity may
hold at once, across every route and listener of the process. The identity is
who the gate let in (a token's name, a JWT's subject, an mTLS subject), or,
on routes without authentication, the pool's sticky key (``header``,
``query``, ``ip`` or ``claim``; a ``cookie`` pin names a backend, not a
client, so it is no identity). A session without either is not capped. The
caller builds the key (``IdentityKey``), so that a sticky key sent by an
anonymous client can never be mistaken for an authenticated name.

What happens to the session over the cap is ``limits.on_identity_limit``:

=============  ============================================================
refuse         429 with ``Retry-After`` (RFC 6585 §4, RFC 9110 §10.2.3)
close_oldest   the oldest established session(s) of that identity are
               closed with 1008 "too many sessions for this identity"
               (RFC 6455 §7.4.1, policy violation) and the new one admitted
=============  ============================================================

Theory of operation
-------------------
Each identity maps its connections, in admission order, to a state::

    admit ──→ PENDING ──established──→ OPEN ──evicted──→ CLOSING
                 │                       │                  │
                 └───────────── release (the connection ended) ┘

A connection counts from ``admit`` (so concurrent handshakes cannot slip
past the cap together) until ``release``, except once ``CLOSING``: a session
whose close was ordered to make room no longer counts, although its close
handshake may take a moment. ``close_oldest`` only evicts ``OPEN`` sessions
(one still in its handshake has nothing to close yet); when the OPEN ones are
not enough to make room, the new one is refused as under ``refuse``.

The table holds only identities with a live connection, so it is bounded by
the process's connections. This module does not close anything: it names
the connections to close, and the caller orders their relays to finish.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

from ..config.schema import IDENTITY_POLICIES
from .handshake import Rejection

__all__ = [
    "CLOSE_OLDEST_CODE",
    "CLOSE_OLDEST_REASON",
    "RETRY_AFTER_S",
    "Evict",
    "IdentityKey",
    "IdentityTable",
]

#: A capped identity: ``"id:" + name`` (authenticated) or ``"sticky:POOL:" + digest`` (see the caller).
IdentityKey = NewType("IdentityKey", str)

#: Retry-After of the 429: sessions are long-lived, so a client should not hammer.
RETRY_AFTER_S = 5
#: RFC 6455 §7.4.1: 1008 "policy violation", to the client of the session closed to make room.
CLOSE_OLDEST_CODE = 1008
CLOSE_OLDEST_REASON = "too many sessions for this identity"


class _State(enum.Enum):
    PENDING = "pending"  # admitted, handshakes under way
    OPEN = "open"  # established: can be evicted
    CLOSING = "closing"  # evicted: its close is ordered, it no longer counts


@dataclass(frozen=True, slots=True)
class Evict:
    """Admit the new connection after closing these (oldest first)."""

    conn_ids: tuple[str, ...]


class IdentityTable:
    """Connections per identity, and the cap's verdicts (see the module docstring)."""

    __slots__ = ("_by_identity",)

    def __init__(self) -> None:
        # identity → conn id → state; dicts keep insertion order, so the first OPEN is the oldest
        self._by_identity: dict[IdentityKey, dict[str, _State]] = {}

    def __len__(self) -> int:
        """Identities with at least one live connection."""
        return len(self._by_identity)

    def count(self, identity: IdentityKey) -> int:
        """The connections that count against ``identity``'s cap (pending and open)."""
        conns = self._by_identity.get(identity)
        return 0 if conns is None else sum(1 for s in conns.values() if s is not _State.CLOSING)

    def admit(
        self, identity: IdentityKey, conn_id: str, *, limit: int, policy: str, label: str
    ) -> Rejection | Evict | None:
        """May ``conn_id`` hold one more session of ``identity``?

        None: admitted (and counted). ``Evict``: admitted (and counted) once the
        named sessions are closed; they already no longer count. ``Rejection``:
        the 429 to answer; nothing counted. ``limit`` 0 means no cap. ``label``
        names the identity in the refusal's reason (for the log, never a secret).
        """
        conns = self._by_identity.setdefault(identity, {})
        if limit > 0:
            counted = [c for c, s in conns.items() if s is not _State.CLOSING]
            over = len(counted) + 1 - limit
            if over > 0:
                oldest = [c for c in counted if conns[c] is _State.OPEN][:over]
                if policy != "close_oldest" or len(oldest) < over:
                    if not conns:
                        del self._by_identity[identity]
                    return Rejection(
                        429,
                        f"too many sessions for {label}: {len(counted)} open, max_sessions_per_identity {limit}",
                        ((b"Retry-After", b"%d" % RETRY_AFTER_S),),
                    )
                for conn in oldest:
                    conns[conn] = _State.CLOSING
                conns[conn_id] = _State.PENDING
                return Evict(tuple(oldest))
        conns[conn_id] = _State.PENDING
        return None

    def established(self, identity: IdentityKey, conn_id: str) -> None:
        """``conn_id``'s session is relaying: from now on it may be evicted."""
        conns = self._by_identity.get(identity)
        if conns is not None and conns.get(conn_id) is _State.PENDING:
            conns[conn_id] = _State.OPEN

    def release(self, identity: IdentityKey, conn_id: str) -> None:
        """``conn_id`` has ended (or was refused later on): it no longer counts."""
        conns = self._by_identity.get(identity)
        if conns is None:
            return
        conns.pop(conn_id, None)
        if not conns:
            del self._by_identity[identity]
