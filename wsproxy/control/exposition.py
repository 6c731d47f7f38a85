"""What ``/metrics`` answers: a prometheus_client collector read at scrape time.

What this is: ``WsproxyCollector`` builds every ``wsproxy_*`` family when
``/metrics`` is scraped, from ``control.metrics``' counters and from the state
the proxy keeps anyway (the backend ``Registry``, the open sessions and their
relay counters, the config in effect). On the event loop a scrape only copies
numbers (a snapshot); ``render_off_loop`` builds and encodes the series in a
worker thread. ``render`` adds the standard process, platform and GC
collectors and answers in the text format or, when the scraper's ``Accept``
asks for it, in OpenMetrics.

What this is not: an HTTP server (``control.admin_http`` serves the answer),
nor global: each ``App`` has its own ``CollectorRegistry``, so several can run
in one process (the tests do).

Series of a backend exist while it is in some pool of the config in effect:
they come from the config at scrape time, and what was counted for a
backend that left every pool is forgotten at the next scrape (if it comes
back, its counters restart from 0, which Prometheus reads as a reset).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..balance.registry import Health, Registry
from ..log import log_event
from ..proto.routing import route_label
from .metrics import LOOP_LAG_INTERVAL_S, Histogram, Metrics

if TYPE_CHECKING:
    from ..config.schema import BackendConfig, Config, RouteConfig

log = logging.getLogger("wsproxy.control.exposition")

_HEALTH_STATES = tuple(Health)


# -- what the collector reads ---------------------------------------------------------------------


class _Scanner(Protocol):
    @property
    def messages(self) -> int: ...


class _Direction(Protocol):
    @property
    def scanner(self) -> _Scanner: ...


class _Relay(Protocol):
    @property
    def up(self) -> _Direction: ...

    @property
    def down(self) -> _Direction: ...

    @property
    def bytes_up(self) -> int: ...

    @property
    def bytes_down(self) -> int: ...


class _Session(Protocol):
    @property
    def route(self) -> RouteConfig | None: ...

    @property
    def backend(self) -> BackendConfig | None: ...

    @property
    def draining(self) -> bool: ...

    @property
    def relay(self) -> _Relay | None: ...


class _Generation(Protocol):
    config: Config
    number: int


class MetricsSource(Protocol):
    """What the collector reads from the application (``wsproxy.app.App``) at scrape time."""

    metrics: Metrics
    registry: Registry

    @property
    def reloads(self) -> int: ...  # successful reloads

    @property
    def reload_failures(self) -> int: ...

    @property
    def last_reload_unix(self) -> float | None: ...

    @property
    def generation(self) -> _Generation: ...

    @property
    def sessions(self) -> Mapping[str, _Session]: ...


@dataclass(frozen=True, slots=True)
class _BackendNumbers:
    """One backend's state as a scrape reports it, read on the loop."""

    active: int
    health: Health
    rtt_s: float | None
    draining: bool
    ejected: bool
    bytes_up: int  # ended sessions' and open ones' so far
    bytes_down: int
    messages_up: int
    messages_down: int


@dataclass(frozen=True, slots=True)
class _State:
    """Everything the ``wsproxy_*`` families are built from, copied on the loop (``WsproxyCollector.snapshot``)."""

    config: Config  # immutable: shared, not copied
    generation: int
    pairs: tuple[tuple[str, Sequence[BackendConfig]], ...]  # (pool, its backends) in config order
    active: Mapping[str, int]  # open sessions by route label
    draining: int
    backends: Mapping[tuple[str, str], _BackendNumbers]  # by (pool, address): health is the pool's own
    totals: tuple[int, ...]  # process bytes up, down, messages up, down
    metrics: Metrics  # a copy
    reloads: int
    reload_failures: int
    last_reload_unix: float | None
    jwks_failures: tuple[tuple[str, int], ...] = ()  # (url, failed fetches) of routes' jwks_url


def _copy_histogram(histogram: Histogram) -> Histogram:
    copy = Histogram(histogram.bounds)
    copy.counts = list(histogram.counts)
    copy.total, copy.count = histogram.total, histogram.count
    return copy


