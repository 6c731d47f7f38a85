"""Pure tests of ``control.metrics``: no event loop, no sockets.

Every rendering is read back with prometheus_client's own parser
(``text_string_to_metric_families``), the one a scraper's tooling uses, so
these tests check what Prometheus would see: every family of the contract
with its type, label values escaped (quotes, backslashes, line feeds) and
read back intact, histograms cumulative and closed by ``+Inf`` with a
matching ``_count``, counters that never go down over random event
sequences, and the backend gauges read from a ``Registry`` (which rendering
must not change). The HTTP around it is tested in ``tests/e2e/test_admin``.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from wsproxy.config.schema import Address, BackendConfig, PoolConfig, PoolName
from wsproxy.control.metrics import HANDSHAKE_BUCKETS_S, OUTCOMES, Metrics, close_code_label
from wsproxy.control.registry import Health, Registry

A = Address("10.0.0.1", 9000)
B = Address("::1", 9001)
POOLS = {"chat": PoolConfig(name=PoolName("chat"), backends=(BackendConfig(address=A), BackendConfig(address=B)))}

#: family name as the parser reports it (counters lose "_total") → type
FAMILIES = {
    "wsproxy_sessions_active": "gauge",
    "wsproxy_sessions": "counter",
    "wsproxy_session_duration_seconds": "histogram",
    "wsproxy_handshake_duration_seconds": "histogram",
    "wsproxy_messages": "counter",
    "wsproxy_bytes": "counter",
    "wsproxy_close_codes": "counter",
    "wsproxy_refused": "counter",
    "wsproxy_backend_sessions_active": "gauge",
    "wsproxy_backend_up": "gauge",
    "wsproxy_backend_health": "gauge",
    "wsproxy_backend_check_rtt_seconds": "gauge",
    "wsproxy_backend_draining": "gauge",
    "wsproxy_backend_ejected": "gauge",
    "wsproxy_reloads": "counter",
    "wsproxy_reload_failures": "counter",
    "wsproxy_last_reload_success_timestamp_seconds": "gauge",
    "wsproxy_config_generation": "gauge",
    "wsproxy_draining_sessions": "gauge",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def render(metrics: Metrics, registry: Registry | None = None, **kw: object) -> str:
    args: dict[str, object] = {"registry": registry or Registry(), "pools": POOLS, "generation": 1, "draining_sessions": 0}
    args.update(kw)
    return metrics.render(**args)  # type: ignore[arg-type]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family → type, (sample name, sorted labels) → value); no series may appear twice."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} declared twice"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"series {key} twice"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def close(metrics: Metrics, route: str = "*/chat", pool: str = "chat", backend: str = str(A), **kw: object) -> None:
    args: dict[str, object] = dict(
        outcome="normal", duration_s=1.5, bytes_up=10, bytes_down=20, messages_up=1, messages_down=2,
        client_code=1000, backend_code=1000,
    )  # fmt: skip
    args.update(kw)
    metrics.session_closed(route, pool, backend, **args)  # type: ignore[arg-type]


def test_every_family_is_there_with_its_type_even_before_any_traffic() -> None:
    text = render(Metrics())
    types, samples = parse(text)
    assert types == FAMILIES
    assert text.endswith("\n") and "\n\n" not in text
    # every line is a HELP, a TYPE or a sample of a declared family
    for line in text.splitlines():
        assert re.match(r"^(# (HELP|TYPE) wsproxy_\w+ .+|wsproxy_\w+(\{.*\})? \S+)$", line), line
    assert value(samples, "wsproxy_reloads_total") == 0
    assert value(samples, "wsproxy_config_generation") == 1
    assert value(samples, "wsproxy_handshake_duration_seconds_count") == 0


def test_sessions_by_route_and_outcome() -> None:
    m = Metrics()
    m.session_opened("*/chat", "chat", str(A))
    m.session_opened("*/chat", "chat", str(A))
    m.session_opened("*/feed", "chat", str(B))
    close(m, outcome="drain", bytes_up=100, bytes_down=1000, messages_up=3, messages_down=7,
          client_code=1012, backend_code=1001)  # fmt: skip
    close(m, outcome="no such outcome", client_code=None, backend_code=4321)
    _, s = parse(render(m))
    assert value(s, "wsproxy_sessions_active", route="*/chat", pool="chat", backend=str(A)) == 0
    assert value(s, "wsproxy_sessions_active", route="*/feed", pool="chat", backend=str(B)) == 1
    assert value(s, "wsproxy_sessions_total", route="*/chat", pool="chat", backend=str(A), outcome="drain") == 1
    assert value(s, "wsproxy_sessions_total", route="*/chat", pool="chat", backend=str(A), outcome="error") == 1
    assert value(s, "wsproxy_bytes_total", direction="up") == 110
    assert value(s, "wsproxy_bytes_total", direction="down") == 1020
    assert value(s, "wsproxy_messages_total", direction="up") == 4
    assert value(s, "wsproxy_messages_total", direction="down") == 9
    assert value(s, "wsproxy_close_codes_total", side="client", code="1012") == 1
    assert value(s, "wsproxy_close_codes_total", side="client", code="none") == 1
    assert value(s, "wsproxy_close_codes_total", side="backend", code="1001") == 1
    assert value(s, "wsproxy_close_codes_total", side="backend", code="4xxx") == 1
    assert value(s, "wsproxy_session_duration_seconds_count") == 2
    assert value(s, "wsproxy_session_duration_seconds_sum") == 3.0


def test_close_codes_a_peer_chooses_freely_are_folded() -> None:
    assert [close_code_label(c) for c in (None, 1000, 1015, 2999, 3000, 3999, 4000, 4999, 5000, 999)] == [
        "none", "1000", "1015", "2999", "3xxx", "3xxx", "4xxx", "4xxx", "invalid", "invalid",
    ]  # fmt: skip


def test_refusals_by_status() -> None:
    m = Metrics()
    for status in (403, 403, 503, 429):
        m.refused(status)
    _, s = parse(render(m))
    assert value(s, "wsproxy_refused_total", status="403") == 2
    assert value(s, "wsproxy_refused_total", status="503") == 1
    assert value(s, "wsproxy_refused_total", status="429") == 1


def test_label_values_are_escaped_and_read_back_intact() -> None:
    nasty = 'a"b\\c\nd}e,f="g'
    m = Metrics()
    m.session_opened(nasty, "chat", "x\\")
    text = render(m, pools={'p"\n\\': PoolConfig(name=PoolName("p"), backends=(BackendConfig(address=A),))})
    assert 'route="a\\"b\\\\c\\nd}e,f=\\"g"' in text
    assert "\nd}" not in text  # no raw line feed inside a label
    _, s = parse(text)
    assert value(s, "wsproxy_sessions_active", route=nasty, pool="chat", backend="x\\") == 1
    assert value(s, "wsproxy_backend_up", pool='p"\n\\', backend=str(A)) == 0


def test_handshake_histogram_is_cumulative_and_closed_by_inf() -> None:
    m = Metrics()
    observations = [0.00005, 0.0001, 0.0003, 0.002, 0.002, 0.7, 9.9, 10.0, 12.0, 3600.0]
    for seconds in observations:
        m.handshake_done(seconds)
    _, s = parse(render(m))
    buckets = sorted(
        ((float(dict(labels)["le"]), v) for (name, labels), v in s.items() if name == "wsproxy_handshake_duration_seconds_bucket"),
    )
    assert [le for le, _ in buckets] == [*HANDSHAKE_BUCKETS_S, math.inf]
    assert HANDSHAKE_BUCKETS_S[0] == 0.0001 and HANDSHAKE_BUCKETS_S[-1] == 10.0
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    for le, n in buckets:
        assert n == sum(1 for o in observations if o <= le), le  # "le" includes its bound
    assert counts[-1] == value(s, "wsproxy_handshake_duration_seconds_count") == len(observations)
    assert math.isclose(value(s, "wsproxy_handshake_duration_seconds_sum"), sum(observations))


def test_backend_gauges_come_from_the_registry_without_changing_it() -> None:
    registry = Registry()
    a = registry.state(A)
    a.active = 3
    a.health = Health.UP
    a.rtt_s = 0.0042
    a.draining = True
    a.ejected_until = 100.0
    m = Metrics()
    _, s = parse(render(m, registry, now=50.0))
    assert [st.address for st in registry] == [A], "render created registry entries"
    assert value(s, "wsproxy_backend_sessions_active", pool="chat", backend="10.0.0.1:9000") == 3
    assert value(s, "wsproxy_backend_up", pool="chat", backend="10.0.0.1:9000") == 1
    assert value(s, "wsproxy_backend_check_rtt_seconds", pool="chat", backend="10.0.0.1:9000") == 0.0042
    assert value(s, "wsproxy_backend_draining", pool="chat", backend="10.0.0.1:9000") == 1
    assert value(s, "wsproxy_backend_ejected", pool="chat", backend="10.0.0.1:9000") == 1
    for state, expected in (("up", 1), ("down", 0), ("unknown", 0)):
        assert value(s, "wsproxy_backend_health", pool="chat", backend="10.0.0.1:9000", state=state) == expected
    # B was never seen: unknown, not up, nothing active, no round trip yet
    assert value(s, "wsproxy_backend_up", pool="chat", backend="[::1]:9001") == 0
    assert value(s, "wsproxy_backend_health", pool="chat", backend="[::1]:9001", state="unknown") == 1
    assert value(s, "wsproxy_backend_sessions_active", pool="chat", backend="[::1]:9001") == 0
    assert ("wsproxy_backend_check_rtt_seconds", (("backend", "[::1]:9001"), ("pool", "chat"))) not in s
    # later, the ejection is over
    _, s = parse(render(m, registry, now=100.0))
    assert value(s, "wsproxy_backend_ejected", pool="chat", backend="10.0.0.1:9000") == 0
    # without the caller's clock, ejection is not reported at all (rather than guessed)
    _, s = parse(render(m, registry))
    assert not any(name == "wsproxy_backend_ejected" for name, _ in s)


def test_reloads_generation_and_draining_sessions() -> None:
    m = Metrics(started_unix=1_700_000_000.0)
    _, s = parse(render(m))
    assert value(s, "wsproxy_last_reload_success_timestamp_seconds") == 1_700_000_000.0
    m.reload(True, generation=2, now_unix=1_700_000_100.5)
    m.reload(False, generation=2, now_unix=1_700_000_200.0)
    _, s = parse(render(m, generation=2, draining_sessions=7))
    assert value(s, "wsproxy_reloads_total") == 2
    assert value(s, "wsproxy_reload_failures_total") == 1
    assert value(s, "wsproxy_last_reload_success_timestamp_seconds") == 1_700_000_100.5
    assert value(s, "wsproxy_config_generation") == 2
    assert value(s, "wsproxy_draining_sessions") == 7


# -- counters never go down ------------------------------------------------------------------------

_routes = st.sampled_from(["*/a", "*/b", 'x"\\\n'])
_backends = st.sampled_from([str(A), str(B)])
_codes = st.one_of(st.none(), st.integers(0, 6000))
_events = st.one_of(
    st.tuples(st.just("open"), _routes, _backends),
    st.tuples(
        st.just("close"), _routes, _backends, st.sampled_from(sorted(OUTCOMES) + ["bogus"]),
        st.floats(0, 1e6, allow_nan=False), st.integers(0, 10**9), _codes, _codes,
    ),  # fmt: skip
    st.tuples(st.just("refused"), st.sampled_from([400, 403, 404, 429, 503])),
    st.tuples(st.just("handshake"), st.floats(0, 100, allow_nan=False)),
    st.tuples(st.just("reload"), st.booleans()),
)


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    types, samples = parse(text)
    counted = {f"{name}_total" for name, type_ in types.items() if type_ == "counter"}
    counted |= {f"{name}_{suffix}" for name, type_ in types.items() if type_ == "histogram" for suffix in ("bucket", "count", "sum")}
    return {key: v for key, v in samples.items() if key[0] in counted}


@given(st.lists(_events, max_size=40))
def test_counters_are_monotonic(events: list[tuple[object, ...]]) -> None:
    m = Metrics()
    before = _counters(render(m))
    opened: Counter[tuple[str, str]] = Counter()
    for event in events:
        match event:
            case ("open", str(route), str(backend)):
                m.session_opened(route, "chat", backend)
                opened[route, backend] += 1
            case ("close", str(route), str(backend), str(outcome), float(dur), int(n), code_c, code_b):
                assert code_c is None or isinstance(code_c, int)
                assert code_b is None or isinstance(code_b, int)
                m.session_closed(
                    route, "chat", backend, outcome=outcome, duration_s=dur, bytes_up=n, bytes_down=n,
                    messages_up=n, messages_down=n, client_code=code_c, backend_code=code_b,
                )  # fmt: skip
                opened[route, backend] = max(opened[route, backend] - 1, 0)
            case ("refused", int(status)):
                m.refused(status)
            case ("handshake", float(seconds)):
                m.handshake_done(seconds)
            case ("reload", bool(ok)):
                m.reload(ok, generation=1, now_unix=0.0)
            case _:
                raise AssertionError(f"unmatched event {event!r}")
        after = _counters(render(m))
        for key, v in before.items():
            assert after[key] >= v, (event, key)
        before = after
    _, s = parse(render(m))
    for (route, backend), n in opened.items():
        assert value(s, "wsproxy_sessions_active", route=route, pool="chat", backend=backend) == n
