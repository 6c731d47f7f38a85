"""The retiring generation's series in the new supervisor's ``/metrics`` (``merge.merge_families``'s ``retiring``
and ``exited``), purely: worker texts written by ``prometheus_client`` as a worker writes them, the retiring text
merged from them as the old supervisor merges it, and both encodings parsed back (OpenMetrics by its strict
parser). The same across a real upgrade: ``test_upgrade_window.py``.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from wsproxy.supervisor.merge import OLDER_SLOT, merge_metrics

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
RETIRING = ("generation", "retiring")
#: What the new supervisor answers itself (``AdminView._own_series``).
OWN = [
    ("wsproxy_reloads", "counter", "Reloads.", 5.0), ("wsproxy_workers", "gauge", "Workers.", 2.0),
    ("wsproxy_worker_restarts", "counter", "Restarts.", 0.0),
]


def worker_metrics(sessions: float, closed: dict[str, int], handshake_s: float, *, config_generation: int = 1) -> str:
    """One worker's text exposition: a per-worker gauge, a summed counter (several series), a histogram, and families
    the supervisor owns or that describe the one proxy."""
    registry = CollectorRegistry()
    Gauge("wsproxy_sessions_active", "Established sessions.", ["route"], registry=registry).labels("*/").set(sessions)
    counter = Counter("wsproxy_sessions_closed", "Sessions ended.", ["outcome"], registry=registry)
    for outcome, count in closed.items():
        counter.labels(outcome).inc(count)
    Gauge("wsproxy_backend_sessions_active", "Backend sessions.", ["backend"], registry=registry).labels("b:1").set(sessions)
    Histogram("wsproxy_handshake_duration_seconds", "Handshakes.", buckets=[0.1, 1], registry=registry).observe(handshake_s)
    Gauge("wsproxy_config_generation", "Config generation.", registry=registry).set(config_generation)
    Gauge("wsproxy_backend_health", "Health.", ["backend", "state"], registry=registry).labels("b:1", "up").set(1)
    Info("wsproxy_build", "Build.", registry=registry).info({"version": "1"})
    Counter("wsproxy_reloads", "Reloads.", registry=registry).inc(1)
    Counter("process_cpu_seconds", "CPU.", registry=registry).inc(sessions + 0.5)
    return generate_latest(registry).decode()


def retiring_text(*reports: tuple[int, str], own: list[tuple[str, str, str, float]] | None = None) -> str:
    """What the old supervisor sends in its ``retiring`` message (``upgrade._tell_newer``; ``own``: what it would
    send if it passed its own series too, as its ``render_metrics`` does)."""
    return merge_metrics(list(reports), own or ())[1].decode()


def parsed(body: bytes, accept: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = body.decode()
    families = list(openmetrics_families(text) if accept else text_families(text))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_the_retiring_generations_series_come_labelled_in_their_families_in_both_encodings() -> None:
    new = [(0, worker_metrics(1, {"normal": 1}, 0.05, config_generation=2))]
    old = retiring_text(
        (0, worker_metrics(3, {"normal": 4, "drain": 1}, 0.5)), (1, worker_metrics(2, {"normal": 6}, 0.05)),
        own=[*OWN, ("wsproxy_worker_restarts", "counter", "Restarts.", 3.0)],
    )
    for accept in (OPENMETRICS, None):
        content_type, body = merge_metrics(new, OWN, accept, retiring=old)
        assert content_type.startswith("application/openmetrics-text" if accept else "text/plain")
        text = body.decode()
        assert text.count("# EOF") == (1 if accept else 0) and (not accept or text.endswith("# EOF\n"))
        types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
        assert Tally(types).most_common(1)[0][1] == 1 and sorted(types) == sorted(helps)  # one block per family
        samples = parsed(body, accept)  # both parsers accept it (OpenMetrics: the strict one)

        # the new generation's series as without an upgrade; the retiring one's beside them, labelled
        assert samples[("wsproxy_sessions_active", (("route", "*/"), ("worker", "0")))] == 1
        assert samples[("wsproxy_sessions_active", (RETIRING, ("route", "*/"), ("worker", "0")))] == 3
        assert samples[("wsproxy_sessions_active", (RETIRING, ("route", "*/"), ("worker", "1")))] == 2
        assert samples[("wsproxy_sessions_closed_total", (("outcome", "normal"),))] == 1
        assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "normal")))] == 10
        assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "drain")))] == 1
        assert samples[("wsproxy_backend_sessions_active", (("backend", "b:1"), RETIRING))] == 5
        assert samples[("wsproxy_handshake_duration_seconds_count", (RETIRING,))] == 2
        assert samples[("wsproxy_handshake_duration_seconds_bucket", (RETIRING, ("le", "0.1")))] == 1
        if accept:  # _created inside its family, for each series
            assert ("wsproxy_sessions_closed_created", (RETIRING, ("outcome", "drain"))) in samples
            assert ("wsproxy_handshake_duration_seconds_created", (RETIRING,)) in samples

        # every sample of the old generation is labelled; none of the new one's is
        retiring = {key for key in samples if RETIRING in key[1]}
        assert {name for name, _ in retiring} >= {"wsproxy_sessions_active", "wsproxy_sessions_closed_total"}
        assert len(retiring) == len([k for k in samples if k not in parsed(merge_metrics(new, OWN, accept)[1], accept)])

        # families of the supervisor and of the one proxy: the new generation's only
        names = {name for name, _ in retiring}
        assert not names & {
            "wsproxy_reloads_total", "wsproxy_reloads_created", "wsproxy_workers", "wsproxy_worker_restarts_total",
            "wsproxy_config_generation", "wsproxy_backend_health", "wsproxy_build_info",
        }, names
        assert samples[("wsproxy_config_generation", ())] == 2 and samples[("wsproxy_reloads_total", ())] == 5
        assert samples[("wsproxy_worker_restarts_total", ())] == 0
        assert samples[("process_cpu_seconds_total", (RETIRING, ("worker", "1")))] == 2.5


def test_without_a_retiring_generation_or_new_reports_yet_each_side_stands_alone() -> None:
    old = retiring_text((0, worker_metrics(3, {"normal": 4}, 0.5)))
    for accept in (OPENMETRICS, None):
        samples = parsed(merge_metrics([], OWN, accept, retiring=old)[1], accept)  # the new workers not reported yet
        assert samples[("wsproxy_sessions_active", (RETIRING, ("route", "*/"), ("worker", "0")))] == 3
        assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "normal")))] == 4
        assert ("wsproxy_config_generation", ()) not in samples
        gone = parsed(merge_metrics([(0, worker_metrics(1, {}, 0.1))], OWN, accept, retiring=None)[1], accept)
        assert not [key for key in gone if RETIRING in key[1]]  # the old generation has exited: its series are gone


def test_a_family_whose_type_changed_with_the_upgrade_is_the_new_generations_only() -> None:
    registry = CollectorRegistry()
    Counter("wsproxy_sessions_active", "Was a counter.", ["route"], registry=registry).labels("*/").inc(7)
    Gauge("wsproxy_discovered_backends", "Only in the old version.", registry=registry).set(4)
    old = retiring_text((0, generate_latest(registry).decode()))
    for accept in (OPENMETRICS, None):
        samples = parsed(merge_metrics([(0, worker_metrics(1, {}, 0.1))], OWN, accept, retiring=old)[1], accept)
        assert not [k for k in samples if k[0].startswith("wsproxy_sessions_active") and RETIRING in k[1]]
        assert samples[("wsproxy_discovered_backends", (RETIRING,))] == 4


def test_an_exited_workers_counters_stay_in_the_retiring_sums_its_gauges_and_own_series_do_not() -> None:
    gone = worker_metrics(3, {"normal": 4, "drain": 2}, 0.5)  # its last report, before its sessions ended
    live = worker_metrics(2, {"normal": 1}, 0.05)
    samples = parsed(merge_metrics([(1, live)], exited=[(0, gone)], accept=OPENMETRICS)[1], OPENMETRICS)
    assert samples[("wsproxy_sessions_closed_total", (("outcome", "normal"),))] == 5  # not back to 1
    assert samples[("wsproxy_sessions_closed_total", (("outcome", "drain"),))] == 2
    assert ("wsproxy_sessions_closed_created", (("outcome", "drain"),)) in samples
    assert samples[("wsproxy_handshake_duration_seconds_count", ())] == 2
    assert samples[("wsproxy_backend_sessions_active", (("backend", "b:1"),))] == 2  # a gauge: the live worker's
    assert ("wsproxy_sessions_active", (("route", "*/"), ("worker", "0"))) not in samples
    assert samples[("wsproxy_sessions_active", (("route", "*/"), ("worker", "1")))] == 2
    assert ("process_cpu_seconds_total", (("worker", "0"),)) not in samples  # a counter, but that process's own
    assert samples[("process_cpu_seconds_total", (("worker", "1"),))] == 2.5


def test_the_supervisors_own_families_take_nothing_from_the_workers_not_even_created() -> None:
    """A worker counts reloads too (``wsproxy_reloads_total`` and ``_created``); the supervisor's count is the one."""
    for accept in (None, OPENMETRICS):
        _content_type, body = merge_metrics([(0, worker_metrics(1, {"normal": 1}, 0.05))], OWN, accept)
        samples = parsed(body, accept)
        reloads = {name for name, _labels in samples if name.startswith("wsproxy_reloads")}
        assert reloads == {"wsproxy_reloads_total"}, reloads
        assert samples[("wsproxy_reloads_total", ())] == 5.0


