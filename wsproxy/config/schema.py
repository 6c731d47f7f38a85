"""The validated, immutable shape of a wsproxy config.

Everything here is a frozen dataclass built once by ``config.load`` from a YAML
file; nothing here reads files or validates input (that is ``load.py``'s job),
and nothing here changes after it is built. A reload builds a whole new
``Config`` and the application swaps one reference.

Units are in the names: ``*_s`` are seconds (float), ``*_bytes`` are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

PoolName = NewType("PoolName", str)
ListenerName = NewType("ListenerName", str)

#: The balancing algorithms this version implements (``pools.NAME.balance``).
BALANCE_ALGORITHMS = ("round_robin", "least_conn", "random_two", "hash")

#: Where a sticky key comes from (``pools.NAME.sticky.key``): "cookie:NAME",
#: "header:NAME", "query:NAME", "ip", "claim:NAME".
STICKY_SOURCES = ("cookie", "header", "query", "ip", "claim")

HEALTH_CHECK_TYPES = ("tcp", "http", "websocket")


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint: ``host:port`` or ``[v6]:port`` in the YAML."""

    host: str  # an IP literal (no brackets) or a DNS name
    port: int  # 0 only for listeners: the kernel picks a free port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    name: ListenerName  # unique; later also the systemd socket's FileDescriptorName
    bind: Address  # where to accept downstream connections


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    host: str = "*"  # "*", an exact name, or "*.example.com" (one or more leading labels); lower case
    path: str = "/"  # prefix, matched on whole path segments ("/chat" matches "/chat/x", not "/chatroom")
    pool: PoolName  # the pool that serves requests matching this route


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    address: Address  # where the backend accepts WebSocket upgrades (plain ws://)
    weight: int = 1  # relative share of new sessions, 1..1000
    max_connections: int = 0  # live sessions at most; a full backend is skipped; 0 = no limit


@dataclass(frozen=True, slots=True, kw_only=True)
class StickyCookieConfig:
    secret: bytes  # read from secret_file at load time (HMAC key; never logged)
    secret_file: str  # where the secret came from, for messages
    max_age_s: float = 86400.0  # the cookie's Max-Age
    same_site: str = "Lax"  # Strict | Lax | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StickyConfig:
    source: str  # one of STICKY_SOURCES
    name: str = ""  # the cookie, header, query parameter or claim name ("" for ip)
    cookie: StickyCookieConfig | None = None  # required when source == "cookie"
    on_unavailable: str = "repick"  # repick | reject (503) when the pinned backend cannot take the session


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    type: str = "tcp"  # one of HEALTH_CHECK_TYPES
    path: str = "/healthz"  # request target of http and websocket checks
    interval_s: float = 5.0  # between two checks of one backend, +-10% jitter
    timeout_s: float = 2.0  # one check, connect included
    rise: int = 2  # consecutive passes to become healthy
    fall: int = 3  # consecutive failures to become unhealthy
    expect_status: tuple[int, ...] = (200,)  # http only
    start_healthy: bool = False  # new backends take traffic before their first pass


@dataclass(frozen=True, slots=True, kw_only=True)
class PassiveHealthConfig:
    failures: int = 3  # connect failures, connect timeouts and failed upgrades within window_s
    window_s: float = 10.0
    ejection_s: float = 30.0  # first ejection; doubles on repeated ejections, capped at 10x
    max_ejected_percent: int = 50  # never more of a pool's backends ejected at once


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    name: PoolName
    balance: str = "round_robin"  # one of BALANCE_ALGORITHMS
    backends: tuple[BackendConfig, ...]  # at least one, addresses unique within the pool
    hash_balance_factor: int = 0  # hash only: no backend above ceil(factor/100 x mean) sessions; 0 = off, else > 100
    retries: int = 2  # failed connects or upgrades retried on another backend before the client sees an error
    slow_start_s: float = 0.0  # a backend that becomes healthy ramps its weight up over this time; 0 = off
    sticky: StickyConfig | None = None
    health: HealthConfig | None = None  # active checks; None = none (backends count as healthy)
    passive: PassiveHealthConfig | None = None  # passive ejection; None = off


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    handshake_s: float = 10.0  # the whole downstream request, from accept (slowloris guard)
    connect_s: float = 5.0  # TCP connect to one backend
    upstream_handshake_s: float = 10.0  # the backend's answer to the upgrade request
    idle_s: float = 600.0  # no byte in either direction of an established session


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_header_bytes: int = 16384  # request line + header block of the downstream request
    max_message_bytes: int = 16 * 1024 * 1024  # one message across its fragments; 0 = unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str  # the file it was loaded from, for messages
    listeners: tuple[ListenerConfig, ...]  # at least one; names and binds unique
    routes: tuple[RouteConfig, ...]  # first match wins
    pools: dict[PoolName, PoolConfig] = field(hash=False)  # every route's pool is here
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
