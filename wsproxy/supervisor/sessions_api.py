"""The sessions API of ``workers`` > 1 (trio shell): each request asked of the workers, answered within a deadline.

The decisions (who is asked, how pages merge, how closes add up, which status)
are ``fanout``'s; here are the messages and the waiting.

During an upgrade's window the new supervisor asks the retiring generation
too, over the upgrade channel (``supervisor.upgrade``; ``state.older``), as if
it were one more worker (``fanout.RETIRING``); the old supervisor answers
with ``answer_newer``, asking its own workers as here.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import trio

from ..control.sessions import CloseOrder, SessionQuery
from . import fanout
from .ipc import ChannelClosed
from .table import WorkerState

if TYPE_CHECKING:
    from .state import SupervisorState


class SessionsAcross:
    """The supervisor's ``session_control``: the sessions API, asked of every serving worker (``fanout``).

    Implements ``control.admin_routes.SessionsAcross``. A question goes to the
    workers that serve (``ready``, or ``retiring`` after an upgrade: they still
    hold sessions) as an ``ask`` message; ``answered`` (called by
    ``WorkerSlots._talk``) records each ``answer``, ``gone`` a worker that
    exited. The answer is built once every worker asked has answered, or after
    ``fanout.FANOUT_TIMEOUT_S``. While an older generation retires
    (``supervisor.older``), it is asked as ``fanout.RETIRING`` with
    ``fanout.older_timeout``; ``gone(RETIRING)`` once it has exited.
    """

    def __init__(self, supervisor: SupervisorState, timeout_s: float = fanout.FANOUT_TIMEOUT_S) -> None:
        self.supervisor = supervisor
        self.timeout_s = timeout_s
        self._numbers = itertools.count(1)
        self._open: dict[int, tuple[fanout.Ask, trio.Event]] = {}

    def serving(self) -> list[int]:
        """The slots to ask: every worker with a channel that serves, or retires with its sessions."""
        supervisor = self.supervisor
        return [
            s.index for s in supervisor.slots
            if s.index in supervisor.channels and s.state in (WorkerState.READY, WorkerState.RETIRING)
        ]

    def serving_pids(self) -> dict[int, int | None]:
        """Slot → pid of the workers to ask (``serving``): who issued which session ids."""
        return {index: self.supervisor.slots[index].pid for index in self.serving()}

    def everyone(self) -> list[int]:
        """The workers to ask, and ``fanout.RETIRING`` while an older generation is still there."""
        return [*self.serving(), *([fanout.RETIRING] if self.supervisor.older is not None else [])]

    def answered(self, slot: int, number: int, data: dict[str, Any]) -> None:
        found = self._open.get(number)
        if found is not None:
            ask, done = found
            ask.answered(slot, data)
            if ask.done:
                done.set()

    def gone(self, slot: int) -> None:
        for ask, done in self._open.values():
            ask.gone(slot)
            if ask.done:
                done.set()

    async def _ask(self, slots: list[int], question: dict[str, Any], timeout_s: float) -> fanout.Ask:
        ask = fanout.Ask(next(self._numbers), frozenset(slots))
        done = trio.Event()
        self._open[ask.number] = (ask, done)
        try:
            with trio.move_on_after(timeout_s):
                for slot in slots:
                    message = {"t": "ask", "id": ask.number, **question}
                    if slot == fanout.RETIRING:
                        channel = self.supervisor.older
                        message["timeout_s"] = fanout.older_timeout(timeout_s)
                    else:
                        channel = self.supervisor.channels.get(slot)
                    try:
                        if channel is None:
                            raise ChannelClosed("no channel")
                        await channel.send(message)
                    except ChannelClosed:
                        ask.gone(slot)
                if not ask.done:
                    await done.wait()
        finally:
            del self._open[ask.number]
        return ask

    async def list_sessions(self, query: SessionQuery, timeout_s: float | None = None) -> tuple[int, dict[str, object]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        ask = await self._ask(self.everyone(), {"what": "sessions", "query": fanout.query_message(query)}, timeout_s)
        return fanout.list_answer(ask, query.limit, timeout_s)

    async def close_session(
        self, conn_id: str, order: CloseOrder, *, by: str, timeout_s: float | None = None
    ) -> tuple[int, dict[str, object]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        owner = fanout.close_route(conn_id, self.serving_pids(), self.supervisor.older is not None)
        if owner is None:
            return fanout.close_session_answer(None, conn_id, timeout_s)
        question = {"what": "close_session", "conn": conn_id, "order": fanout.order_message(order), "by": by}
        ask = await self._ask([owner], question, timeout_s)
        return fanout.close_session_answer(ask, conn_id, timeout_s)

    async def close_identity(
        self, identity: str, order: CloseOrder, *, by: str, timeout_s: float | None = None
    ) -> tuple[int, dict[str, object]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        question = {"what": "close_identity", "identity": identity, "order": fanout.order_message(order), "by": by}
        ask = await self._ask(self.everyone(), question, timeout_s)
        return fanout.close_identity_answer(ask, timeout_s)

    async def answer_newer(self, message: dict[str, Any]) -> dict[str, Any]:
        """A retiring supervisor's answer to a newer one's ``ask`` (``fanout.forwarded``): asked of its own workers."""
        what, by = str(message["what"]), str(message.get("by", "-"))
        timeout_s = float(message.get("timeout_s") or fanout.older_timeout(self.timeout_s))
        if what == "sessions":
            status, body = await self.list_sessions(fanout.query_from_message(message["query"]), timeout_s)
        elif what == "close_session":
            order = fanout.order_from_message(message["order"])
            status, body = await self.close_session(str(message["conn"]), order, by=by, timeout_s=timeout_s)
        elif what == "close_identity":
            order = fanout.order_from_message(message["order"])
            status, body = await self.close_identity(str(message["identity"]), order, by=by, timeout_s=timeout_s)
        else:
            raise ValueError(f"unknown question {what!r}")
        return fanout.forwarded(what, status, body)
