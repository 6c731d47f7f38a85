"""The supervisor's decisions without processes: backoff, adoption, the reload round, limits, fingerprints,
the message framing, and how the workers' status and metrics add up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from tests.kit.servers import make_config
from wsproxy.config.load import load_config
from wsproxy.config.schema import LimitsConfig, RateConfig
from wsproxy.errors import ConfigErrors
from wsproxy.supervisor.merge import merge_metrics, merge_status, retiring_summary
from wsproxy.supervisor.messages import LineDecoder, ProtocolError, encode
from wsproxy.supervisor.table import (
    BACKOFF_MAX_S,
    STABLE_S,
    Backoff,
    ReloadRound,
    RoundState,
    WorkerSlot,
    WorkerState,
    adopter,
    fingerprint,
    hello_refusal,
    split_limits,
)


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff()
    delays = [backoff.exited(0.5) for _ in range(12)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == BACKOFF_MAX_S and max(delays) == BACKOFF_MAX_S
    assert backoff.exited(STABLE_S) == 0.1  # it ran long enough: a fresh start


def test_an_orphaned_slot_goes_to_the_ready_worker_adopting_least() -> None:
    slots = [WorkerSlot(i, state=WorkerState.READY) for i in range(3)]
    slots[0].state = WorkerState.DOWN
    assert adopter(slots, 0) == 1
    slots[0].adopted_by = 1
    slots[2].state = WorkerState.DOWN
    assert adopter(slots, 2) == 1  # the only ready one
    slots[1].state = WorkerState.STARTING
    assert adopter(slots, 2) is None


def test_a_round_commits_only_when_every_worker_prepared_the_same_config() -> None:
    round_ = ReloadRound.begin(1, "abc", {0: 100, 1: 101})
    assert round_.prepared(0, [], "abc") is RoundState.PREPARING
    assert round_.prepared(1, [], "abc") is RoundState.COMMITTING
    assert round_.committing_to({0, 1}) == {0, 1}
    assert round_.committed(0, []) is RoundState.COMMITTING
    assert round_.committed(1, []) is RoundState.APPLIED and not round_.errors


def test_one_refusal_abandons_the_round_everywhere_with_the_worker_named() -> None:
    round_ = ReloadRound.begin(2, "abc", {0: 100, 1: 101})
    round_.prepared(0, [], "abc")
    assert round_.prepared(1, ["f.yaml:3:5: pools: bad"], None) is RoundState.ABANDONED
    assert round_.errors == ["worker 1 (pid 101): f.yaml:3:5: pools: bad"]


def test_a_worker_that_loaded_another_config_is_a_refusal() -> None:
    round_ = ReloadRound.begin(3, "abc", {0: 100})
    assert round_.prepared(0, [], "xyz") is RoundState.ABANDONED
    assert "the file changed during the reload" in round_.errors[0]


def test_a_worker_that_exits_leaves_the_round_and_a_failed_commit_is_restarted() -> None:
    round_ = ReloadRound.begin(4, "abc", {0: 100, 1: 101, 2: 102})
    round_.prepared(0, [], "abc")
    round_.gone(2)
    assert round_.prepared(1, [], "abc") is RoundState.COMMITTING
    assert round_.committing_to({0, 1}) == {0, 1}
    round_.committed(0, [])
    assert round_.committed(1, ["listener x: cannot bind"]) is RoundState.APPLIED
    assert round_.restart == {1}


def test_a_round_without_workers_is_applied_at_once() -> None:
    assert ReloadRound.begin(5, "abc", {}).state is RoundState.APPLIED


def test_limits_are_split_across_workers_rounded_up() -> None:
    config = dataclasses.replace(
        make_config([1]),
        limits=LimitsConfig(
            max_connections=1001, max_connections_per_ip=10, handshake_rate_per_ip=RateConfig(rate_per_s=20.0, burst=5)
        ),
    )
    limits = split_limits(config, 4).limits
    assert (limits.max_connections, limits.max_connections_per_ip) == (251, 3)
    assert limits.handshake_rate_per_ip == RateConfig(rate_per_s=5.0, burst=2)
    assert split_limits(config, 1) is config
    capped = dataclasses.replace(
        config, pools={name: dataclasses.replace(pool, backends=tuple(dataclasses.replace(b, max_connections=9) for b in pool.backends))
                       for name, pool in config.pools.items()},
    )
    assert {b.max_connections for p in split_limits(capped, 4).pools.values() for b in p.backends} == {3}
    unlimited = dataclasses.replace(config, limits=LimitsConfig(max_connections=0))
    assert split_limits(unlimited, 4).limits.max_connections == 0  # 0 is "no limit", not a limit to split


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "w.yaml"
    path.write_text(text)
    return str(path)


BASE = """\
listeners: [{name: main, bind: "127.0.0.1:0"}]
routes: [{pool: echo}]
pools: {echo: {backends: [{address: "127.0.0.1:9"}]}}
"""


def test_fingerprints_tell_configs_apart_and_not_two_loads(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    first = fingerprint(load_config(path))
    assert fingerprint(load_config(path)) == first
    write(tmp_path, BASE.replace("127.0.0.1:9", "127.0.0.1:10"))
    assert fingerprint(load_config(path)) != first
    assert fingerprint(make_config([9])) != fingerprint(make_config([10]))


def test_fingerprints_leave_positions_out(tmp_path: Path) -> None:
    """The same TLS settings a line further down: the same config (``where`` is for messages only)."""
    from tests.kit.tls import make_pki, q

    pki = make_pki(tmp_path)
    tls = f'listeners: [{{name: main, bind: "127.0.0.1:0", tls: {{cert: {q(pki.cert_pem)}, key: {q(pki.key_pem)}}}}}]\n'
    rest = BASE.split("\n", 1)[1]
    first, moved = load_config(write(tmp_path, tls + rest)), load_config(write(tmp_path, "\n" + tls + rest))
    a, b = first.listeners[0].tls, moved.listeners[0].tls
    assert a is not None and b is not None and a.where != b.where
    assert fingerprint(first) == fingerprint(moved)


def test_workers_key(tmp_path: Path) -> None:
    import os

    assert load_config(write(tmp_path, BASE)).workers == 1
    assert load_config(write(tmp_path, BASE + "workers: 3\n")).workers == 3
    assert load_config(write(tmp_path, BASE + "workers: auto\n")).workers == len(os.sched_getaffinity(0))
    assert load_config(write(tmp_path, BASE + "upgrade: {timeout: 90s}\n")).upgrade.timeout_s == 90
    for bad, message in (
        ("workers: 0", "4:10: workers: expected an integer in 1..256, got 0"),
        ("workers: many", '4:10: workers: expected an integer in 1..256, got "many"'),
        ("upgrade: {timeout: 1h, grace: 2s}", "4:"),
    ):
        with pytest.raises(ConfigErrors) as caught:
            load_config(write(tmp_path, BASE + bad + "\n"))
        assert message in str(caught.value.errors[0])


def test_messages_are_json_lines_that_arrive_in_any_pieces() -> None:
    data = encode({"t": "hello", "pid": 7}) + encode({"t": "ready", "text": "a\nb"})
    decoder = LineDecoder()
    got = [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]
    assert got == [{"t": "hello", "pid": 7}, {"t": "ready", "text": "a\nb"}]
    with pytest.raises(ProtocolError):
        LineDecoder().feed(b"[1]\n")
    with pytest.raises(ProtocolError):
        LineDecoder(max_line_bytes=8).feed(b"x" * 9)


METRICS_0 = """\
# HELP wsproxy_sessions_active Established sessions.
# TYPE wsproxy_sessions_active gauge
wsproxy_sessions_active{route="*/"} 3.0
# HELP wsproxy_refused_total Refusals.
# TYPE wsproxy_refused_total counter
wsproxy_refused_total{reason="limit",route="-",status="503"} 2.0
wsproxy_refused_created{reason="limit",route="-",status="503"} 100.0
# HELP wsproxy_backend_health Health.
# TYPE wsproxy_backend_health gauge
wsproxy_backend_health{backend="b:1",pool="p",state="up"} 1.0
# HELP wsproxy_reloads_total Reloads.
# TYPE wsproxy_reloads_total counter
wsproxy_reloads_total 1.0
"""


def test_metrics_are_summed_labelled_per_worker_or_taken_once() -> None:
    content_type, body = merge_metrics(
        [(0, METRICS_0), (1, METRICS_0.replace("3.0", "4.0").replace("100.0", "50.0"))],
        [("wsproxy_reloads", "counter", "Reloads.", 5.0)],
    )
    assert content_type.startswith("text/plain; version=0.0.4")
    lines = set(body.decode().splitlines())
    assert 'wsproxy_sessions_active{route="*/",worker="0"} 3.0' in lines
    assert 'wsproxy_sessions_active{route="*/",worker="1"} 4.0' in lines
    assert 'wsproxy_refused_total{reason="limit",route="-",status="503"} 4.0' in lines
    assert 'wsproxy_refused_created{reason="limit",route="-",status="503"} 50.0' in lines
    assert 'wsproxy_backend_health{backend="b:1",pool="p",state="up"} 1.0' in lines
    assert "wsproxy_reloads_total 5.0" in lines and "wsproxy_reloads_total 1.0" not in lines


def test_status_sums_the_workers_and_keeps_the_supervisors_view() -> None:
    backend = {"address": "b:1", "health": "up", "draining": False, "ejected": False, "available": True}
    base = {"generation": 4, "pools": {"p": {"balance": "round_robin", "backends": [dict(backend)]}}}

    def report(sessions: int, draining: bool) -> dict[str, object]:
        return {
            "sessions": sessions, "refused_by_reason": {"limit": 1},
            "pools": {"p": {"backends": [{**backend, "active": sessions, "total": 10, "draining": draining}]}},
        }

    status = merge_status(base, [report(2, False), report(5, True)], [{"pid": 1}, {"pid": 2}])
    assert (status["generation"], status["sessions"], status["refused_by_reason"]) == (4, 7, {"limit": 2})
    merged = status["pools"]["p"]["backends"][0]
    assert (merged["active"], merged["total"], merged["draining"]) == (7, 20, True)
    assert status["workers"] == [{"pid": 1}, {"pid": 2}]


def worker_metrics(sessions: float, refused: int, latency_s: float) -> str:
    """One worker's text exposition, written by ``prometheus_client`` as a worker writes it."""
    registry = CollectorRegistry()
    Gauge("wsproxy_sessions_active", "Established sessions.", ["route"], registry=registry).labels("*/").set(sessions)
    Counter("wsproxy_refused", "Refusals.", ["reason"], registry=registry).labels("limit").inc(refused)
    Histogram("wsproxy_handshake_seconds", "Handshakes.", buckets=[0.1, 1], registry=registry).observe(latency_s)
    Info("wsproxy_build", "Build.", registry=registry).info({"version": "1"})
    return generate_latest(registry).decode()


