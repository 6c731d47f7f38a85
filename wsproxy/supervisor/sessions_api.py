"""The sessions API of ``workers`` > 1 (trio shell): each request asked of the workers, answered within a deadline.

The decisions (who is asked, how pages merge, how closes add up, which status)
are ``fanout``'s; here are the messages and the waiting.
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
    ``fanout.FANOUT_TIMEOUT_S``.
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

    async def _ask(self, slots: list[int], question: dict[str, Any]) -> fanout.Ask:
        ask = fanout.Ask(next(self._numbers), frozenset(slots))
        done = trio.Event()
        self._open[ask.number] = (ask, done)
        try:
            with trio.move_on_after(self.timeout_s):
                for slot in slots:
                    channel = self.supervisor.channels.get(slot)
                    try:
                        if channel is None:
                            raise ChannelClosed("no channel")
                        await channel.send({"t": "ask", "id": ask.number, **question})
                    except ChannelClosed:
                        ask.gone(slot)
                if not ask.done:
                    await done.wait()
        finally:
            del self._open[ask.number]
        return ask

    async def list_sessions(self, query: SessionQuery) -> tuple[int, dict[str, object]]:
        ask = await self._ask(self.serving(), {"what": "sessions", "query": fanout.query_message(query)})
        return fanout.list_answer(ask, query.limit, self.timeout_s)

    async def close_session(self, conn_id: str, order: CloseOrder, *, by: str) -> tuple[int, dict[str, object]]:
        owner = fanout.slot_of(conn_id)
        if owner is None or owner not in self.serving():
            return fanout.close_session_answer(None, conn_id, self.timeout_s)
        question = {"what": "close_session", "conn": conn_id, "order": fanout.order_message(order), "by": by}
        ask = await self._ask([owner], question)
        return fanout.close_session_answer(ask, conn_id, self.timeout_s)

    async def close_identity(self, identity: str, order: CloseOrder, *, by: str) -> tuple[int, dict[str, object]]:
        question = {"what": "close_identity", "identity": identity, "order": fanout.order_message(order), "by": by}
        ask = await self._ask(self.serving(), question)
        return fanout.close_identity_answer(ask, self.timeout_s)
