"""Counters of a running proxy and their Prometheus text rendering. No I/O here.

``Metrics`` is fed by the session and application code (``session_opened``,
``session_closed``, ``refused``, ``handshake_done``, ``reload``) and keeps
plain ints and dicts: counting is a dict update, and nothing here imports
trio, takes a lock or touches a socket. ``render`` writes the Prometheus text
exposition format, version 0.0.4 (what ``GET /metrics`` serves; ``control.admin``
is the trio shell around it). It is not a client library: there is no
registry of collectors, no push, no OpenMetrics.

What is counted where
---------------------
- Per route (``session_opened``/``session_closed``): ``wsproxy_sessions_active``
  and ``wsproxy_sessions_total{outcome}``, labelled ``route``, ``pool``,
  ``backend``, plus messages, bytes, close codes and the session duration.
  Messages and bytes of ended sessions are added when they close; what open
  sessions have relayed so far is passed to ``render`` (``live``) and added
  there, so ``wsproxy_bytes_total`` moves while a long session runs and stays
  monotonic when it ends (its bytes move from ``live`` to the totals at once).
- Per pool and backend, read from the ``Registry`` at render time:
  ``wsproxy_backend_*`` (sessions active, health, check round trip, draining,
  ejected). The registry is keyed by address, so a backend listed in two
  pools reports the same state under both.
- Process-wide: refusals by status, the handshake duration histogram,
  reloads, the config generation, sessions being drained.

Label values are escaped as the format requires (backslash, double quote,
line feed). Series are never removed: a counter that disappears and comes
back would look like a reset. Close codes that a peer may choose freely are
folded into ``3xxx`` (registered) and ``4xxx`` (private) so that a client
cannot grow the number of series.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..config.schema import Address, PoolConfig
from .registry import BackendState, Health, Registry

#: The outcomes ``session_closed`` accepts; anything else is counted as "error".
OUTCOMES = frozenset(
    {
        "normal",
        "client_gone",
        "backend_gone",
        "protocol_error",
        "invalid_data",
        "too_big",
        "rate_limited",
        "idle",
        "shutdown",
        "drain",
        "keepalive",
        "error",
    }
)

#: Upper bounds (seconds) of the handshake histogram: accept → 101 sent.
HANDSHAKE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds (seconds) of the session duration histogram: 101 sent → closed.
SESSION_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

#: The media type of what ``render`` returns.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HEALTH_STATES = tuple(Health)


@dataclass(slots=True)
class Histogram:
    """Observations counted into fixed buckets (per bucket; ``render`` accumulates)."""

    bounds: tuple[float, ...]  # upper bounds, ascending; +Inf is implied
    counts: list[int] = field(init=False)  # one per bound, and one for +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        value = max(value, 0.0)
        self.counts[bisect_left(self.bounds, value)] += 1  # "le": a value on a bound counts in it
        self.total += value
        self.count += 1

    def cumulative(self) -> Iterable[tuple[str, int]]:
        """(``le`` label, observations at most that) for every bucket, +Inf last."""
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            yield _number(bound), running


def close_code_label(code: int | None) -> str:
    """The ``code`` label of a close: exact for the codes RFC 6455 §7.4 defines, folded for the rest."""
    if code is None:
        return "none"  # the side went away without a close frame
    if 1000 <= code <= 2999:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "invalid"


class Metrics:
    """Everything ``GET /metrics`` reports that the registry and config do not already hold.

    ``started_unix`` is when the first config was loaded: it is the last
    successful (re)load until ``reload(True, ...)`` says otherwise.
    """

    __slots__ = (
        "_route_active",
        "_sessions_total",
        "_messages",
        "_bytes",
        "_close_codes",
        "_refused",
        "handshake",
        "session_duration",
        "reloads",
        "reload_failures",
        "last_reload_success_unix",
    )

    def __init__(self, *, started_unix: float = 0.0) -> None:
        self._route_active: dict[tuple[str, str, str], int] = {}  # (route, pool, backend)
        self._sessions_total: dict[tuple[str, str, str, str], int] = {}  # (route, pool, backend, outcome)
        self._messages = {"up": 0, "down": 0}
        self._bytes = {"up": 0, "down": 0}
        self._close_codes: dict[tuple[str, str], int] = {}  # (side, code label)
        self._refused: dict[int, int] = {}
        self.handshake = Histogram(HANDSHAKE_BUCKETS_S)
        self.session_duration = Histogram(SESSION_BUCKETS_S)
        self.reloads = 0  # attempts, failed ones included
        self.reload_failures = 0
        self.last_reload_success_unix = started_unix

    # -- events ---------------------------------------------------------------------------------

    def session_opened(self, route: str, pool: str, backend: str) -> None:
        """A session is established (101 sent to the client)."""
        key = (route, pool, backend)
        self._route_active[key] = self._route_active.get(key, 0) + 1

    def session_closed(
        self,
        route: str,
        pool: str,
        backend: str,
        *,
        outcome: str,
        duration_s: float,
        bytes_up: int,
        bytes_down: int,
        messages_up: int,
        messages_down: int,
        client_code: int | None,
        backend_code: int | None,
    ) -> None:
        """A session opened with ``session_opened`` has ended; ``outcome`` is one of ``OUTCOMES``."""
        key = (route, pool, backend)
        self._route_active[key] = max(self._route_active.get(key, 0) - 1, 0)
        if outcome not in OUTCOMES:
            outcome = "error"
        total_key = (route, pool, backend, outcome)
        self._sessions_total[total_key] = self._sessions_total.get(total_key, 0) + 1
        self.session_duration.observe(duration_s)
        self._bytes["up"] += max(bytes_up, 0)
        self._bytes["down"] += max(bytes_down, 0)
        self._messages["up"] += max(messages_up, 0)
        self._messages["down"] += max(messages_down, 0)
        for side, code in (("client", client_code), ("backend", backend_code)):
            code_key = (side, close_code_label(code))
            self._close_codes[code_key] = self._close_codes.get(code_key, 0) + 1

    def refused(self, status: int) -> None:
        """A handshake was answered with an HTTP error ``status``."""
        self._refused[status] = self._refused.get(status, 0) + 1

    def handshake_done(self, seconds: float) -> None:
        """A session's handshakes took ``seconds``, from accept to the 101 sent."""
        self.handshake.observe(seconds)

    def reload(self, ok: bool, *, generation: int, now_unix: float) -> None:
        """A reload was attempted; ``generation`` is the one in effect after it."""
        del generation  # the current generation is passed to render
        self.reloads += 1
        if ok:
            self.last_reload_success_unix = now_unix
        else:
            self.reload_failures += 1

    # -- rendering ------------------------------------------------------------------------------

    def render(
        self,
        *,
        registry: Registry,
        pools: Mapping[str, PoolConfig],
        generation: int,
        draining_sessions: int,
        now: float | None = None,
        live: Mapping[str, tuple[int, int]] | None = None,
    ) -> str:
        """The text format of every metric.

        ``now`` is the caller's ``trio.current_time()``, the clock ejections are
        kept in; without it ``wsproxy_backend_ejected`` has no samples.
        ``live`` maps "messages" and "bytes" to (up, down) relayed so far by the
        sessions still open.
        """
        out = _Writer()
        out.family("wsproxy_sessions_active", "gauge", "Established sessions, by route, pool and backend.")
        for (route, pool, backend), n in sorted(self._route_active.items()):
            out.sample("wsproxy_sessions_active", n, route=route, pool=pool, backend=backend)
        out.family("wsproxy_sessions_total", "counter", "Sessions ended, by route, pool, backend and outcome.")
        for (route, pool, backend, outcome), n in sorted(self._sessions_total.items()):
            out.sample("wsproxy_sessions_total", n, route=route, pool=pool, backend=backend, outcome=outcome)
        out.histogram(
            "wsproxy_session_duration_seconds", self.session_duration, "Session lifetime, from the 101 to the close."
        )
        out.histogram(
            "wsproxy_handshake_duration_seconds", self.handshake, "From accept to the 101 sent to the client."
        )
        live = live or {}
        out.family("wsproxy_messages_total", "counter", "WebSocket messages relayed, open sessions included.")
        for direction, n in self._messages.items():
            out.sample("wsproxy_messages_total", n + _live(live, "messages", direction), direction=direction)
        out.family("wsproxy_bytes_total", "counter", "Bytes relayed (frames included), open sessions included.")
        for direction, n in self._bytes.items():
            out.sample("wsproxy_bytes_total", n + _live(live, "bytes", direction), direction=direction)
        out.family(
            "wsproxy_close_codes_total", "counter", "Close codes sent by each side; none = gone without a close frame."
        )
        for (side, code), n in sorted(self._close_codes.items()):
            out.sample("wsproxy_close_codes_total", n, side=side, code=code)
        out.family("wsproxy_refused_total", "counter", "Handshakes answered with an HTTP error, by status.")
        for status, n in sorted(self._refused.items()):
            out.sample("wsproxy_refused_total", n, status=str(status))
        self._render_backends(out, registry, pools, now)
        out.family("wsproxy_reloads_total", "counter", "Config reloads attempted, failed ones included.")
        out.sample("wsproxy_reloads_total", self.reloads)
        out.family("wsproxy_reload_failures_total", "counter", "Config reloads that failed (the old config stayed).")
        out.sample("wsproxy_reload_failures_total", self.reload_failures)
        out.family(
            "wsproxy_last_reload_success_timestamp_seconds", "gauge", "Unix time of the last successful config load."
        )
        out.sample("wsproxy_last_reload_success_timestamp_seconds", self.last_reload_success_unix)
        out.family("wsproxy_config_generation", "gauge", "The config generation in effect (1 = the first load).")
        out.sample("wsproxy_config_generation", generation)
        out.family("wsproxy_draining_sessions", "gauge", "Sessions that are being drained and will be closed.")
        out.sample("wsproxy_draining_sessions", draining_sessions)
        return out.text()

    @staticmethod
    def _render_backends(
        out: _Writer, registry: Registry, pools: Mapping[str, PoolConfig], now: float | None
    ) -> None:
        states: dict[Address, BackendState] = {state.address: state for state in registry}
        rows: list[tuple[str, str, BackendState]] = []
        for pool_name, pool_config in pools.items():
            for backend_config in pool_config.backends:
                address = backend_config.address
                rows.append((pool_name, str(address), states.get(address) or BackendState(address)))
        out.family(
            "wsproxy_backend_sessions_active", "gauge", "Sessions on a backend (being established included)."
        )
        for pool, backend, state in rows:
            out.sample("wsproxy_backend_sessions_active", state.active, pool=pool, backend=backend)
        out.family("wsproxy_backend_up", "gauge", "1 if the backend's health is up, 0 if down or not known yet.")
        for pool, backend, state in rows:
            out.sample("wsproxy_backend_up", int(state.health is Health.UP), pool=pool, backend=backend)
        out.family("wsproxy_backend_health", "gauge", "1 for the backend's current health state, 0 for the others.")
        for pool, backend, state in rows:
            for health in _HEALTH_STATES:
                value = int(state.health is health)
                out.sample("wsproxy_backend_health", value, pool=pool, backend=backend, state=health.value)
        out.family(
            "wsproxy_backend_check_rtt_seconds", "gauge", "Round trip of the last passed active health check."
        )
        for pool, backend, state in rows:
            if state.rtt_s is not None:
                out.sample("wsproxy_backend_check_rtt_seconds", state.rtt_s, pool=pool, backend=backend)
        out.family("wsproxy_backend_draining", "gauge", "1 if the backend is draining (takes no new sessions).")
        for pool, backend, state in rows:
            out.sample("wsproxy_backend_draining", int(state.draining), pool=pool, backend=backend)
        out.family("wsproxy_backend_ejected", "gauge", "1 if passive health has ejected the backend for now.")
        if now is not None:
            for pool, backend, state in rows:
                out.sample("wsproxy_backend_ejected", int(state.ejected(now)), pool=pool, backend=backend)


def _live(live: Mapping[str, tuple[int, int]], what: str, direction: str) -> int:
    up, down = live.get(what, (0, 0))
    return up if direction == "up" else down


class _Writer:
    """Lines of the text format, one family at a time."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, type_: str, help_: str) -> None:
        self._lines.append(f"# HELP {name} {escape_help(help_)}")
        self._lines.append(f"# TYPE {name} {type_}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
            self._lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, histogram: Histogram, help_: str) -> None:
        self.family(name, "histogram", help_)
        for le, n in histogram.cumulative():
            self.sample(f"{name}_bucket", n, le=le)
        self.sample(f"{name}_sum", histogram.total)
        self.sample(f"{name}_count", histogram.count)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def escape_label_value(value: str) -> str:
    """A label value as the text format writes it between double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and line feed escaped (quotes are not)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
