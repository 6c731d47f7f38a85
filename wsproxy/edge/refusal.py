"""Every refusal as one value, and the one function that answers, logs and counts it (trio shell).

A connection can be refused at many stages (a bad PROXY header, admission
limits, a request that is not a valid upgrade, no route, Origin,
credentials, no backend, a failed or refusing backend). Each stage turns its
verdict into a ``Refused``: a ``Reason`` from a small fixed vocabulary (the
``reason`` label of ``wsproxy_refused_total``), the HTTP status (None: the
connection is closed without an answer), the sentence for the log, and what
to send. ``refuse`` is then the only code that reacts: one
``event=refused`` line, one count, one answer.

What this is not: the decisions (they live in ``proto``, ``balance`` and
``edge.gate``), nor the accept loop's shedding while out of descriptors,
which answers without a session and without awaiting (``edge.listener``;
``App`` counts those as ``reason=overload``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..proto.handshake import TEXT_PLAIN, Rejection, http_error, http_response
from .channel import RawChannel
from .request import send_final
from .session_log import SessionLog

# The session's logger: an operator follows one connection under one name.
log = logging.getLogger("wsproxy.edge.session")


class Reason(str, enum.Enum):
    """Why a connection was refused: the ``reason`` label (fixed, so clients cannot add series)."""

    PROXY_HEADER = "proxy_header"  # PROXY protocol header missing, invalid or late (no answer)
    TIMEOUT = "timeout"  # no complete request within timeouts.handshake (408, or no answer if nothing came)
    UPGRADE = "upgrade"  # not a valid HTTP request or not a valid WebSocket upgrade (400/426/431)
    NO_ROUTE = "no_route"  # no route for the host and path (404)
    ORIGIN = "origin"  # Origin not allowed or missing (403)
    SUBPROTOCOL = "subprotocol"  # no offered subprotocol is allowed on the route, or none offered where one is required (400)
    AUTH = "auth"  # credentials missing or refused, by the proxy or the auth service (401/403)
    AUTH_UNAVAILABLE = "auth_unavailable"  # the forward-auth service failed or did not answer (503)
    REVOKED = "revoked"  # the credential's jti or subject is on the route's revoked_file (403)
    LIMIT = "limit"  # max_connections (503), max_connections_per_ip, handshake_rate_per_ip (429)
    IDENTITY_LIMIT = "identity_limit"  # limits.max_sessions_per_identity with on_identity_limit: refuse (429)
    NO_BACKEND = "no_backend"  # every backend of the pool is down, draining or full (503)
    OVERLOAD = "overload"  # the proxy itself ran out of descriptors, buffers or ports (503)
    UPSTREAM_FAILED = "upstream_failed"  # no backend could be connected or upgraded (502)
    UPSTREAM_TIMEOUT = "upstream_timeout"  # a backend accepted the connection but never answered (504)
    BACKEND_REFUSED = "backend_refused"  # the backend answered the upgrade with an HTTP response (relayed)


@dataclass(frozen=True, slots=True)
class Refused:
    """One refusal: why, what status, the log's sentence, and the exact response (None: built from the status)."""

    reason: Reason
    status: int | None  # None: closed without an answer
    detail: str  # for the log, never for the client
    response: bytes | None = None  # a response to send as it is (a backend's or the auth service's)
    fields: tuple[tuple[str, str], ...] = ()  # more log fields, before status and reason (pool=...)

    @classmethod
    def of(cls, reason: Reason, rejection: Rejection) -> Refused:
        """A sans-I/O verdict: answered with its status, its headers and the reason phrase."""
        return cls(reason, rejection.status, rejection.reason, http_error(rejection))

    @classmethod
    def relayed(
        cls,
        reason: Reason,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        detail: str,
        fields: tuple[tuple[str, str], ...] = (),
    ) -> Refused:
        """Somebody else's answer (a backend's, the auth service's), passed on as it was."""
        return cls(reason, status, detail, http_response(status, list(headers), body), fields)

    @classmethod
    def plain(
        cls, reason: Reason, status: int, detail: str, body: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> Refused:
        """An answer of the proxy's own with a short text body (``pool chat: no backend available``)."""
        return cls(reason, status, detail, http_response(status, [*headers, TEXT_PLAIN], body.encode()))


class RefusalCounter(Protocol):
    """Where refusals are counted (``control.metrics.Metrics``)."""

    def refused(self, route: str, reason: str, status: int | None, count: int = 1) -> None: ...


async def refuse(client: RawChannel, refused: Refused, *, session: SessionLog, counter: RefusalCounter) -> None:
    """Log ``refused`` in one line, count it, and answer it (if it has an answer), then close gently.

    The line and the count carry the session's route: its label, or ``-`` before one matched.
    """
    session.route_event(
        log, logging.INFO, "refused", kind=refused.reason.value, **dict(refused.fields),
        status=refused.status, reason=refused.detail,
    )  # fmt: skip
    counter.refused(session.route, refused.reason.value, refused.status)
    if refused.status is not None:
        response = refused.response
        if response is None:
            response = http_error(Rejection(refused.status, refused.detail))
        await send_final(client, response)
