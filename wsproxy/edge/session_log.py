"""One session's log context: the fields its lines carry, kept once, and the calls that write them.

A session is followed in the log by its ``conn`` id; most of its lines also
say who the client is (``peer``), and once known, which route, pool and
backend serve it. ``SessionLog`` is created at accept time with the
connection id and the address the socket shows, and learns the rest as the
handshake goes (``set_peer`` after a PROXY header, ``routed``, ``served``).
Each line names how much of that context leads it, always in this order:

================  =================================  ==========================================
method            leading fields                     lines
================  =================================  ==========================================
``conn_event``    conn                               error, upstream_failed, local_overload
``peer_event``    conn peer                          tls_failed, session_closed_by_admin
``route_event``   conn peer route                    refused (``route=-`` before one matched)
``backend_event`` conn peer route pool backend       open, close
================  =================================  ==========================================

then the line's own fields, as ``log.log_event`` writes them. The context is
a small dict built once per shape (and again only when a field changes), and
the log record refers to it (``log.Event.context``, a ``log.Context`` that keeps its logfmt text once made): a line costs no copy of
the session's fields, and nothing at all when its level is off.

What this is not: the formatting (``wsproxy.log``), nor what each line says
(the code that logs it); it never holds a credential.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..log import Context, Event, emit
from ..proto.routing import NO_ROUTE

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


class SessionLog:
    """The fields of one session's log lines (see the module docstring)."""

    __slots__ = ("conn", "peer", "route", "pool", "backend", "_peer", "_route", "_backend")

    def __init__(self, conn: str, peer: str) -> None:
        self.conn = conn
        self.peer = peer  # the client's address (after PROXY protocol, once read)
        self.route = NO_ROUTE  # the route's label once one matched
        self.pool = ""
        self.backend = ""  # the backend that accepted the upgrade
        #: the context of each shape, built on first use; replaced (never changed) when a field changes
        self._peer: Context | None = None
        self._route: Context | None = None
        self._backend: Context | None = None

    # -- what the session learns ----------------------------------------------------------------

    def set_peer(self, peer: str) -> None:
        """The client's address as the PROXY header gave it."""
        self.peer = peer
        self._peer = self._route = self._backend = None

    def routed(self, route: str) -> None:
        """A route matched (its label, ``proto.routing.route_label``)."""
        self.route = route
        self._route = self._backend = None

    def served(self, pool: str, backend: str) -> None:
        """``backend`` of ``pool`` accepted the upgrade."""
        self.pool, self.backend = pool, backend
        self._backend = None

    # -- the contexts ---------------------------------------------------------------------------

    @property
    def conn_fields(self) -> Mapping[str, object]:
        return {"conn": self.conn}

    @property
    def peer_fields(self) -> Mapping[str, object]:
        context = self._peer
        if context is None:
            context = self._peer = Context(conn=self.conn, peer=self.peer)
        return context

    @property
    def route_fields(self) -> Mapping[str, object]:
        context = self._route
        if context is None:
            context = self._route = Context(conn=self.conn, peer=self.peer, route=self.route)
        return context

    @property
    def backend_fields(self) -> Mapping[str, object]:
        context = self._backend
        if context is None:
            context = self._backend = Context(
                conn=self.conn, peer=self.peer, route=self.route, pool=self.pool, backend=self.backend
            )
        return context

    # -- lines ----------------------------------------------------------------------------------

    def conn_event(self, logger: Logger, level: int, event: str, /, *, exc_info: object = False, **fields: object) -> None:
        """``event=EVENT conn=... FIELDS`` (``exc_info=True``: with the traceback being handled)."""
        if logger.isEnabledFor(level):
            emit(logger, level, Event(event, fields, {"conn": self.conn}), exc_info, 2)

    def peer_event(self, logger: Logger, level: int, event: str, /, **fields: object) -> None:
        """``event=EVENT conn=... peer=... FIELDS``"""
        if logger.isEnabledFor(level):
            emit(logger, level, Event(event, fields, self.peer_fields), False, 2)

    def route_event(self, logger: Logger, level: int, event: str, /, **fields: object) -> None:
        """``event=EVENT conn=... peer=... route=... FIELDS``"""
        if logger.isEnabledFor(level):
            emit(logger, level, Event(event, fields, self.route_fields), False, 2)

    def backend_event(self, logger: Logger, level: int, event: str, /, **fields: object) -> None:
        """``event=EVENT conn=... peer=... route=... pool=... backend=... FIELDS``"""
        if logger.isEnabledFor(level):
            emit(logger, level, Event(event, fields, self.backend_fields), False, 2)