def test_metrics_in_openmetrics_when_asked_and_the_text_format_otherwise() -> None:
    reports = [(0, worker_metrics(3, 2, 0.05)), (1, worker_metrics(4, 5, 0.5))]
    own = [("wsproxy_reloads", "counter", "Reloads.", 5.0), ("wsproxy_workers", "gauge", "Workers.", 2.0)]
    content_type, body = merge_metrics(reports, own, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}  # the strict parser: a valid exposition
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["wsproxy_refused"].type == "counter"
    assert samples[("wsproxy_refused_total", (("reason", "limit"),))] == 7
    assert ("wsproxy_refused_created", (("reason", "limit"),)) in samples  # inside its counter, as OpenMetrics wants
    assert samples[("wsproxy_handshake_seconds_count", ())] == 2
    assert samples[("wsproxy_handshake_seconds_bucket", (("le", "0.1"),))] == 1
    assert samples[("wsproxy_sessions_active", (("route", "*/"), ("worker", "1")))] == 4
    assert samples[("wsproxy_reloads_total", ())] == 5 and samples[("wsproxy_workers", ())] == 2
    assert "wsproxy_handshake_seconds_created" not in families

    for accept in (None, "", "text/plain", "*/*", "application/json"):
        content_type, body = merge_metrics(reports, own, accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        text = body.decode()
        assert "# EOF" not in text
        assert 'wsproxy_refused_total{reason="limit"} 7.0' in text.splitlines()
        assert "# TYPE wsproxy_refused_created gauge" in text  # the text format's way


def test_a_retiring_generation_sums_its_workers_and_any_generation_behind_it() -> None:
    reports = [{"sessions": 3}, None, {"sessions": 0}]
    summary = retiring_summary(100, reports, 2, 5000.0, None)
    assert summary == {"pid": 100, "sessions": 3, "workers": 2, "deadline_unix": 5000.0}
    behind = retiring_summary(200, [{"sessions": 4}], 1, 4000.0, summary)
    assert behind == {"pid": 200, "sessions": 7, "workers": 3, "deadline_unix": 5000.0}


def test_a_hello_is_refused_for_another_version_then_its_errors_then_another_config() -> None:
    good = {"t": "hello", "pid": 7, "version": "1.0", "fingerprint": "f"}
    assert hello_refusal(good, "1.0", "f") is None
    older = hello_refusal({**good, "version": "0.9", "errors": ["x"]}, "1.0", "f")
    assert older is not None and older.startswith("the installed wsproxy is 0.9, this supervisor and its workers run 1.0:")
    assert hello_refusal({**good, "errors": ["a.yaml:1:1: bad", "b"], "fingerprint": None}, "1.0", "f") == "a.yaml:1:1: bad; b"
    other = hello_refusal({**good, "fingerprint": "g"}, "1.0", "f")
    assert other is not None and other.startswith("the config loaded differs from the config in effect")
