"""What a session needs from the process that serves it, as Protocols. No I/O here.

``edge.session`` serves one connection; the ``App`` (``wsproxy.app``) owns
what connections share. The session sees the App only as a ``SessionHost``:
the current generation of the config, the backend registry, the metrics it
feeds, the relay engine, and a few calls with a meaning where a session
changes shared state (a connection counted, a session established or ended,
its identity counted against a cap, its lifetime set). So the edge never
imports ``app`` or ``control``: the App satisfies these Protocols
structurally (``app.py`` checks it for mypy, ``tests/test_host.py`` at run
time), and what a session may do to the process is this page.

What this is not: how the App does it (``control.session_admin`` for the
identity caps, ``control.lifetime`` for deadlines, ``proto.limits`` for the
per-client counts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from .refusal import RefusalCounter
from .upstream import UpstreamTimings

if TYPE_CHECKING:
    from ..balance.policy import Selector
    from ..balance.registry import Registry
    from ..config.schema import Config, LimitsConfig, PoolConfig, PoolName, RouteConfig
    from ..proto.handshake import Rejection, Upgrade
    from ..proto.routing import Router
    from .engine import Engine
    from .gate import Admitted, RouteGate
    from .jwks import JwksFetcher
    from .refusal import Refused
    from .session import Session
    from .tickets import SessionTickets


class SessionMetrics(RefusalCounter, UpstreamTimings, Protocol):
    """What a session counts (``control.metrics.Metrics``): refusals, set-up times, its end."""

    def handshake_done(self, seconds: float) -> None: ...

    def session_closed(
        self,
        route: str,
        pool: str,
        backend: str,
        *,
        outcome: str,
        duration_s: float,
        client_code: int | None,
        backend_code: int | None,
        proxy_to_client: int | None = None,
        proxy_to_backend: int | None = None,
    ) -> None: ...


class SessionGeneration(Protocol):
    """One loaded config and what is built from it (``app.Generation``); a session keeps the one it started with."""

    @property
    def config(self) -> Config: ...

    @property
    def router(self) -> Router: ...

    @property
    def selectors(self) -> Mapping[PoolName, Selector]: ...

    @property
    def gates(self) -> Mapping[int, RouteGate]: ...  # by id() of a route of this config


class SessionHost(Protocol):
    """Everything ``edge.session`` reads and calls on the process serving it (``app.App``)."""

    # -- what a session reads

    @property
    def generation(self) -> SessionGeneration: ...  # the current one, taken at accept time

    @property
    def registry(self) -> Registry: ...  # backend state: plans read it, leases count in it

    @property
    def metrics(self) -> SessionMetrics: ...

    @property
    def engine(self) -> Engine | None: ...  # None: each session relays with trio pumps

    @property
    def jwks(self) -> JwksFetcher: ...  # routes' jwks_url keys

    @property
    def tickets(self) -> SessionTickets: ...  # TLS contexts with the listener's ticket keys

    @property
    def stopping(self) -> bool: ...  # shutting down: a session established now closes with 1001 at once

    def next_conn_id(self) -> str: ...

    # -- what a session changes, each with its counterpart

    def admit_connection(self, client_ip: str, now: float, limits: LimitsConfig) -> Rejection | None:
        """May a connection from ``client_ip`` be served? None: yes, and it counts until ``connection_closed``."""
        ...

    def connection_closed(self, client_ip: str) -> None: ...

    def admit_lifetime(self, session: Session, route: RouteConfig, admitted: Admitted) -> Refused | None:
        """A revoked credential's refusal, or None and the session has its deadline (token expiry, lifetime)."""
        ...

    def admit_identity(
        self, session: Session, pool: PoolConfig, up: Upgrade, claims: Mapping[str, object] | None, limits: LimitsConfig
    ) -> Rejection | None:
        """Count ``session`` against its identity's cap (if it has one): None, or the 429. Undone by ``release_identity``."""
        ...

    def release_identity(self, session: Session) -> None: ...

    def session_established(self, session: Session) -> None:
        """Both handshakes are done: the session is listed, its cap count and ``max_session_age`` start."""
        ...

    def session_ended(self, session: Session) -> None:
        """Its relay has ended: it leaves the list of established sessions."""
        ...
