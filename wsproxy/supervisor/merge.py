"""The whole proxy's ``/status`` and ``/metrics`` from what each worker reported. No I/O here.

Each worker sends its own status document and metrics text once a second
(``supervisor.worker``); the supervisor answers the admin API from the last
reports, so what it shows is at most about a second old.

Status: counts of sessions, connections, refusals, bytes and messages are
sums; per backend, ``active``, ``total`` and the traffic are sums, while
health, round trip and last check come from the supervisor's own checks;
``draining`` and ``ejected`` are true when they are in any worker. Reloads
and the generation are the supervisor's. ``workers`` lists each worker.

Metrics: series are summed across workers (``_created`` timestamps: the
earliest), except

- ``PER_WORKER`` families (the process's own resources, the event loop, the
  open sessions): one series per worker, with a ``worker`` label (the slot);
- ``SAME_IN_EVERY_WORKER`` families (config, health verdicts, certificates):
  the largest value, not a sum (they describe the one proxy);
- reload counters: the supervisor's (``supervisor_families``).

During an upgrade's window, the generation that retires (``retiring``: the
text its supervisor merged from its own workers, sent once a second over the
upgrade channel) adds its series, each with the label
``generation="retiring"`` (``RETIRING_LABEL``), which the new generation's
series never carry: each retiring series is a counter or gauge of its own,
which stops existing when the old generation exits (a sum of both
generations would drop then, which Prometheus reads as a counter reset). The
families the supervisor answers itself (``SUPERVISOR_OWN``, ``own``) and
those that describe the one proxy (``SAME_IN_EVERY_WORKER``: config, health,
certificates, build) are the new generation's only; ``PER_WORKER`` series
keep their ``worker`` label; a family whose type changed with the upgrade is
the new generation's only. A retiring supervisor also counts the workers it
saw exit (``exited``: their last report): their counters and histograms stay
in its sums, so these do not go backwards when one of its workers is gone
before the others, while their gauges and per-worker series are gone with
them.

Two upgrades in a row: a retiring supervisor with a generation still
retiring behind it (an upgrade during the window of the one before) adds
that generation's merged text to what it sends as one more report, under the
slot ``OLDER_SLOT``, so the newest supervisor's ``generation="retiring"``
series count every generation that retires. The older generation's
per-worker series keep their ``worker`` label, prefixed (``older:0``); once it
has exited, its last text stays in the sums like an exited worker's, so the
retiring counters do not go backwards when it goes.

The merged families are written as the single process writes its own
(``prometheus_client``'s encoders, ``choose_encoder``): the text format, or
OpenMetrics (``# EOF`` at the end) when the scraper's ``Accept`` asks for
``application/openmetrics-text``. The workers report the text format, where a
counter's or histogram's ``_created`` samples are a gauge family of their
own; they are put back into their family, where OpenMetrics wants them (the
text encoder writes them apart again).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

#: Families whose value is one worker's own: labelled with ``worker``.
PER_WORKER = (
    "process_", "python_gc_", "python_info", "wsproxy_event_loop_lag_seconds", "wsproxy_event_loop_delay_seconds",
    "wsproxy_sessions_active", "wsproxy_draining_sessions",
)
#: Families every worker reports alike (or where any worker's is the proxy's): the largest value.
SAME_IN_EVERY_WORKER = (
    "wsproxy_build_info", "wsproxy_backend_health", "wsproxy_backend_check_rtt_seconds", "wsproxy_backend_draining",
    "wsproxy_backend_ejected", "wsproxy_certificate_expiry_timestamp_seconds", "wsproxy_config_generation",
    "wsproxy_last_reload_success_timestamp_seconds",
)
#: Families the supervisor answers itself (a refused reload never reaches the workers).
SUPERVISOR_OWN = ("wsproxy_reloads", "wsproxy_reload_failures")

#: The label on every series of the generation an upgrade retires (``merge_families``'s ``retiring``).
RETIRING_LABEL = ("generation", "retiring")
#: The slot under which a retiring supervisor merges the text of a generation retiring behind it.
OLDER_SLOT = "older"

#: Families whose ``_created`` samples the text format writes as a gauge family ``NAME_created``.
_WITH_CREATED = ("counter", "histogram", "summary", "gaugehistogram")
#: Families whose values only grow while their process lives: what an exited worker still adds to a sum.
_CUMULATIVE = ("counter", "histogram", "summary")
#: Labels that tell the samples of one series (an OpenMetrics "group") apart, not series.
_WITHIN_SERIES = ("le", "quantile")


@dataclass(slots=True)
class _Family:
    name: str
    kind: str
    documentation: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or (p.endswith("_") and name.startswith(p)) for p in prefixes)


def merge_metrics(
    reports: Iterable[tuple[int | str, str]],
    own: Iterable[tuple[str, str, str, float]] = (),
    accept: str | None = None,
    *,
    retiring: str | None = None,
    exited: Iterable[tuple[int | str, str]] = (),
) -> tuple[str, bytes]:
    """(content type, body) of every worker's metrics together: OpenMetrics if ``accept`` asks for it, else text.

    ``reports``: (worker slot, or ``OLDER_SLOT``; its metrics in the text format); ``own``: the
    supervisor's series as (family, type, help, value), replacing the workers'
    families of that name; ``retiring`` and ``exited``: see ``merge_families``.
    """
    encoder, content_type = choose_encoder(accept or "")
    metrics = merge_families(reports, own, retiring=retiring, exited=exited)
    return content_type, encoder(_Merged(metrics))  # type: ignore[arg-type]  # a registry in all but name


def merge_families(
    reports: Iterable[tuple[int | str, str]],
    own: Iterable[tuple[str, str, str, float]] = (),
    *,
    retiring: str | None = None,
    exited: Iterable[tuple[int | str, str]] = (),
) -> list[Metric]:
    """The merged families (see the module docstring), ``_created`` samples inside their family.

    ``retiring``: the metrics (text format) of the generation an upgrade
    retires, as its supervisor merged them, added with ``RETIRING_LABEL``;
    ``exited``: (slot, last metrics) of workers that exited, whose counters
    and histograms stay in the sums (a retiring supervisor's).
    """
    families: dict[str, _Family] = {}
    own = list(own)
    replaced = {name for name, _kind, _doc, _value in own}
    for slot, text, alive in [*((s, t, True) for s, t in reports), *((s, t, False) for s, t in exited)]:
        cumulative: set[str] = set()
        for parsed in text_string_to_metric_families(text):
            base = _base(parsed.name)
            if _supervisors(base, replaced):
                continue  # (with its NAME_created: the supervisor's series has none)
            if parsed.type in _CUMULATIVE:
                cumulative.add(parsed.name)
            per_worker = _starts(parsed.name, PER_WORKER)
            if not alive and (per_worker or base not in cumulative):
                continue  # its gauges and its own series are gone with it
            merged = families.setdefault(parsed.name, _Family(parsed.name, parsed.type, parsed.documentation))
            largest = _starts(parsed.name, SAME_IN_EVERY_WORKER)
            for sample in parsed.samples:
                labels = dict(sample.labels)
                if per_worker:  # a merged text's (OLDER_SLOT) carry their worker label already
                    labels["worker"] = f"{slot}:{labels['worker']}" if "worker" in labels else str(slot)
                key = (sample.name, tuple(sorted(labels.items())))
                value = float(sample.value)
                if key not in merged.samples:
                    merged.samples[key] = value
                elif sample.name.endswith("_created"):
                    merged.samples[key] = min(merged.samples[key], value)
                elif largest:
                    merged.samples[key] = max(merged.samples[key], value)
                else:
                    merged.samples[key] += value
    if retiring:
        _add_retiring(families, retiring, replaced)
    for name, kind, documentation, value in own:
        sample_name = name + "_total" if kind == "counter" else name
        families[name] = _Family(name, kind, documentation, {(sample_name, ()): value})
    for name in list(families):  # NAME_created (a gauge in the text format) back into NAME
        parent = families.get(name[: -len("_created")]) if name.endswith("_created") else None
        if parent is not None and parent.kind in _WITH_CREATED:
            parent.samples.update(families.pop(name).samples)
    metrics = []
    for family in families.values():
        kind = family.kind if family.kind in (*_WITH_CREATED, "gauge", "unknown") else "unknown"
        metric = Metric(family.name, family.documentation, kind)
        for sample_name, label_pairs, value in _grouped(family.samples):
            metric.add_sample(sample_name, dict(label_pairs), value)
        metrics.append(metric)
    return metrics


def _supervisors(base: str, replaced: set[str]) -> bool:
    """Is family ``base`` one the supervisor answers itself (``own``, ``SUPERVISOR_OWN``), never a worker's?"""
    return base in replaced or _starts(base, SUPERVISOR_OWN)


def _base(name: str) -> str:
    """The family a text-format family belongs to: ``NAME`` for ``NAME_created``."""
    return name[: -len("_created")] if name.endswith("_created") else name


def _add_retiring(families: dict[str, _Family], text: str, replaced: set[str]) -> None:
    """The retiring generation's series into ``families``, each with ``RETIRING_LABEL`` (see the module docstring)."""
    skipped: set[str] = set()
    for parsed in text_string_to_metric_families(text):
        base = _base(parsed.name)
        if base in skipped or _supervisors(base, replaced) or _starts(base, SAME_IN_EVERY_WORKER):
            continue
        merged = families.setdefault(parsed.name, _Family(parsed.name, parsed.type, parsed.documentation))
        if merged.kind != parsed.type:  # another version's family of that name: the new one's only
            skipped.add(base)
            continue
        for sample in parsed.samples:
            labels = dict(sample.labels)
            labels[RETIRING_LABEL[0]] = RETIRING_LABEL[1]
            merged.samples[(sample.name, tuple(sorted(labels.items())))] = float(sample.value)


def _grouped(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The samples of one family, those of each series together (OpenMetrics wants no series interleaved).

    In the order each series first appears, its samples in their order: a
    counter's ``_created`` samples (merged back from their own family) and a
    retiring generation's series would otherwise come after all the others.
    """
    series: dict[tuple[tuple[str, str], ...], list[tuple[str, tuple[tuple[str, str], ...], float]]] = {}
    for (sample_name, label_pairs), value in samples.items():
        key = tuple(pair for pair in label_pairs if pair[0] not in _WITHIN_SERIES)
        series.setdefault(key, []).append((sample_name, label_pairs, value))
    return [sample for group in series.values() for sample in group]


class _Merged:
    """What an encoder of ``prometheus_client`` reads: a ``collect()`` of the merged families."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


_SUMMED = (
    "sessions", "draining_sessions", "connections", "sessions_closed", "refused",
    "bytes_up", "bytes_down", "messages_up", "messages_down",
)
_BACKEND_SUMMED = ("active", "total", "bytes_up", "bytes_down", "messages_up", "messages_down")
_BACKEND_ANY = ("draining", "ejected")


def merge_status(base: dict[str, Any], reports: list[dict[str, Any]], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """``/status`` of the whole proxy.

    ``base``: the supervisor's own document (generation, reloads, the config's
    listeners, routes and pools with the health of its checks, every count 0);
    ``reports``: each worker's last status; ``workers``: the ``workers`` list.
    """
    status = dict(base)
    for key in _SUMMED:
        status[key] = sum(int(r.get(key, 0) or 0) for r in reports)
    by_reason: dict[str, int] = {}
    for report in reports:
        for reason, count in (report.get("refused_by_reason") or {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + int(count)
    status["refused_by_reason"] = by_reason
    pools: dict[str, Any] = {}
    for name, pool in (base.get("pools") or {}).items():
        backends = []
        for backend in pool["backends"]:
            merged = dict(backend)
            seen = [
                b for r in reports for b in ((r.get("pools") or {}).get(name) or {}).get("backends", [])
                if b.get("address") == backend["address"]
            ]
            for key in _BACKEND_SUMMED:
                merged[key] = sum(int(b.get(key, 0) or 0) for b in seen)
            for key in _BACKEND_ANY:
                merged[key] = bool(backend.get(key)) or any(bool(b.get(key)) for b in seen)
            if seen:
                merged["available"] = any(bool(b.get("available")) for b in seen)
            backends.append(merged)
        pools[name] = {**pool, "backends": backends}
    status["pools"] = pools
    status["workers"] = workers
    return status


def retiring_summary(
    pid: int, reports: Iterable[dict[str, Any] | None], workers: int, deadline_unix: float, older: dict[str, Any] | None
) -> dict[str, Any]:
    """What a retiring supervisor tells its successor once a second, for ``/status``'s ``retiring``.

    ``pid``: the retiring supervisor's; ``reports``: its workers' last status
    reports (their ``sessions`` add up); ``deadline_unix``: when its workers
    close what is left (``upgrade.timeout`` after the hand-over); ``older``:
    the summary of a generation that retires behind it (an upgrade during the
    window), whose sessions and workers are counted too.
    """
    summary: dict[str, Any] = {
        "pid": pid,
        "sessions": sum(int((r or {}).get("sessions", 0) or 0) for r in reports),
        "workers": workers,
        "deadline_unix": deadline_unix,
    }
    if older:
        summary["sessions"] += int(older.get("sessions") or 0)
        summary["workers"] += int(older.get("workers") or 0)
        summary["deadline_unix"] = max(deadline_unix, float(older.get("deadline_unix") or 0.0))
    return summary
