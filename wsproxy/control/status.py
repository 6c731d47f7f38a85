"""The JSON of ``GET /status``: a snapshot of the running proxy. No I/O here.

Built from the ``App``'s current generation, its registry and its open
sessions; byte and message totals add what open sessions have relayed so far
to what ended sessions left in the registry. It carries everything the status
page shows (the page does not read ``/metrics``): ``sessions_closed`` and
``refused`` (with ``refused_by_reason``) are the process totals behind
``wsproxy_sessions_closed_total`` and ``wsproxy_refused_total``; ``reloads``
counts attempts, failed ones included, like ``wsproxy_reloads_total``, so
"3 (1 failed)" means two applied and one refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import trio

from ..config.schema import Address, PoolName, hostport
from .exposition import MetricsSource
from .ready import OpenListener


class _Removals(Protocol):
    def removing(self, pool: PoolName) -> list[Address]: ...  # ``control.drain.Drainer``


class _DiscoveryStatus(Protocol):
    def status(self, name: PoolName) -> dict[str, object] | None: ...  # ``control.discovery.Discovery``


class StatusSource(MetricsSource, Protocol):
    """What the snapshot reads from the running process (``wsproxy.app.App``): the collector's view and more."""

    @property
    def connection_count(self) -> int: ...

    @property
    def last_reload_error(self) -> str | None: ...

    @property
    def drainer(self) -> _Removals: ...

    @property
    def discovery(self) -> _DiscoveryStatus: ...

    @property
    def listeners(self) -> Mapping[str, OpenListener]: ...

    @property
    def addresses(self) -> dict[str, list[tuple[str, int]]]: ...


def snapshot(app: StatusSource) -> dict[str, object]:
    config = app.generation.config
    now = trio.current_time()
    live: dict[Address, list[int]] = {}  # what open sessions relayed so far, by backend
    for session in app.sessions.values():
        if session.relay is not None and session.backend is not None:
            relay = session.relay
            counts = live.setdefault(session.backend.address, [0, 0, 0, 0])
            counts[0] += relay.bytes_up
            counts[1] += relay.bytes_down
            counts[2] += relay.up.scanner.messages
            counts[3] += relay.down.scanner.messages
    totals = list(app.registry.retired)  # backends forgotten since, then every one still known
    for state in app.registry:
        extra = live.get(state.address, [0, 0, 0, 0])
        for i, value in enumerate((state.bytes_up, state.bytes_down, state.messages_up, state.messages_down)):
            totals[i] += value + extra[i]
    refused_by_reason: dict[str, int] = {}
    for (_route, reason, _status), n in app.metrics.refusals.items():
        refused_by_reason[reason] = refused_by_reason.get(reason, 0) + n
    pools: dict[str, object] = {}
    known = {state.address: state for state in app.registry}
    for name, pool in config.pools.items():
        backends = []
        for backend in pool.backends:
            state = app.registry.state(backend.address)
            health = app.registry.health(name, backend.address)
            extra = live.get(backend.address, [0, 0, 0, 0])
            backends.append(
                {
                    "address": str(backend.address),
                    "name": backend.name,
                    "weight": backend.weight,
                    "source": backend.source,  # "config" or "dns" (pools.NAME.discovery)
                    "priority": backend.priority,
                    "health": health.health.value,
                    "last_check": health.last_check,
                    "rtt_s": health.rtt_s,
                    "active": state.active,
                    "total": state.total,
                    "draining": state.draining,
                    "ejected": health.ejected(now),
                    "available": app.registry.available(name, backend, now),
                    "bytes_up": state.bytes_up + extra[0],
                    "bytes_down": state.bytes_down + extra[1],
                    "messages_up": state.messages_up + extra[2],
                    "messages_down": state.messages_down + extra[3],
                }
            )
        removed = []
        for address in app.drainer.removing(name):  # left the pool (reload or DNS); its sessions drain
            gone = known.get(address)
            removed.append({
                "address": str(address), "removed": True, "draining": True, "ejected": False, "available": False,
                "health": app.registry.health(name, address).health.value if gone is not None else "unknown",
                "active": gone.active if gone is not None else 0, "total": gone.total if gone is not None else 0,
            })
        # "available": how many could take a new session now; 0 means clients get 503
        entry: dict[str, object] = {
            "balance": pool.balance,
            "available": sum(1 for b in backends if b["available"]),
            "backends": backends,
            "removed": removed,
        }
        found = app.discovery.status(name)
        if found is not None:
            entry["discovery"] = found
        pools[name] = entry
    return {
        "generation": app.generation.number,
        "sessions": len(app.sessions),
        "draining_sessions": sum(1 for s in app.sessions.values() if s.draining),
        "connections": app.connection_count,
        "last_reload_unix": app.last_reload_unix,
        "last_reload_error": app.last_reload_error,
        "started_unix": app.metrics.started_unix,
        "reloads": app.reloads + app.reload_failures,  # attempts, as in wsproxy_reloads_total
        "reload_failures": app.reload_failures,
        "sessions_closed": app.metrics.closed_count,
        "refused": sum(app.metrics.refusals.values()),
        "refused_by_reason": refused_by_reason,
        "bytes_up": totals[0],
        "bytes_down": totals[1],
        "messages_up": totals[2],
        "messages_down": totals[3],
        "listeners": [
            {"name": name, "addresses": [hostport(h, p) for h, p in addresses], "tls": app.listeners[name].spec.tls is not None}
            for name, addresses in app.addresses.items()
        ],
        "routes": [
            {"host": r.host, "path": r.path, "pool": r.pool, "auth": r.auth.mode if r.auth else None}
            for r in config.routes
        ],
        "pools": pools,
    }

