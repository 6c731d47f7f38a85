"""Health verdicts as data: what the supervisor's checks found, and how a worker takes them. No I/O here.

The supervisor runs one ``HealthChecker`` per pool (so N workers do not
multiply health traffic) and sends the health of every (pool, backend) of its
config to every worker: at start, after every change, and once a second (for the round trip
times). Times travel as ages (``up_for_s``), since each process has its own
clock origin. Passive health (ejections after failed connects) stays per
worker: each sees its own failures.
"""

from __future__ import annotations

from typing import Any

from ..config.schema import Address, Config, PoolName
from ..balance.registry import Health, Registry


def table(registry: Registry, config: Config, now: float) -> list[dict[str, Any]]:
    """Every (pool, backend) health the checks keep, as sent in a ``health`` message."""
    entries = []
    for name, pool in config.pools.items():
        for backend in pool.backends:
            state = registry.health(name, backend.address)
            entries.append(
                {
                    "pool": name,
                    "host": backend.address.host,
                    "port": backend.address.port,
                    "health": state.health.value,
                    "last_check": state.last_check,
                    "rtt_s": state.rtt_s,
                    "up_for_s": None if state.up_since is None else max(0.0, now - state.up_since),
                }
            )
    return entries


def apply(registry: Registry, backends: list[dict[str, Any]], now: float) -> None:
    """Take the supervisor's verdicts into a worker's registry (passive health, ejections, stays the worker's)."""
    for entry in backends:
        state = registry.health(str(entry["pool"]), Address(str(entry["host"]), int(entry["port"])))
        state.health = Health(entry["health"])
        state.last_check = str(entry.get("last_check", ""))
        state.rtt_s = entry.get("rtt_s")
        up_for_s = entry.get("up_for_s")
        state.up_since = None if up_for_s is None else now - float(up_for_s)


def changes(entries: list[list[Any]]) -> list[tuple[PoolName, Address, Health]]:
    """``[[pool, host, port, health], ...]`` of a ``health`` message as typed tuples."""
    return [(PoolName(str(p)), Address(str(h), int(port)), Health(str(v))) for p, h, port, v in entries]
