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
BALANCE_ALGORITHMS = ("round_robin",)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    name: PoolName
    balance: str = "round_robin"  # one of BALANCE_ALGORITHMS
    backends: tuple[BackendConfig, ...]  # at least one, addresses unique within the pool


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
