"""The sessions API's decisions: listing, filtering and paging session records, and close orders. No I/O here.

``GET /sessions`` answers ``{"sessions": [RECORD...], "next": CURSOR | null}``
where a record is ``{"id", "peer", "identity", "route", "pool", "backend",
"age_s", "up_bytes", "down_bytes", "up_msgs", "down_msgs"}`` (``identity``
null when the gate knew none; ``route`` as the logs write it, ``*/chat``).
Query parameters (each at most once; anything else is 400):

- ``route``, ``pool``, ``backend``, ``identity``: exact matches;
- ``peer``: the client's ``ip:port``, or only its ip (every session from it);
- ``limit``: 1 to ``MAX_LIMIT`` records per page (default ``DEFAULT_LIMIT``);
- ``cursor``: the ``next`` of the previous page (opaque).

Paging is stable: records are ordered by session id in the order ids are
issued (``session_order``), and a cursor means "after this id", so sessions
that end between two pages shift nothing, and sessions that open meanwhile
come on later pages. Filters apply within each page's window, so following
``next`` with the same filters visits every matching session once.

``POST /sessions/ID/close`` and ``POST /identities/IDENTITY/close`` take an
optional JSON body ``{"code": 1008, "reason": "..."}`` (``parse_close_body``):
the code one a proxy may send of its own (``ADMIN_CLOSE_CODES``, or 4000-4999
for applications), the reason at most 123 bytes of UTF-8 (RFC 6455 §5.5: a
control frame's payload is at most 125 bytes, 2 of them the code).

What this is not: the HTTP (``control.admin_http``) or the closing itself
(``control.session_admin``, which orders the relays to finish).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

__all__ = [
    "ADMIN_CLOSE_CODES",
    "DEFAULT_CLOSE_CODE",
    "DEFAULT_CLOSE_REASON",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_REASON_BYTES",
    "CloseOrder",
    "SessionQuery",
    "SessionRecord",
    "parse_close_body",
    "parse_query",
    "select",
    "session_order",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: RFC 6455 §7.4.1 codes a proxy may send of its own: normal, going away, policy violation,
#: internal error, service restart, try again later; and 4000-4999 (private use, §7.4.2).
ADMIN_CLOSE_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013})
PRIVATE_CLOSE_CODES = range(4000, 5000)
DEFAULT_CLOSE_CODE = 1008
DEFAULT_CLOSE_REASON = "closed by the operator"
#: RFC 6455 §5.5: control frame payload ≤ 125 bytes, of which 2 are the code.
MAX_REASON_BYTES = 123
FILTERS = ("route", "pool", "backend", "identity", "peer")
_CURSOR_PREFIX = "s1:"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One established session as the sessions API shows it."""

    id: str
    peer: str  # "ip:port" ("[v6]:port")
    identity: str | None
    route: str  # the route's label, "*/chat"
    pool: str
    backend: str  # "host:port"
    age_s: float
    up_bytes: int
    down_bytes: int
    up_msgs: int
    down_msgs: int

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "peer": self.peer,
            "identity": self.identity,
            "route": self.route,
            "pool": self.pool,
            "backend": self.backend,
            "age_s": round(self.age_s, 3),
            "up_bytes": self.up_bytes,
            "down_bytes": self.down_bytes,
            "up_msgs": self.up_msgs,
            "down_msgs": self.down_msgs,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionQuery:
    """``GET /sessions``'s parameters, validated."""

    route: str | None = None
    pool: str | None = None
    backend: str | None = None
    identity: str | None = None
    peer: str | None = None
    limit: int = DEFAULT_LIMIT
    after: str | None = None  # the cursor's session id: list only those after it

    def matches(self, record: SessionRecord) -> bool:
        if self.route is not None and record.route != self.route:
            return False
        if self.pool is not None and record.pool != self.pool:
            return False
        if self.backend is not None and record.backend != self.backend:
            return False
        if self.identity is not None and record.identity != self.identity:
            return False
        if self.peer is not None and record.peer != self.peer and _peer_host(record.peer) != _bare(self.peer):
            return False
        return True


