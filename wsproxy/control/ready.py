"""What ``GET /ready`` answers: is this process ready for new clients? No I/O here.

Ready means all of:

- the App is not shutting down (a draining process must leave the balancer's
  rotation before its listeners close);
- every listener of the config is open;
- each pool that counts has at least one *available* backend (healthy, not
  draining, not ejected, not full: ``BackendState.available``), so a new
  client of it would not get 503. The pools that count are
  ``admin.ready_pools`` when set, else every pool a route names.

``GET /healthz`` needs none of this: it answers 200 as long as the admin
listener answers at all (the process and its event loop are alive).

This module only decides; ``control.admin_http`` serves the answer (200, or
503 with the reasons as JSON).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

import trio

from ..balance.registry import Registry
from ..config.schema import Config, ListenerConfig, PoolName


class OpenListener(Protocol):
    """A listener of the running process (``app.ListenerSlot``): its settings and its sockets (none: closed)."""

    @property
    def spec(self) -> ListenerConfig: ...

    @property
    def sockets(self) -> Sequence[socket.socket]: ...


class _Generation(Protocol):
    @property
    def config(self) -> Config: ...


class ReadySource(Protocol):
    """What readiness reads from the running process (``wsproxy.app.App``)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def generation(self) -> _Generation: ...

    @property
    def listeners(self) -> Mapping[str, OpenListener]: ...

    @property
    def registry(self) -> Registry: ...


def available_by_pool(config: Config, registry: Registry, now: float, reasons: list[str]) -> dict[str, int]:
    """Available backends of each pool that counts for readiness (``admin.ready_pools``, else every
    route's pool); a pool with none adds its reason to ``reasons``. Shared with the supervisor."""
    wanted = config.admin.ready_pools if config.admin and config.admin.ready_pools is not None else None
    names = list(wanted) if wanted is not None else list(dict.fromkeys(route.pool for route in config.routes))
    counts: dict[str, int] = {}
    for name in names:
        pool = config.pools.get(PoolName(name))
        if pool is None:
            continue
        counts[name] = sum(1 for b in pool.backends if registry.available(name, b, now))
        if not counts[name]:
            reasons.append(f"pool {name} has no available backend")
    return counts


def readiness(app: ReadySource) -> tuple[bool, dict[str, object]]:
    """(ready, the JSON body): ``{"ready": bool, "reasons": [...], "pools": {name: available count}}``."""
    config = app.generation.config
    reasons: list[str] = []
    if app.stopping:
        reasons.append("shutting down")
    for spec in config.listeners:
        slot = app.listeners.get(spec.name)
        if slot is None or not slot.sockets:
            reasons.append(f"listener {spec.name} is not open")
    counts = available_by_pool(config, app.registry, trio.current_time(), reasons)
    return not reasons, {"ready": not reasons, "reasons": reasons, "pools": counts}
