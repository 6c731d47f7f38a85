"""The sessions API across workers: what the supervisor asks each worker, and how the answers add up. No I/O here.

With ``workers`` > 1 each worker holds its own sessions; the supervisor
answers ``GET /sessions``, ``POST /sessions/ID/close`` and ``POST
/identities/IDENTITY/close`` by asking the workers over their channels
(``ask`` messages, each with an ``id``; a worker answers ``answer`` with the
same ``id``) and waiting for the answers up to a deadline
(``FANOUT_TIMEOUT_S``). This module decides:

- session ids: a worker's ids start with ``w{SLOT}x`` and its pid in six hex
  digits (``conn_prefix``): live processes have distinct pids, so ids are
  unique across the workers of every generation alive at once (an upgrade's
  retiring one too), and ``owner_of`` tells which worker issued one; a close
  of one session goes to that worker only (``close_route``);
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

During an upgrade's window the generation that retires (``supervisor.upgrade``)
is asked too, as one more worker (``RETIRING`` in an ``Ask``): the new
supervisor forwards the ``ask`` over the upgrade channel with a shorter
deadline (``older_timeout``), the old supervisor asks its retiring workers
as it always did and answers what one worker would (``forwarded``: its
merged first page and whether it has more, or its closes) plus which of its
workers did not answer. Those are named ``"retiring/SLOT"`` in
``unanswered``; the whole old generation silent is ``"retiring"``.

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
    "RETIRING",
    "RETIRING_NAME",
    "Ask",
    "close_identity_answer",
    "close_route",
    "close_session_answer",
    "conn_prefix",
    "forwarded",
    "list_answer",
    "merge_pages",
    "older_timeout",
    "order_from_message",
    "order_message",
    "owner_of",
    "query_from_message",
    "query_message",
    "slot_of",
    "sum_closed",
    "worker_page",
]

#: How long the supervisor waits for the workers' answers to one sessions API request.
FANOUT_TIMEOUT_S = 3.0
#: The share of its own deadline a supervisor gives the retiring generation it forwards a question to:
#: its answer, with what its workers said or which did not answer, then arrives before ours is due.
OLDER_SHARE = 0.75
#: The retiring generation's place in an ``Ask`` (no worker slot is negative).
RETIRING = -1
#: How ``unanswered`` names the retiring generation (``"retiring/SLOT"``: one of its workers).
RETIRING_NAME = "retiring"

_OWNER = re.compile(r"w(\d+)x")
_OWNER_PID = re.compile(r"w(\d+)x([0-9a-f]{6})")
_QUERY_FIELDS = ("route", "pool", "backend", "identity", "peer", "limit", "after")


def conn_prefix(slot: int, pid: int) -> str:
    """The prefix of the session ids of worker ``slot`` whose process is ``pid``: ``w{SLOT}x`` then the pid in 6 hex digits.

    Two processes alive at once never share a pid (Linux's largest, 2**22,
    fits in six hex digits), so no two live workers issue the same id, whether
    of one generation or of an upgrade's two; a restarted worker has a new pid.
    """
    return f"w{slot}x{pid:06x}"


def slot_of(conn_id: str) -> int | None:
    """The slot of the worker that issued ``conn_id`` (``conn_prefix``), or None for an id no worker issues."""
    match = _OWNER.match(conn_id)
    return int(match[1]) if match else None


def owner_of(conn_id: str) -> tuple[int, int] | None:
    """(slot, pid) of the worker that issued ``conn_id`` (``conn_prefix``), or None for an id no worker issues."""
    match = _OWNER_PID.match(conn_id)
    return (int(match[1]), int(match[2], 16)) if match else None


def close_route(conn_id: str, serving: Mapping[int, int | None], retiring: bool) -> int | None:
    """Whom to ask to close ``conn_id``: the slot of the serving worker that issued it, else ``RETIRING``, else None.

    ``serving``: slot → pid of the workers that serve (or retire) here;
    ``retiring``: whether an older generation is still there to ask (it owns
    every worker id that none of ours issued, if anyone does).
    """
    owner = owner_of(conn_id)
    if owner is None:
        return None
    slot, pid = owner
    if serving.get(slot) == pid:
        return slot
    return RETIRING if retiring else None


def older_timeout(timeout_s: float) -> float:
    """The deadline to forward with a question to the retiring generation (``OLDER_SHARE`` of ours)."""
    return timeout_s * OLDER_SHARE


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
    def heard(self) -> bool:
        """Whether anyone answered: a worker, or the retiring generation with at least one of its workers."""
        return any(not data.get("timed_out") for data in self.answers.values())

    @property
    def unanswered(self) -> list[int | str]:
        """Who did not answer: worker slots, then ``"retiring"`` or the retiring generation's own silent workers."""
        silent = sorted(self.asked - self.answers.keys())
        names: list[int | str] = [slot for slot in silent if slot != RETIRING]
        if RETIRING in silent:
            names.append(RETIRING_NAME)
        older = self.answers.get(RETIRING)
        if older is not None:
            names += [f"{RETIRING_NAME}/{name}" for name in older.get("unanswered") or ()]
        return names


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


def forwarded(what: str, status: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """The retiring generation's answer to a newer supervisor: what one worker would say, and who did not answer.

    ``status`` and ``body`` are its own answer to ``what`` (``list_answer`` and
    the closes'); a 504 (none of its workers answered) says ``timed_out``.
    """
    data: dict[str, Any] = {"unanswered": list(body.get("unanswered") or ())}
    if status == 504:
        data["timed_out"] = True
    if what == "sessions":
        data["sessions"] = list(body.get("sessions") or ())
        data["more"] = body.get("next") is not None
    else:
        data["closed"] = body.get("closed") if status == 200 else None
    return data


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
    if ask.asked and not ask.heard:
        return _timed_out(ask, timeout_s)
    sessions, cursor = merge_pages(ask.answers.values(), limit)
    return 200, {"sessions": sessions, "next": cursor, "unanswered": ask.unanswered}


def close_session_answer(ask: Ask | None, conn_id: str, timeout_s: float = FANOUT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """``POST /sessions/ID/close`` across workers (``ask``: None when no serving worker owns the id)."""
    if ask is None:
        return 404, {"error": "no such session", "id": conn_id}
    if not ask.heard:
        if not ask.asked:  # its worker exited meanwhile: so did the session
            return 404, {"error": "no such session", "id": conn_id}
        return _timed_out(ask, timeout_s)
    closed = next(iter(ask.answers.values())).get("closed")
    if closed is None:
        return 404, {"error": "no such session", "id": conn_id}
    return 200, {"closed": int(closed)}


def close_identity_answer(ask: Ask, timeout_s: float = FANOUT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """``POST /identities/IDENTITY/close`` across workers: the closes summed."""
    if ask.asked and not ask.heard:
        return _timed_out(ask, timeout_s)
    return 200, {"closed": sum_closed(ask.answers.values()), "unanswered": ask.unanswered}
