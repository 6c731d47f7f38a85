"""The proxy's metrics: the counters fed at session boundaries.

What this is: ``Metrics`` holds the few numbers nothing else keeps (sessions
closed by outcome, close codes, refusals, handshake and upstream histograms,
the event loop's lag), as plain ints and lists that are updated once per
session, per refusal or per handshake, never per frame or per message; and
``measure_loop_lag``, the probe that feeds the lag histogram.

What this is not: the exposition. ``control.exposition`` builds every
``wsproxy_*`` family from these counters and from the state the proxy keeps
anyway when ``/metrics`` is scraped. Nor a place for per-frame work (the relay
counts into plain integers, which are read there), nor global: each ``App``
has its own ``Metrics``.

Close codes that a peer may choose freely are folded into ``3xxx``
(registered) and ``4xxx`` (private), and refusal reasons are a fixed
vocabulary, so no client can grow the number of series.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import trio
from prometheus_client.utils import floatToGoString

from ..proto.routing import NO_ROUTE as NO_ROUTE  # re-exported: what App counts shed connections under

#: Upper bounds (seconds) of the handshake histogram: accept → 101 sent.
HANDSHAKE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds (seconds) of the upstream connect and upgrade histograms.
UPSTREAM_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Upper bounds (seconds) of the session duration histogram: 101 sent → closed.
SESSION_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
#: Upper bounds (seconds) of how late the loop-lag probe's sleep woke up.
LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: How often the loop-lag probe sleeps and measures.
LOOP_LAG_INTERVAL_S = 0.25

#: ``status`` label of a refusal that was not answered (the connection was closed).
NO_ANSWER = "none"

#: The media type of the text format (prometheus_client's own, for tests and the admin API).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SENDERS = (("client", "backend"), ("backend", "client"))  # (sent_by, to) of the codes the peers sent


@dataclass(slots=True)
class Histogram:
    """Observations counted into fixed buckets: one list index and two adds per observation."""

    bounds: tuple[float, ...]  # upper bounds, ascending; +Inf is implied
    counts: list[int] = field(init=False)  # one per bound, and one for +Inf (not cumulative)
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

    def buckets(self) -> list[tuple[str, float]]:
        """(``le``, observations at most that), cumulative, ``+Inf`` last: what a histogram sample needs."""
        running = 0
        out = []
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append((floatToGoString(bound), float(running)))
        return out


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
    """What ``/metrics`` reports that the registry, the sessions and the config do not already hold.

    Fed by the edge: ``session_closed`` once per session, ``refused`` once per
    refusal (by ``edge.refusal.refuse`` only), ``handshake_done`` and
    ``upstream_*`` once per session set-up; ``loop_lag`` by ``measure_loop_lag``.
    """

    __slots__ = (
        "started_unix",
        "sessions_closed",
        "closed_count",
        "close_codes",
        "refusals",
        "handshake",
        "session_duration",
        "upstream_connect",
        "upstream_handshake",
        "loop_lag",
        "loop_lag_last_s",
    )

    def __init__(self, *, started_unix: float | None = None) -> None:
        self.started_unix = time.time() if started_unix is None else started_unix
        #: (route, pool, backend, outcome) → sessions ended
        self.sessions_closed: dict[tuple[str, str, str, str], int] = {}
        self.closed_count = 0  # every session ended (sessions_closed forgets gone backends)
        #: (sent_by, to, code label) → close frames (or "none": gone without one)
        self.close_codes: dict[tuple[str, str, str], int] = {}
        #: (route, reason, status) → refusals
        self.refusals: dict[tuple[str, str, str], int] = {}
        self.handshake = Histogram(HANDSHAKE_BUCKETS_S)
        self.session_duration = Histogram(SESSION_BUCKETS_S)
        #: (pool, backend) → histogram of successful connects (TCP, and TLS for wss:// backends)
        self.upstream_connect: dict[tuple[str, str], Histogram] = {}
        #: (pool, backend) → histogram of accepted upgrades (request sent → 101 read)
        self.upstream_handshake: dict[tuple[str, str], Histogram] = {}
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS_S)
        self.loop_lag_last_s = 0.0

    # -- events ---------------------------------------------------------------------------------

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
    ) -> None:
        """A session (101 sent) has ended.

        ``client_code`` and ``backend_code`` are what each peer sent (None: it
        went away without a close frame); ``proxy_to_*`` the codes of close
        frames the proxy sent of its own (None: it sent none that way).
        """
        key = (route, pool, backend, outcome)
        self.sessions_closed[key] = self.sessions_closed.get(key, 0) + 1
        self.closed_count += 1
        self.session_duration.observe(duration_s)
        codes = self.close_codes
        for (sent_by, to), code in zip(_SENDERS, (client_code, backend_code)):
            code_key = (sent_by, to, close_code_label(code))
            codes[code_key] = codes.get(code_key, 0) + 1
        for to, code in (("client", proxy_to_client), ("backend", proxy_to_backend)):
            if code is not None:
                code_key = ("proxy", to, close_code_label(code))
                codes[code_key] = codes.get(code_key, 0) + 1

    def refused(self, route: str, reason: str, status: int | None, count: int = 1) -> None:
        """A connection was refused (``status`` None: closed without an answer)."""
        key = (route, reason, NO_ANSWER if status is None else str(status))
        self.refusals[key] = self.refusals.get(key, 0) + count

    def handshake_done(self, seconds: float) -> None:
        """A session's handshakes took ``seconds``, from accept to the 101 sent."""
        self.handshake.observe(seconds)

    def upstream_connected(self, pool: str, backend: str, seconds: float) -> None:
        """A connect to ``backend`` (and its TLS handshake, if any) succeeded in ``seconds``."""
        histogram = self.upstream_connect.get((pool, backend))
        if histogram is None:
            histogram = self.upstream_connect[(pool, backend)] = Histogram(UPSTREAM_BUCKETS_S)
        histogram.observe(seconds)

    def upstream_upgraded(self, pool: str, backend: str, seconds: float) -> None:
        """``backend`` answered the upgrade with a valid 101 ``seconds`` after the request was sent."""
        histogram = self.upstream_handshake.get((pool, backend))
        if histogram is None:
            histogram = self.upstream_handshake[(pool, backend)] = Histogram(UPSTREAM_BUCKETS_S)
        histogram.observe(seconds)

    def forget_backends(self, current: set[tuple[str, str]]) -> None:
        """Drop what was counted for (pool, backend) pairs that are no longer in the config."""
        for table in (self.upstream_connect, self.upstream_handshake):
            for key in [k for k in table if k not in current]:
                del table[key]
        for closed in [k for k in self.sessions_closed if (k[1], k[2]) not in current]:
            del self.sessions_closed[closed]


async def measure_loop_lag(metrics: Metrics, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep ``interval_s`` again and again; how late each wake-up is, is the event loop's lag.

    A task that hogs the loop (a long synchronous call, a flood of ready
    sockets) delays every other task by as much; this probe is delayed too
    and records it in ``wsproxy_event_loop_lag_seconds``.
    """
    while True:
        start = trio.current_time()
        await trio.sleep(interval_s)
        lag_s = max(trio.current_time() - start - interval_s, 0.0)
        metrics.loop_lag_last_s = lag_s
        metrics.loop_lag.observe(lag_s)