def test_two_upgrades_in_a_row_the_newest_counts_both_retiring_generations_and_keeps_the_oldests_closes() -> None:
    """A retires behind B, B behind C (``upgrade._tell_newer`` passes A's text on as ``OLDER_SLOT``)."""
    a_text = retiring_text((0, worker_metrics(3, {"normal": 4}, 0.5)), (1, worker_metrics(2, {"drain": 2}, 0.05)))
    b_workers = [(0, worker_metrics(1, {"normal": 1}, 0.05)), (1, worker_metrics(1, {}, 0.05))]
    new = [(0, worker_metrics(0, {}, 0.05, config_generation=3))]

    # A still there: C's retiring series are A's and B's, A's per-worker ones apart from B's
    b_text = merge_metrics([*b_workers, (OLDER_SLOT, a_text)])[1].decode()
    samples = parsed(merge_metrics(new, OWN, OPENMETRICS, retiring=b_text)[1], OPENMETRICS)
    sessions = {dict(labels)["worker"]: v for (n, labels), v in samples.items() if n == "wsproxy_sessions_active"
                and RETIRING in labels}
    assert sessions == {"0": 1, "1": 1, "older:0": 3, "older:1": 2}, sessions
    assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "normal")))] == 5
    assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "drain")))] == 2
    assert samples[("wsproxy_backend_sessions_active", (("backend", "b:1"), RETIRING))] == 7
    assert samples[("wsproxy_handshake_duration_seconds_count", (RETIRING,))] == 4
    assert samples[("process_cpu_seconds_total", (RETIRING, ("worker", "older:0")))] == 3.5

    # A has exited: its closes and handshakes stay in the retiring sums, its gauges and processes are gone
    b_text = merge_metrics(b_workers, exited=[(OLDER_SLOT, a_text)])[1].decode()
    samples = parsed(merge_metrics(new, OWN, OPENMETRICS, retiring=b_text)[1], OPENMETRICS)
    assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "normal")))] == 5  # not back to 1
    assert samples[("wsproxy_sessions_closed_total", (RETIRING, ("outcome", "drain")))] == 2
    assert ("wsproxy_sessions_closed_created", (RETIRING, ("outcome", "drain"))) in samples
    assert samples[("wsproxy_handshake_duration_seconds_count", (RETIRING,))] == 4
    assert samples[("wsproxy_backend_sessions_active", (("backend", "b:1"), RETIRING))] == 2
    assert not [labels for (_, labels) in samples if ("worker", "older:0") in labels or ("worker", "older:1") in labels]
