"""What the supervisor's admin API shows and does (a part of ``supervisor.main``): status, metrics, readiness, drains.

The admin listener (``control.admin.AdminServer``) serves the supervisor as
it serves one process's ``App``: ``AdminView`` is that interface
(``control.admin_routes.AdminApp``), answered from the workers' last reports
(``merge``) and the supervisor's own state (health checks, reloads). The
sessions API is asked of the workers (``sessions_api.SessionsAcross``), and
of the generation an upgrade retires, until it has exited; ``/status`` says
it is there (``retiring``: its pid, sessions, workers and deadline, from its
last summary, ``merge.retiring_summary``), and null when there is none;
``/metrics`` adds its series, labelled ``generation="retiring"``, from the
metrics sent with that summary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from ..config.schema import PoolName, hostport
from ..control.ready import available_by_pool
from .merge import merge_metrics, merge_status
from .state import SupervisorState
from .table import WorkerState


log = logging.getLogger("wsproxy.supervisor")


class AdminView(SupervisorState):
    """``Supervisor``'s part that the admin API reads and calls."""

    def status_line(self) -> str:
        sessions = sum(int((s.report or {}).get("sessions", 0) or 0) for s in self.slots)
        ready = sum(1 for s in self.slots if s.state is WorkerState.READY)
        return f"{sessions} session{'' if sessions == 1 else 's'}, {ready}/{self.count} workers, config generation {self.generation}"

    def workers_view(self) -> list[dict[str, Any]]:
        view = []
        for slot in self.slots:
            report = slot.report or {}
            own = report.get("worker") or {}
            view.append(
                {
                    "slot": slot.index, "pid": slot.pid, "state": slot.state.value,
                    "sessions": report.get("sessions"), "connections": report.get("connections"),
                    "restarts": slot.restarts, "started_unix": slot.started_unix,
                    "rss_bytes": own.get("rss_bytes"), "loop_lag_s": own.get("loop_lag_s"),
                    "generation": report.get("generation"), "adopted_by": slot.adopted_by,
                }
            )
        return view

    def status(self) -> dict[str, object]:
        config = self.config
        now = trio.current_time()
        pools: dict[str, object] = {}
        for name, pool in config.pools.items():
            backends = []
            for backend in pool.backends:
                verdict = self.registry.health(name, backend.address)
                backends.append(
                    {
                        "address": str(backend.address), "weight": backend.weight, "health": verdict.health.value,
                        "last_check": verdict.last_check, "rtt_s": verdict.rtt_s,
                        "draining": (name, str(backend.address)) in self.draining,
                        "ejected": False, "available": self.registry.available(name, backend, now),
                    }
                )
            pools[name] = {"balance": pool.balance, "backends": backends}
        base: dict[str, Any] = {
            "pid": os.getpid(),  # the supervisor's (an upgrade changes it)
            "generation": self.generation,
            "last_reload_unix": self.reload_record.last_unix,
            "last_reload_error": self.reload_record.last_error,
            "started_unix": self.metrics.started_unix,
            "reloads": self.reload_record.applied + self.reload_record.failed,
            "reload_failures": self.reload_record.failed,
            "listeners": [
                {
                    "name": spec.name,
                    "addresses": [hostport(*s.getsockname()[:2]) for s in self.sockets.get(spec.name, [[]])[0]],
                    "tls": spec.tls is not None,
                }
                for spec in config.listeners
            ],
            "routes": [
                {"host": r.host, "path": r.path, "pool": r.pool, "auth": r.auth.mode if r.auth else None}
                for r in config.routes
            ],
            "pools": pools,
            "retiring": dict(self.older_summary) if self.older is not None and self.older_summary else None,
        }
        reports = [s.report for s in self.slots if s.report is not None]
        return merge_status(base, reports, self.workers_view())

    def _own_series(self) -> list[tuple[str, str, str, float]]:
        return [
            ("wsproxy_reloads", "counter", "Reloads attempted (failed ones included).", float(self.reload_record.applied + self.reload_record.failed)),
            ("wsproxy_reload_failures", "counter", "Reloads refused.", float(self.reload_record.failed)),
            ("wsproxy_workers", "gauge", "Worker processes serving.",
             float(sum(1 for s in self.slots if s.state is WorkerState.READY))),
            ("wsproxy_worker_restarts", "counter", "Worker processes restarted after they exited.",
             float(sum(s.restarts for s in self.slots))),
        ]

    def _retiring_metrics(self) -> str | None:
        """The retiring generation's metrics (its last ``retiring`` message) while it is there, else None."""
        return self.older_metrics if self.older is not None else None

    def render_metrics(self, accept: str | None = None) -> tuple[str, bytes]:
        """The workers' last metrics merged: OpenMetrics if ``accept`` asks for it, else the text format.

        During an upgrade's window, with the retiring generation's series
        labelled ``generation="retiring"`` (``merge.merge_families``).
        """
        return self._merge(accept)()

    async def render_metrics_off_loop(self, accept: str | None = None) -> tuple[str, bytes]:
        """``GET /metrics``: the reports are taken on the loop, parsed, merged and encoded in a thread."""
        return await trio.to_thread.run_sync(self._merge(accept))

    def _merge(self, accept: str | None) -> Callable[[], tuple[str, bytes]]:
        """The merge of what the workers (and a retiring generation) last reported, taken now, to run later."""
        reports = [(s.index, s.metrics) for s in self.slots if s.metrics]
        return partial(merge_metrics, reports, self._own_series(), accept, retiring=self._retiring_metrics())

    def readiness(self) -> tuple[bool, dict[str, object]]:
        reasons: list[str] = []
        if self.stopping or self.retired:
            reasons.append("shutting down")
        down = [s.index for s in self.slots if s.state is not WorkerState.READY]
        if down:
            reasons.append(f"worker(s) {','.join(map(str, down))} not serving")
        counts = available_by_pool(self.config, self.registry, trio.current_time(), reasons)
        return not reasons, {"ready": not reasons, "reasons": reasons, "pools": counts}

    def drain_backend(self, pool: str, address: str) -> bool | None:
        return self._drain(pool, address, undo=False)

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        return self._drain(pool, address, undo=True)

    def _drain(self, pool: str, address: str, *, undo: bool) -> bool | None:
        config = self.config.pools.get(PoolName(pool))
        if config is None or not any(str(b.address) == address for b in config.backends):
            return None
        key = (pool, address)
        if (key in self.draining) != undo:
            return False
        if undo:
            self.draining.discard(key)
        else:
            self.draining.add(key)
        assert self._nursery is not None
        self._nursery.start_soon(self._broadcast, {"t": "drain", "pool": pool, "backend": address, "undo": undo})
        return True
