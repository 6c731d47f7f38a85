"""The sessions API across workers: what the supervisor asks each worker, and how the answers add up. No I/O here.

With ``workers`` > 1 each worker holds its own sessions; the supervisor
answers ``GET /sessions``, ``POST /sessions/ID/close`` and ``POST
/identities/IDENTITY/close`` by asking the workers over their channels
(``ask`` messages, each with an ``id``; a worker answers ``answer`` with the
same ``id``) and waiting for the answers up to a deadline
(``FANOUT_TIMEOUT_S``). This module decides:

- session ids: a worker's ids start with ``w{SLOT}x`` (``conn_prefix``), so
  ids are unique across workers and ``slot_of`` tells which worker owns one;
  a close of one session goes to that worker only;
- listing: every worker answers the same query (filters, ``limit``, cursor)
  with its own first page and whether it has more (``worker_page``); the
  whole proxy's page is the first ``limit`` of all those in the one id order
  (``sessions.session_order``), and it has a ``next`` when anything was left
  out (``merge_pages``). Every session that stays open while a client follows
  ``next`` is listed exactly once; a session that opens meanwhile may sort
  before the cursor (each worker numbers its own), and then that walk misses it;
- an identity close goes to every worker, and the closes add up (``sum_closed``);
- workers that did not answer in time are named in the answer
  (``"unanswered": [SLOT...]``); when none answered, the answer is 504.

``Ask`` is one request's bookkeeping: which workers were asked, which
answered, what they said. The waiting is the supervisor's
(``supervisor.admin_view``); the workers' side is ``supervisor.worker``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..control.sessions import CloseOrder, SessionQuery, SessionRecord, encode_cursor, select, session_order

__all__ = [
    "FANOUT_TIMEOUT_S",
    "Ask",
    "close_identity_answer",
    "close_session_answer",
    "conn_prefix",
    "list_answer",
    "merge_pages",
    "order_from_message",
    "order_message",
    "query_from_message",
    "query_message",
    "slot_of",
    "sum_closed",
    "worker_page",
]

#: How long the supervisor waits for the workers' answers to one sessions API request.
FANOUT_TIMEOUT_S = 3.0

_OWNER = re.compile(r"w(\d+)x")
_QUERY_FIELDS = ("route", "pool", "backend", "identity", "peer", "limit", "after")


def conn_prefix(slot: int, salt: str) -> str:
    """The prefix of worker ``slot``'s session ids: ``w{SLOT}x`` then ``salt`` (a few random hex digits per start)."""
    return f"w{slot}x{salt}"


def slot_of(conn_id: str) -> int | None:
    """The slot of the worker that issued ``conn_id`` (``conn_prefix``), or None for an id no worker issues."""
    match = _OWNER.match(conn_id)
    return int(match[1]) if match else None


@dataclass(slots=True)
class Ask:
    """One request to some workers: who was asked, who answered what."""

    number: int
    asked: frozenset[int]
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def answered(self, slot: int, data: dict[str, Any]) -> None:
        if slot in self.asked:
            self.answers[slot] = data

    def gone(self, slot: int) -> None:
        """Worker ``slot`` exited: it will not answer (it has no sessions left either)."""
        if slot in self.asked and slot not in self.answers:
            self.asked = self.asked - {slot}

    @property
    def done(self) -> bool:
        return self.asked <= self.answers.keys()

    @property
    def unanswered(self) -> list[int]:
        return sorted(self.asked - self.answers.keys())


# -- messages ----------------------------------------------------------------------------


def query_message(query: SessionQuery) -> dict[str, Any]:
    """A ``SessionQuery`` as the ``ask`` message carries it."""
    return {name: getattr(query, name) for name in _QUERY_FIELDS}


def query_from_message(data: Mapping[str, Any]) -> SessionQuery:
    return SessionQuery(**{name: data[name] for name in _QUERY_FIELDS if name in data})


def order_message(order: CloseOrder) -> dict[str, Any]:
    return {"code": order.code, "reason": order.reason}


def order_from_message(data: Mapping[str, Any]) -> CloseOrder:
    return CloseOrder(int(data["code"]), str(data["reason"]))


# -- a worker's side -----------------------------------------------------------------------


def worker_page(records: Iterable[SessionRecord], query: SessionQuery) -> dict[str, Any]:
    """One worker's answer to a listing: its first page for ``query``, and whether it has more."""
    page, cursor = select(records, query)
    return {"sessions": [r.as_json() for r in page], "more": cursor is not None}


# -- the supervisor's side -------------------------------------------------------------------


def merge_pages(pages: Iterable[Mapping[str, Any]], limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """The whole proxy's page from each worker's (``worker_page``): the first ``limit`` in id order, and ``next``."""
    records: list[dict[str, Any]] = []
    more = False
    for page in pages:
        records.extend(page.get("sessions") or [])
        more = more or bool(page.get("more"))
    records.sort(key=lambda r: session_order(str(r["id"])))
    kept = records[:limit]
    if kept and (more or len(records) > limit):
        return kept, encode_cursor(str(kept[-1]["id"]))
    return kept, None


def sum_closed(answers: Iterable[Mapping[str, Any]]) -> int:
    """How many closes the workers' answers started together (a worker without the session says None)."""
    return sum(int(a.get("closed") or 0) for a in answers)


def _timed_out(ask: Ask, timeout_s: float) -> tuple[int, dict[str, Any]]:
    return 504, {
        "error": f"no worker answered within {timeout_s:g}s",
        "unanswered": ask.unanswered,
    }


def list_answer(ask: Ask, limit: int, timeout_s: float = FANOUT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """``GET /sessions`` across workers: (status, JSON body)."""
    if ask.asked and not ask.answers:
        return _timed_out(ask, timeout_s)
    sessions, cursor = merge_pages(ask.answers.values(), limit)
    return 200, {"sessions": sessions, "next": cursor, "unanswered": ask.unanswered}


def close_session_answer(ask: Ask | None, conn_id: str, timeout_s: float = FANOUT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """``POST /sessions/ID/close`` across workers (``ask``: None when no serving worker owns the id)."""
    if ask is None:
        return 404, {"error": "no such session", "id": conn_id}
    if not ask.answers:
        if not ask.asked:  # its worker exited meanwhile: so did the session
            return 404, {"error": "no such session", "id": conn_id}
        return _timed_out(ask, timeout_s)
    closed = next(iter(ask.answers.values())).get("closed")
    if closed is None:
        return 404, {"error": "no such session", "id": conn_id}
    return 200, {"closed": int(closed)}


def close_identity_answer(ask: Ask, timeout_s: float = FANOUT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """``POST /identities/IDENTITY/close`` across workers: the closes summed."""
    if ask.asked and not ask.answers:
        return _timed_out(ask, timeout_s)
    return 200, {"closed": sum_closed(ask.answers.values()), "unanswered": ask.unanswered}