@dataclass(frozen=True, slots=True)
class CloseOrder:
    """What an operator asked a close with: the code for the client, and the reason."""

    code: int = DEFAULT_CLOSE_CODE
    reason: str = DEFAULT_CLOSE_REASON


def session_order(conn_id: str) -> tuple[int, str]:
    """The order session ids are issued in: a fixed prefix and a growing hex counter, so shorter first."""
    return (len(conn_id), conn_id)


def parse_query(query: str) -> SessionQuery | str:
    """The query string (without ``?``) → a ``SessionQuery``, or the 400's reason."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict")
    except (ValueError, UnicodeDecodeError):
        return "malformed query string"
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in (*FILTERS, "limit", "cursor"):
            return f"unknown query parameter {name!r} (expected: {', '.join((*FILTERS, 'limit', 'cursor'))})"
        if name in seen:
            return f"query parameter {name!r} given twice"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            return f"control character in query parameter {name!r}"
        seen[name] = value
    limit = DEFAULT_LIMIT
    if "limit" in seen:
        text = seen["limit"]
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            return f"limit must be a whole number from 1 to {MAX_LIMIT}"
        limit = int(text)
    after = None
    if "cursor" in seen:
        after = decode_cursor(seen["cursor"])
        if after is None:
            return "invalid cursor (use the \"next\" of a previous answer)"
    filters = {name: seen[name] for name in FILTERS if name in seen}
    return SessionQuery(limit=limit, after=after, **filters)


def select(records: Iterable[SessionRecord], query: SessionQuery) -> tuple[list[SessionRecord], str | None]:
    """One page: the matching records after the cursor, in id order, and the next cursor (None: the last page)."""
    after = session_order(query.after) if query.after is not None else None
    ordered = sorted(
        (r for r in records if (after is None or session_order(r.id) > after) and query.matches(r)),
        key=lambda r: session_order(r.id),
    )
    page = ordered[: query.limit]
    more = len(ordered) > query.limit
    return page, encode_cursor(page[-1].id) if more else None


def encode_cursor(conn_id: str) -> str:
    """Opaque to clients: URL-safe base64 of a versioned position."""
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + conn_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not text.startswith(_CURSOR_PREFIX) or not text[len(_CURSOR_PREFIX) :].isalnum():
        return None
    return text[len(_CURSOR_PREFIX) :]


def parse_close_body(body: bytes) -> CloseOrder | str:
    """An optional JSON body ``{"code", "reason"}`` → a ``CloseOrder``, or the 400's reason."""
    if not body.strip():
        return CloseOrder()
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "the body is not JSON (expected {\"code\": 1008, \"reason\": \"...\"})"
    if not isinstance(document, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(document) - {"code", "reason"})
    if unknown:
        return f"unknown key {unknown[0]!r} in the body (expected: code, reason)"
    code = document.get("code", DEFAULT_CLOSE_CODE)
    if isinstance(code, bool) or not isinstance(code, int) or not valid_close_code(code):
        return (
            f"code {json.dumps(code)} is not one a proxy may send: use 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999"
        )
    reason = document.get("reason", DEFAULT_CLOSE_REASON)
    if not isinstance(reason, str):
        return "reason must be a string"
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return "reason is not valid UTF-8"
    if size > MAX_REASON_BYTES:
        return f"reason is {size} bytes of UTF-8; a close frame holds at most {MAX_REASON_BYTES}"
    return CloseOrder(code, reason)


def valid_close_code(code: int) -> bool:
    return code in ADMIN_CLOSE_CODES or code in PRIVATE_CLOSE_CODES


def _peer_host(peer: str) -> str:
    """``ip:port`` → ``ip`` (``[::1]:5000`` → ``::1``)."""
    return _bare(peer.rsplit(":", 1)[0])



def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