def _copy_metrics(metrics: Metrics) -> Metrics:
    """A copy that the loop's later updates do not reach (dicts and histograms copied; keys are tuples of str)."""
    copy = Metrics(started_unix=metrics.started_unix)
    copy.sessions_closed = dict(metrics.sessions_closed)
    copy.closed_count = metrics.closed_count
    copy.close_codes = dict(metrics.close_codes)
    copy.refusals = dict(metrics.refusals)
    copy.handshake = _copy_histogram(metrics.handshake)
    copy.session_duration = _copy_histogram(metrics.session_duration)
    copy.upstream_connect = {k: _copy_histogram(h) for k, h in metrics.upstream_connect.items()}
    copy.upstream_handshake = {k: _copy_histogram(h) for k, h in metrics.upstream_handshake.items()}
    copy.loop_lag = _copy_histogram(metrics.loop_lag)
    copy.loop_lag_last_s = metrics.loop_lag_last_s
    return copy


class WsproxyCollector(Collector):
    """Every ``wsproxy_*`` family, built from ``source``'s state when a scrape asks."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self._certs: tuple[int, list[tuple[str, str, float]]] | None = None  # (id of the config, expiries)

    def describe(self) -> Iterable[Metric]:
        return ()  # nothing to check at registration; every family is built at collect time

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self.snapshot())

    def snapshot(self) -> _State:
        """A copy of what the families need, taken on the event loop: plain numbers, no text.

        The sessions are summed here (by route, and what they relayed so far by
        backend), each backend's state read once, and the counters and
        histograms copied, so that ``families`` can run in another thread while
        the loop goes on changing the originals.
        """
        app = self.source
        metrics = app.metrics
        generation = app.generation
        config = generation.config
        now = trio.current_time()
        pairs = tuple((str(name), pool.backends) for name, pool in config.pools.items())
        current = {(pool, str(b.address)) for pool, backends in pairs for b in backends}
        metrics.forget_backends(current)
        active: dict[str, int] = {}
        live: dict[str, list[int]] = {}
        draining = 0
        for session in app.sessions.values():
            draining += session.draining
            route, backend, relay = session.route, session.backend, session.relay
            if route is not None:
                name = route_label(route)
                active[name] = active.get(name, 0) + 1
            if relay is not None and backend is not None:
                counts = live.setdefault(str(backend.address), [0, 0, 0, 0])
                counts[0] += relay.bytes_up
                counts[1] += relay.bytes_down
                counts[2] += relay.up.scanner.messages
                counts[3] += relay.down.scanner.messages
        totals = list(app.registry.retired)  # backends forgotten since, then every one still known
        for state in app.registry:  # every backend ever used, gone ones included: the process totals
            extra = live.get(str(state.address), (0, 0, 0, 0))
            for i, value in enumerate((state.bytes_up, state.bytes_down, state.messages_up, state.messages_down)):
                totals[i] += value + extra[i]
        backends: dict[tuple[str, str], _BackendNumbers] = {}
        for pool, pool_backends in pairs:
            for backend in pool_backends:
                address = str(backend.address)
                if (pool, address) in backends:
                    continue
                state = app.registry.state(backend.address)  # sessions, draining, traffic: the address's
                pool_health = app.registry.health(pool, backend.address)  # health and ejection: the pool's
                extra = live.get(address, (0, 0, 0, 0))
                backends[(pool, address)] = _BackendNumbers(
                    active=state.active, health=pool_health.health, rtt_s=pool_health.rtt_s, draining=state.draining,
                    ejected=pool_health.ejected(now), bytes_up=state.bytes_up + extra[0],
                    bytes_down=state.bytes_down + extra[1], messages_up=state.messages_up + extra[2],
                    messages_down=state.messages_down + extra[3],
                )  # fmt: skip
        return _State(
            config=config,
            generation=generation.number,
            pairs=pairs,
            active=active,
            draining=draining,
            backends=backends,
            totals=tuple(totals),
            metrics=_copy_metrics(metrics),
            reloads=app.reloads,
            reload_failures=app.reload_failures,
            last_reload_unix=app.last_reload_unix,
            jwks_failures=tuple(sorted(getattr(getattr(app, "jwks", None), "failures", {}).items())),
        )

    def families(self, state: _State) -> Iterator[Metric]:
        """Every ``wsproxy_*`` family from ``state``; touches nothing the loop changes (any thread)."""
        metrics, config, pairs = state.metrics, state.config, state.pairs
        build = InfoMetricFamily("wsproxy_build", "The running wsproxy's version and Python's.")
        build.add_metric([], {"version": __version__, "python_version": sys.version.split()[0]})
        yield build
        active = dict(state.active)
        gauge = GaugeMetricFamily(
            "wsproxy_sessions_active", "Established sessions (101 sent, not yet closed), by route.", labels=["route"]
        )
        for route in config.routes:
            name = route_label(route)
            gauge.add_metric([name], active.pop(name, 0))
        for name, n in sorted(active.items()):  # routes a reload removed, with sessions still open
            gauge.add_metric([name], n)
        yield gauge
        counter = CounterMetricFamily(
            "wsproxy_sessions_closed",
            "Sessions ended, by route, pool, backend and outcome.",
            labels=["route", "pool", "backend", "outcome"],
        )
        for key, n in sorted(metrics.sessions_closed.items()):
            counter.add_metric(list(key), n)
        yield counter
        gauge = GaugeMetricFamily("wsproxy_draining_sessions", "Open sessions whose close a drain or a shutdown ordered.")
        gauge.add_metric([], state.draining)
        yield gauge
        yield _histogram(
            "wsproxy_session_duration_seconds", "Session lifetime, from the 101 to the close.", metrics.session_duration
        )
        yield _histogram(
            "wsproxy_handshake_duration_seconds", "From accept to the 101 sent to the client.", metrics.handshake
        )
        counter = CounterMetricFamily(
            "wsproxy_close_codes",
            "Close codes, by who sent them and to whom; code=none: a peer went away without a close frame.",
            labels=["sent_by", "to", "code"],
        )
        for code_key, n in sorted(metrics.close_codes.items()):
            counter.add_metric(list(code_key), n)
        yield counter
        counter = CounterMetricFamily(
            "wsproxy_refused",
            "Connections refused before a session was established, by route (- before one matched), "
            "reason and HTTP status (none: closed without an answer).",
            labels=["route", "reason", "status"],
        )
        for refusal_key, n in sorted(metrics.refusals.items()):
            counter.add_metric(list(refusal_key), n)
        yield counter
        yield from self._backends(state)
        yield from _upstream_histograms(metrics, pairs)
        gauge = GaugeMetricFamily(
            "wsproxy_event_loop_lag_seconds", "How late the last periodic wake-up of the event loop was."
        )
        gauge.add_metric([], metrics.loop_lag_last_s)
        yield gauge
        yield _histogram(
            "wsproxy_event_loop_delay_seconds",
            f"How late each wake-up of a {LOOP_LAG_INTERVAL_S:g}s sleep was (event loop lag).",
            metrics.loop_lag,
        )
        attempts = state.reloads + state.reload_failures
        counter = CounterMetricFamily("wsproxy_reloads", "Config reloads attempted, failed ones included.")
        counter.add_metric([], attempts)
        yield counter
        counter = CounterMetricFamily("wsproxy_reload_failures", "Config reloads that failed (the old config stayed).")
        counter.add_metric([], state.reload_failures)
        yield counter
        counter = CounterMetricFamily(
            "wsproxy_jwks_fetch_failures", "Failed fetches of a jwks_url (the last good keys stayed).", labels=["url"]
        )
        for url, failures in state.jwks_failures:  # edge.jwks.JwksFetcher: routes' jwks_url
            counter.add_metric([url], failures)
        yield counter
        gauge = GaugeMetricFamily(
            "wsproxy_last_reload_success_timestamp_seconds", "Unix time of the last successful config load."
        )
        gauge.add_metric([], state.last_reload_unix if state.last_reload_unix is not None else metrics.started_unix)
        yield gauge
        gauge = GaugeMetricFamily("wsproxy_config_generation", "The config generation in effect (1 = the first load).")
        gauge.add_metric([], state.generation)
        yield gauge
        gauge = GaugeMetricFamily(
            "wsproxy_certificate_expiry_timestamp_seconds",
            "When a listener's certificate expires (Unix time), by listener and SNI name (default: no SNI match).",
            labels=["listener", "sni"],
        )
        for listener, sni, expiry in self._expiries(config):
            gauge.add_metric([listener, sni], expiry)
        yield gauge

    @staticmethod
    def _backends(state: _State) -> Iterator[Metric]:
        labels = ["pool", "backend"]
        sessions = GaugeMetricFamily(
            "wsproxy_backend_sessions_active",
            "Sessions holding a connection to the backend, being established included (what max_connections limits).",
            labels=labels,
        )
        health = GaugeMetricFamily(
            "wsproxy_backend_health", "1 for the backend's current health state, 0 for the others.", labels=[*labels, "state"]
        )
        rtt = GaugeMetricFamily(
            "wsproxy_backend_check_rtt_seconds", "Round trip of the last passed active health check.", labels=labels
        )
        draining = GaugeMetricFamily(
            "wsproxy_backend_draining", "1 if the backend is draining (takes no new sessions).", labels=labels
        )
        ejected = GaugeMetricFamily(
            "wsproxy_backend_ejected", "1 if passive health has ejected the backend for now.", labels=labels
        )
        bytes_ = CounterMetricFamily(
            "wsproxy_backend_bytes",
            "Bytes relayed (frames included) by the backend's sessions, open ones included; up = towards the backend.",
            labels=[*labels, "direction"],
        )
        messages = CounterMetricFamily(
            "wsproxy_backend_messages",
            "WebSocket messages relayed by the backend's sessions, open ones included.",
            labels=[*labels, "direction"],
        )
        info = InfoMetricFamily(
            "wsproxy_backend", "The backend's name (pools.X.backends[].name), for joins; 1 per named backend.",
            labels=labels,
        )  # fmt: skip
        for pool, backends in state.pairs:
            for backend in backends:
                name = str(backend.address)
                numbers = state.backends[(pool, name)]
                sessions.add_metric([pool, name], numbers.active)
                for h in _HEALTH_STATES:
                    health.add_metric([pool, name, h.value], int(numbers.health is h))
                if numbers.rtt_s is not None:
                    rtt.add_metric([pool, name], numbers.rtt_s)
                draining.add_metric([pool, name], int(numbers.draining))
                ejected.add_metric([pool, name], int(numbers.ejected))
                bytes_.add_metric([pool, name, "up"], numbers.bytes_up)
                bytes_.add_metric([pool, name, "down"], numbers.bytes_down)
                messages.add_metric([pool, name, "up"], numbers.messages_up)
                messages.add_metric([pool, name, "down"], numbers.messages_down)
                if backend.name is not None:
                    info.add_metric([pool, name], {"name": backend.name})
        yield from (sessions, health, rtt, draining, ejected, bytes_, messages, info)
        process_bytes = CounterMetricFamily(
            "wsproxy_bytes", "Bytes relayed (frames included) by every session, open ones included.", labels=["direction"]
        )
        process_bytes.add_metric(["up"], state.totals[0])
        process_bytes.add_metric(["down"], state.totals[1])
        yield process_bytes
        process_messages = CounterMetricFamily(
            "wsproxy_messages", "WebSocket messages relayed by every session, open ones included.", labels=["direction"]
        )
        process_messages.add_metric(["up"], state.totals[2])
        process_messages.add_metric(["down"], state.totals[3])
        yield process_messages

    def _expiries(self, config: Config) -> list[tuple[str, str, float]]:
        """(listener, SNI name, expiry) of every certificate of ``config``, read once per config."""
        if self._certs is not None and self._certs[0] == id(config):
            return self._certs[1]
        found: list[tuple[str, str, float]] = []
        for listener in config.listeners:
            tls = listener.tls
            if tls is None:
                continue
            certs = [("default", tls.cert), *((name, sni.cert) for sni in tls.sni for name in sni.names)]
            for sni, path in certs:
                expiry = certificate_expiry(path)
                if expiry is not None:
                    found.append((str(listener.name), sni, expiry))
        self._certs = (id(config), found)
        return found


def certificate_expiry(path: str) -> float | None:
    """The Unix time at which the first (leaf) certificate of PEM file ``path`` expires; None if unreadable."""
    from cryptography import x509

    try:
        with open(path, "rb") as file:
            leaf = x509.load_pem_x509_certificate(file.read(1 << 20))
    except (OSError, ValueError) as exc:
        log_event(log, logging.WARNING, "certificate_unreadable", file=path, reason=str(exc))
        return None
    expiry: datetime.datetime = leaf.not_valid_after_utc
    return expiry.timestamp()


def _histogram(name: str, documentation: str, histogram: Histogram, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=list(labels) or None)
    family.add_metric(list(labels) if labels else [], histogram.buckets(), histogram.total)
    return family


def _upstream_histograms(metrics: Metrics, pairs: Sequence[tuple[str, Sequence[BackendConfig]]]) -> Iterator[Metric]:
    for name, documentation, table in (
        (
            "wsproxy_upstream_connect_seconds",
            "Successful connects to a backend (TCP, and TLS for wss:// backends).",
            metrics.upstream_connect,
        ),
        (
            "wsproxy_upstream_handshake_seconds",
            "Accepted upstream upgrades, from the request sent to the backend's 101 read.",
            metrics.upstream_handshake,
        ),
    ):
        family = HistogramMetricFamily(name, documentation, labels=["pool", "backend"])
        for pool, backends in pairs:
            for backend in backends:
                histogram = table.get((pool, str(backend.address)))
                if histogram is not None:
                    family.add_metric([pool, str(backend.address)], histogram.buckets(), histogram.total)
        yield family


# -- exposition -------------------------------------------------------------------------------------


class MetricsRegistry(CollectorRegistry):
    """One application's registry: its ``WsproxyCollector``, and the process, platform and GC collectors.

    ``process_*`` come from ``/proc/self`` (Linux; elsewhere the family is
    empty), ``python_info`` and ``python_gc_*`` from the interpreter. The
    collectors are also kept by kind, for ``render_off_loop``: the wsproxy one
    reads the event loop's state, the others only the process.
    """

    def __init__(self, source: MetricsSource) -> None:
        super().__init__(auto_describe=False)
        self.process_collectors: list[Collector] = [
            ProcessCollector(registry=self), PlatformCollector(registry=self), GCCollector(registry=self)
        ]
        self.wsproxy_collector = WsproxyCollector(source)
        self.register(self.wsproxy_collector)
        #: small collectors of other parts that read the loop's state (DNS discovery): collected on the loop
        self.loop_collectors: list[Collector] = []

    def register_loop_collector(self, collector: Collector) -> None:
        """Register ``collector``, whose families ``render_off_loop`` takes on the loop (they read its state)."""
        self.register(collector)
        self.loop_collectors.append(collector)


def collector_registry(source: MetricsSource) -> MetricsRegistry:
    return MetricsRegistry(source)


def render(registry: CollectorRegistry, accept: str | None) -> tuple[str, bytes]:
    """(content type, body) of ``GET /metrics``: OpenMetrics if ``accept`` asks for it, else the text format.

    Everything on the calling thread; ``GET /metrics`` uses ``render_off_loop``.
    """
    encoder, content_type = choose_encoder(accept or "")
    return content_type, encoder(registry)


class _Snapshot:
    """What the encoder reads in the worker thread: the process collectors, then the families of a ``_State``."""

    def __init__(
        self, process_collectors: Sequence[Collector], collector: WsproxyCollector, state: _State, taken: Sequence[Metric]
    ) -> None:
        self.process_collectors = process_collectors
        self.collector = collector
        self.state = state
        self.taken = taken  # families of the loop collectors, built on the loop

    def collect(self) -> Iterator[Metric]:
        for process_collector in self.process_collectors:
            yield from process_collector.collect()
        yield from self.collector.families(self.state)
        yield from self.taken


async def render_off_loop(registry: MetricsRegistry, accept: str | None) -> tuple[str, bytes]:
    """``render``'s answer, with the event loop blocked only while the proxy's state is copied.

    On the loop: ``WsproxyCollector.snapshot()``, which sums the open
    sessions, reads each backend's state once and copies the counters and
    histograms (numbers only). In a worker thread: the families built from
    that copy, the process, platform and GC collectors, and the encoding,
    where the time goes (label escaping and float formatting were about
    70 % of a 100-backend scrape). The thread still takes turns at
    the GIL with the loop (``sys.getswitchinterval()``, 5 ms), so a scrape
    delays the loop by slices of that length instead of all at once.
    ``bench/scrape_block.py`` measures both.
    """
    collector = registry.wsproxy_collector
    state = collector.snapshot()
    taken = [family for loop_collector in registry.loop_collectors for family in loop_collector.collect()]
    encoder, content_type = choose_encoder(accept or "")
    snapshot = _Snapshot(registry.process_collectors, collector, state, taken)
    body = await trio.to_thread.run_sync(encoder, snapshot)  # type: ignore[arg-type]  # a registry in all but name
    return content_type, body
