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

#: Families whose ``_created`` samples the text format writes as a gauge family ``NAME_created``.
_WITH_CREATED = ("counter", "histogram", "summary", "gaugehistogram")


@dataclass(slots=True)
class _Family:
    name: str
    kind: str
    documentation: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or (p.endswith("_") and name.startswith(p)) for p in prefixes)


def merge_metrics(
    reports: Iterable[tuple[int, str]], own: Iterable[tuple[str, str, str, float]] = (), accept: str | None = None
) -> tuple[str, bytes]:
    """(content type, body) of every worker's metrics together: OpenMetrics if ``accept`` asks for it, else text.

    ``reports``: (worker slot, its metrics in the text format); ``own``: the
    supervisor's series as (family, type, help, value), replacing the workers'
    families of that name.
    """
    encoder, content_type = choose_encoder(accept or "")
    return content_type, encoder(_Merged(merge_families(reports, own)))  # type: ignore[arg-type]  # a registry in all but name


def merge_families(reports: Iterable[tuple[int, str]], own: Iterable[tuple[str, str, str, float]] = ()) -> list[Metric]:
    """The merged families (see the module docstring), ``_created`` samples inside their family."""
    families: dict[str, _Family] = {}
    own = list(own)
    replaced = {name for name, _kind, _doc, _value in own}
    for slot, text in reports:
        for parsed in text_string_to_metric_families(text):
            if parsed.name in replaced or _starts(parsed.name, SUPERVISOR_OWN):
                continue
            merged = families.setdefault(parsed.name, _Family(parsed.name, parsed.type, parsed.documentation))
            per_worker = _starts(parsed.name, PER_WORKER)
            largest = _starts(parsed.name, SAME_IN_EVERY_WORKER)
            for sample in parsed.samples:
                labels = dict(sample.labels)
                if per_worker:
                    labels["worker"] = str(slot)
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
        for (sample_name, label_pairs), value in family.samples.items():
            metric.add_sample(sample_name, dict(label_pairs), value)
        metrics.append(metric)
    return metrics


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
