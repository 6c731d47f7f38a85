"""Tests of ``control.metrics`` on a real ``App`` that is not serving: no sockets, no backends.

The collector reads an ``App`` built from a real config (``parse_config``);
its counters are fed through ``Metrics``' own methods, its backend state
through the real ``Registry``. Every rendering is read back with
prometheus_client's parsers (the text format's and OpenMetrics'), so these
tests check what a scraper sees: every family with its type and label set,
label values escaped and read back intact, histograms cumulative and closed
by ``+Inf``, counters that never go down over random event sequences,
series of a backend removed from every pool gone, certificate expiry read
from a real certificate. A real process is scraped in
``tests/e2e/test_metrics_process.py``.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from wsproxy import __version__
from wsproxy.app import App, Generation
from wsproxy.config.load import parse_config
from wsproxy.config.schema import Address, Config
from wsproxy.control.metrics import HANDSHAKE_BUCKETS_S, close_code_label
from wsproxy.balance.registry import Health
from wsproxy.proto.frames import encode_close
from wsproxy.proto.relay import Outcome, close_code_of

A = "10.0.0.1:9000"
B = "[::1]:9001"


def config(backends: tuple[str, ...] = (A, B), *, tls: str = "") -> Config:
    """A real config: one listener (``tls`` is its indented ``tls:`` block), one route, pool "chat"."""
    listed = ", ".join(f'{{address: "{b}"}}' for b in backends)
    text = (
        'listeners:\n  - name: main\n    bind: "127.0.0.1:0"\n' + tls
        + "routes:\n  - path: /chat\n    pool: chat\n"
        + f"pools:\n  chat:\n    backends: [{listed}]\n"
    )  # fmt: skip
    return parse_config(text, "t.yaml")


#: family name as the text parser reports it (counters lose "_total") → type, for the wsproxy families
FAMILIES = {
    "wsproxy_build_info": "gauge",  # an info family reads back as a gauge from the text format
    "wsproxy_backend_info": "gauge",
    "wsproxy_sessions_active": "gauge",
    "wsproxy_sessions_closed": "counter",
    "wsproxy_draining_sessions": "gauge",
    "wsproxy_session_duration_seconds": "histogram",
    "wsproxy_handshake_duration_seconds": "histogram",
    "wsproxy_close_codes": "counter",
    "wsproxy_refused": "counter",
    "wsproxy_backend_sessions_active": "gauge",
    "wsproxy_backend_health": "gauge",
    "wsproxy_backend_check_rtt_seconds": "gauge",
    "wsproxy_backend_draining": "gauge",
    "wsproxy_backend_ejected": "gauge",
    "wsproxy_backend_bytes": "counter",
    "wsproxy_backend_messages": "counter",
    "wsproxy_bytes": "counter",
    "wsproxy_messages": "counter",
    "wsproxy_upstream_connect_seconds": "histogram",
    "wsproxy_upstream_handshake_seconds": "histogram",
    "wsproxy_event_loop_lag_seconds": "gauge",
    "wsproxy_event_loop_delay_seconds": "histogram",
    "wsproxy_reloads": "counter",
    "wsproxy_reload_failures": "counter",
    "wsproxy_jwks_fetch_failures": "counter",
    "wsproxy_last_reload_success_timestamp_seconds": "gauge",
    "wsproxy_config_generation": "gauge",
    "wsproxy_certificate_expiry_timestamp_seconds": "gauge",
    "wsproxy_discovery_failures": "counter",
    "wsproxy_discovered_backends": "gauge",
}
#: label names of every sample of a family (histograms add "le" to their buckets)
LABELS = {
    "wsproxy_build_info": {"version", "python_version"},
    "wsproxy_backend_info": {"pool", "backend", "name"},
    "wsproxy_sessions_active": {"route"},
    "wsproxy_sessions_closed_total": {"route", "pool", "backend", "outcome"},
    "wsproxy_close_codes_total": {"sent_by", "to", "code"},
    "wsproxy_refused_total": {"route", "reason", "status"},
    "wsproxy_backend_sessions_active": {"pool", "backend"},
    "wsproxy_backend_health": {"pool", "backend", "state"},
    "wsproxy_backend_bytes_total": {"pool", "backend", "direction"},
    "wsproxy_upstream_connect_seconds_count": {"pool", "backend"},
    "wsproxy_certificate_expiry_timestamp_seconds": {"listener", "sni"},
    "wsproxy_discovery_failures_total": {"pool"},
    "wsproxy_discovered_backends": {"pool"},
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(app: App, accept: str | None = None) -> tuple[dict[str, str], Samples]:
    """(family → type, (sample name, sorted labels) → value); no family or series may appear twice."""
    content_type, body = app.render_metrics(accept)
    text = body.decode()
    if content_type.startswith("application/openmetrics-text"):
        families = list(openmetrics_families(text))
    else:
        assert content_type.startswith("text/plain; version=0.0.4")
        families = list(text_string_to_metric_families(text))
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in families:
        assert family.name not in types, f"family {family.name} declared twice"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"series {key} twice"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def test_a_named_backend_has_an_info_series_and_its_other_series_keep_their_labels() -> None:
    named = parse_config(
        'listeners:\n  - name: main\n    bind: "127.0.0.1:0"\nroutes:\n  - pool: chat\n'
        f'pools:\n  chat:\n    backends: [{{address: "{A}", name: chat-1}}, {{address: "{B}"}}]\n',
        "t.yaml",
    )
    _, samples = scrape(App(named))
    assert samples[("wsproxy_backend_info", (("backend", A), ("name", "chat-1"), ("pool", "chat")))] == 1
    assert not [labels for n, labels in samples if n == "wsproxy_backend_info" and ("backend", B) in labels]
    assert value(samples, "wsproxy_backend_sessions_active", pool="chat", backend=A) == 0  # no name label there


async def test_every_family_has_its_type_and_label_set_before_any_traffic() -> None:
    app = App(config())
    types, samples = scrape(app)
    assert {n: t for n, t in types.items() if n.startswith("wsproxy_")} == FAMILIES
    for name in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes",
                 "process_cpu_seconds_total", "process_start_time_seconds", "python_info"):  # fmt: skip
        assert name in names(samples), name
    for (name, labels), _ in samples.items():
        if name in LABELS:
            assert {k for k, _ in labels} == LABELS[name], name
    assert value(samples, "wsproxy_build_info", version=__version__, python_version=dict(
        next(labels for n, labels in samples if n == "python_info"))["version"]) == 1  # fmt: skip
    assert value(samples, "wsproxy_sessions_active", route="*/chat") == 0
    assert value(samples, "wsproxy_reloads_total") == 0
    assert value(samples, "wsproxy_config_generation") == 1
    assert value(samples, "wsproxy_handshake_duration_seconds_count") == 0
    assert value(samples, "wsproxy_backend_health", pool="chat", backend=A, state="unknown") == 1
    assert "wsproxy_backend_up" not in names(samples)  # wsproxy_backend_health{state} says it


async def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    app = App(config())
    app.metrics.refused("-", "upgrade", 400)
    content_type, body = app.render_metrics("application/openmetrics-text; version=1.0.0, text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    types, samples = scrape(app, "application/openmetrics-text; version=1.0.0")
    assert types["wsproxy_build"] == "info"
    assert types["wsproxy_refused"] == "counter"
    assert value(samples, "wsproxy_refused_total", route="-", reason="upgrade", status="400") == 1
    # a scraper that does not ask gets the text format
    assert app.render_metrics("text/plain")[0].startswith("text/plain; version=0.0.4")
    assert app.render_metrics(None)[0].startswith("text/plain; version=0.0.4")


async def test_sessions_closed_and_close_codes_by_who_sent_them() -> None:
    app = App(config())
    m = app.metrics
    m.session_closed("*/chat", "chat", A, outcome="normal", duration_s=1.5, client_code=1000, backend_code=1000)
    # a drain: the proxy sent 1012 to the client and 1001 to the backend; both echoed
    m.session_closed("*/chat", "chat", A, outcome="drain", duration_s=3.0, client_code=1012, backend_code=1001,
                     proxy_to_client=1012, proxy_to_backend=1001)  # fmt: skip
    # the backend vanished: the client got the failure code from the proxy, no close frame from the backend
    m.session_closed("*/chat", "chat", B, outcome="backend_gone", duration_s=0.5, client_code=4321, backend_code=None,
                     proxy_to_client=1014)  # fmt: skip
    _, s = scrape(app)
    assert value(s, "wsproxy_sessions_closed_total", route="*/chat", pool="chat", backend=A, outcome="normal") == 1
    assert value(s, "wsproxy_sessions_closed_total", route="*/chat", pool="chat", backend=A, outcome="drain") == 1
    assert value(s, "wsproxy_sessions_closed_total", route="*/chat", pool="chat", backend=B, outcome="backend_gone") == 1
    codes = {dict(labels)["sent_by"] + ">" + dict(labels)["to"] + ":" + dict(labels)["code"]: v
             for (name, labels), v in s.items() if name == "wsproxy_close_codes_total"}  # fmt: skip
    assert codes == {
        "client>backend:1000": 1, "backend>client:1000": 1,
        "client>backend:1012": 1, "backend>client:1001": 1, "proxy>client:1012": 1, "proxy>backend:1001": 1,
        "client>backend:4xxx": 1, "backend>client:none": 1, "proxy>client:1014": 1,
    }  # fmt: skip
    assert value(s, "wsproxy_session_duration_seconds_count") == 3
    assert value(s, "wsproxy_session_duration_seconds_sum") == 5.0
    assert app.status()["sessions_closed"] == 3


def test_close_codes_a_peer_chooses_freely_are_folded() -> None:
    assert [close_code_label(c) for c in (None, 1000, 1015, 2999, 3000, 3999, 4000, 4999, 5000, 999)] == [
        "none", "1000", "1015", "2999", "3xxx", "3xxx", "4xxx", "4xxx", "invalid", "invalid",
    ]  # fmt: skip


def test_the_relay_machine_reads_back_the_code_of_its_own_close_frames() -> None:
    for code in (1000, 1001, 1012, 1014, 4999):
        for reason in ("", "backend draining (admin)", "é" * 80):
            assert close_code_of(encode_close(code, reason)) == code
            assert close_code_of(encode_close(code, reason, mask=b"\x8f\x01\xff\x10")) == code
    assert close_code_of(b"\x88\x00") is None  # a close frame without a code
    assert Outcome.DRAIN.value == "drain"


async def test_refusals_by_route_reason_and_status_and_in_status() -> None:
    app = App(config())
    for route, reason, status in (("-", "upgrade", 426), ("-", "upgrade", 426), ("*/chat", "auth", 401),
                                  ("-", "timeout", None), ("-", "overload", 503)):  # fmt: skip
        app.metrics.refused(route, reason, status)
    app.metrics.refused("-", "overload", 503, 4)  # the accept loop sheds in batches
    _, s = scrape(app)
    assert value(s, "wsproxy_refused_total", route="-", reason="upgrade", status="426") == 2
    assert value(s, "wsproxy_refused_total", route="*/chat", reason="auth", status="401") == 1
    assert value(s, "wsproxy_refused_total", route="-", reason="timeout", status="none") == 1
    assert value(s, "wsproxy_refused_total", route="-", reason="overload", status="503") == 5
    status = app.status()
    assert status["refused"] == 9
    assert status["refused_by_reason"] == {"upgrade": 2, "auth": 1, "timeout": 1, "overload": 5}


async def test_label_values_are_escaped_and_read_back_intact() -> None:
    nasty = 'a"b\\c\nd}e,f="g'
    app = App(config())
    app.metrics.session_closed(nasty, "chat", A, outcome="normal", duration_s=0.0, client_code=None, backend_code=None)
    body = app.render_metrics()[1].decode()
    assert 'route="a\\"b\\\\c\\nd}e,f=\\"g"' in body
    assert "\nd}" not in body  # no raw line feed inside a label
    _, s = scrape(app)
    assert value(s, "wsproxy_sessions_closed_total", route=nasty, pool="chat", backend=A, outcome="normal") == 1


async def test_histograms_are_cumulative_and_closed_by_inf() -> None:
    app = App(config())
    observations = [0.00005, 0.0001, 0.0003, 0.002, 0.002, 0.7, 9.9, 10.0, 12.0, 3600.0]
    for seconds in observations:
        app.metrics.handshake_done(seconds)
        app.metrics.upstream_connected("chat", A, seconds)
    app.metrics.upstream_upgraded("chat", B, 0.003)
    _, s = scrape(app)
    for name, labels in (("wsproxy_handshake_duration_seconds", {}), ("wsproxy_upstream_connect_seconds", {"pool": "chat", "backend": A})):
        buckets = sorted(
            (float(dict(ls)["le"]), v) for (n, ls), v in s.items()
            if n == f"{name}_bucket" and set(labels.items()) <= set(ls)
        )  # fmt: skip
        if name.startswith("wsproxy_handshake"):
            assert [le for le, _ in buckets] == [*HANDSHAKE_BUCKETS_S, math.inf]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets must be cumulative"
        for le, n in buckets:
            assert n == sum(1 for o in observations if o <= le), le  # "le" includes its bound
        assert counts[-1] == value(s, f"{name}_count", **labels) == len(observations)
        assert math.isclose(value(s, f"{name}_sum", **labels), sum(observations))
    assert value(s, "wsproxy_upstream_handshake_seconds_count", pool="chat", backend=B) == 1
    assert ("wsproxy_upstream_handshake_seconds_count", (("backend", A), ("pool", "chat"))) not in s


async def test_backend_series_come_from_the_registry_and_leave_with_the_backend() -> None:
    app = App(config())
    a = app.registry.state(Address("10.0.0.1", 9000))
    a.active, a.draining = 3, True
    a_health = app.registry.health("chat", Address("10.0.0.1", 9000))
    a_health.health, a_health.rtt_s = Health.UP, 0.0042
    a.bytes_up, a.bytes_down, a.messages_up, a.messages_down = 100, 2000, 3, 40
    app.metrics.upstream_connected("chat", A, 0.001)
    app.metrics.upstream_connected("chat", B, 0.001)
    app.metrics.session_closed("*/chat", "chat", B, outcome="normal", duration_s=1, client_code=1000, backend_code=1000)
    _, s = scrape(app)
    assert value(s, "wsproxy_backend_sessions_active", pool="chat", backend=A) == 3
    assert value(s, "wsproxy_backend_health", pool="chat", backend=A, state="up") == 1
    assert value(s, "wsproxy_backend_check_rtt_seconds", pool="chat", backend=A) == 0.0042
    assert value(s, "wsproxy_backend_draining", pool="chat", backend=A) == 1
    assert value(s, "wsproxy_backend_ejected", pool="chat", backend=A) == 0
    assert value(s, "wsproxy_backend_bytes_total", pool="chat", backend=A, direction="down") == 2000
    assert value(s, "wsproxy_backend_messages_total", pool="chat", backend=A, direction="up") == 3
    assert value(s, "wsproxy_bytes_total", direction="down") == 2000
    assert ("wsproxy_backend_check_rtt_seconds", (("backend", B), ("pool", "chat"))) not in s  # never checked
    # a reload takes B out of every pool: its series go, the process totals stay
    app.generation = Generation(config((A,)), 2)
    _, s = scrape(app)
    assert not [key for key in s if ("backend", B) in key[1]], "series of a removed backend"
    assert value(s, "wsproxy_backend_bytes_total", pool="chat", backend=A, direction="down") == 2000
    assert value(s, "wsproxy_bytes_total", direction="down") == 2000
    assert app.metrics.upstream_connect.keys() == {("chat", A)}  # forgotten, not only hidden


async def test_reloads_count_attempts_in_metrics_and_status_alike() -> None:
    app = App(config())
    started = app.metrics.started_unix
    _, s = scrape(app)
    assert value(s, "wsproxy_last_reload_success_timestamp_seconds") == started
    app.reload_failed(["t.yaml:1:1: nope"])
    app.reloader.record_applied(started + 10)  # what a successful reload counts (App.reload also swaps the config)
    _, s = scrape(app)
    assert value(s, "wsproxy_reloads_total") == 2
    assert value(s, "wsproxy_reload_failures_total") == 1
    assert value(s, "wsproxy_last_reload_success_timestamp_seconds") == started + 10
    status = app.status()
    assert (status["reloads"], status["reload_failures"]) == (2, 1)  # the page shows "2 (1 failed)"


async def test_certificate_expiry_by_listener_and_sni_name(tmp_path: Path) -> None:
    ca = trustme.CA()
    default = ca.issue_cert("proxy.test", not_after=datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc))
    other = ca.issue_cert("a.test", "b.test", not_after=datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc))
    files = {}
    for name, cert in (("default", default), ("other", other)):
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        files[name] = tmp_path / name
    tls = (
        f'    tls:\n      cert: "{files["default"]}.pem"\n      key: "{files["default"]}.key"\n'
        f'      sni:\n        - names: [a.test, b.test]\n'
        f'          cert: "{files["other"]}.pem"\n          key: "{files["other"]}.key"\n'
    )
    app = App(config(tls=tls))
    _, s = scrape(app)
    expiry = {dict(ls)["sni"]: v for (n, ls), v in s.items() if n == "wsproxy_certificate_expiry_timestamp_seconds"}
    assert expiry == {
        "default": datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc).timestamp(),
        "a.test": datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc).timestamp(),
        "b.test": datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc).timestamp(),
    }


# -- counters never go down ------------------------------------------------------------------------

_routes = st.sampled_from(["*/chat", "*/b", 'x"\\\n'])
_backends = st.sampled_from([A, B])
_codes = st.one_of(st.none(), st.integers(0, 6000))
_events = st.one_of(
    st.tuples(
        st.just("close"), _routes, _backends, st.sampled_from([o.value for o in Outcome]),
        st.floats(0, 1e6, allow_nan=False), _codes, _codes, _codes, _codes,
    ),  # fmt: skip
    st.tuples(st.just("refused"), _routes, st.sampled_from(["upgrade", "auth", "limit"]), st.sampled_from([None, 403, 503])),
    st.tuples(st.just("handshake"), st.floats(0, 100, allow_nan=False)),
    st.tuples(st.just("upstream"), _backends, st.floats(0, 100, allow_nan=False)),
    st.tuples(st.just("traffic"), _backends, st.integers(0, 10**9)),
)


def _counters(samples: Samples, types: dict[str, str]) -> Samples:
    counted = {f"{name}_total" for name, type_ in types.items() if type_ == "counter"}
    counted |= {f"{name}_{suffix}" for name, type_ in types.items() if type_ == "histogram" for suffix in ("bucket", "count", "sum")}
    return {key: v for key, v in samples.items() if key[0] in counted and key[0].startswith("wsproxy_")}


@settings(max_examples=60, deadline=None)
@given(st.lists(_events, max_size=30))
def test_counters_are_monotonic(events: list[tuple[object, ...]]) -> None:
    import trio

    async def run() -> None:
        app = App(config())
        m = app.metrics
        types, samples = scrape(app)
        before = _counters(samples, types)
        for event in events:
            match event:
                case ("close", str(route), str(backend), str(outcome), float(dur), c, b, pc, pb):
                    m.session_closed(route, "chat", backend, outcome=outcome, duration_s=dur, client_code=c,  # type: ignore[arg-type]
                                     backend_code=b, proxy_to_client=pc, proxy_to_backend=pb)  # type: ignore[arg-type]  # fmt: skip
                case ("refused", str(route), str(reason), status):
                    m.refused(route, reason, status)  # type: ignore[arg-type]
                case ("handshake", float(seconds)):
                    m.handshake_done(seconds)
                case ("upstream", str(backend), float(seconds)):
                    m.upstream_connected("chat", backend, seconds)
                    m.upstream_upgraded("chat", backend, seconds)
                case ("traffic", str(backend), int(n)):
                    state = app.registry.state(_address(backend))
                    state.bytes_up += n
                    state.messages_down += 1
                case _:
                    raise AssertionError(f"unmatched event {event!r}")
            types, samples = scrape(app)
            after = _counters(samples, types)
            for key, v in before.items():
                assert after[key] >= v, (event, key)
            before = after

    trio.run(run)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))
