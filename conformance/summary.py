"""Autobahn|Testsuite reports → per-group tables, the failures, and a verdict.

What this is: the pure part of `make conformance` (conformance/run.py). It
reads the fuzzing client's reports as already-parsed JSON (the agent → case →
result mapping of ``index.json``, and one per-case report each), counts each
group's outcomes for the direct and the proxied run, lists what failed through
the proxy with the close codes that were expected and seen, and decides the
exit status.

What it is not: it starts nothing, reads no file but the ones it is handed
paths for (``load_index``/``load_case``), and knows nothing about wsproxy.

An Autobahn case's headline outcome is its ``behavior``: OK, NON-STRICT,
INFORMATIONAL, UNIMPLEMENTED, FAILED, or NO_CLOSE (shown as "No Close" in
Autobahn's own report). NO_CLOSE and any value this module does not know are
counted as FAILED, so nothing unexpected can pass. ``behaviorClose`` (how the
connection ended) is reported beside it for the failures and in a separate
list when the proxied close differs from the direct one, but it does not
change the counts, as in Autobahn's own report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTCOMES = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
PASSING = ("OK", "NON-STRICT")

# The groups of the fuzzing client, in the order Autobahn numbers them
# (there is no group 8 or 11).
GROUP_TITLES: dict[int, str] = {
    1: "framing",
    2: "pings/pongs",
    3: "reserved bits",
    4: "opcodes",
    5: "fragmentation",
    6: "UTF-8 handling",
    7: "close handling",
    9: "limits/performance",
    10: "misc",
    12: "permessage-deflate (messages)",
    13: "permessage-deflate (parameters)",
}

CaseIndex = Mapping[str, Mapping[str, Any]]  # case id → index.json entry


def outcome(entry: Mapping[str, Any]) -> str:
    """The counted outcome of one index.json entry (see the module docstring)."""
    behavior = entry.get("behavior")
    return behavior if behavior in OUTCOMES else "FAILED"


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key: '6.10.2' after '6.9.1' (numeric, part by part)."""
    return tuple(int(part) for part in case_id.split("."))


def group_of(case_id: str) -> int:
    return int(case_id.split(".", 1)[0])


@dataclass(slots=True)
class GroupCounts:
    direct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    proxied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def passing_direct(self) -> int:
        return sum(self.direct[o] for o in PASSING)

    @property
    def passing_proxied(self) -> int:
        return sum(self.proxied[o] for o in PASSING)


def count_groups(direct: CaseIndex, proxied: CaseIndex) -> dict[int, GroupCounts]:
    """Outcome counts per group, for both runs, groups in numeric order."""
    groups: dict[int, GroupCounts] = {}
    for side, index in (("direct", direct), ("proxied", proxied)):
        for case_id, entry in index.items():
            counts = groups.setdefault(group_of(case_id), GroupCounts())
            getattr(counts, side)[outcome(entry)] += 1
    return dict(sorted(groups.items()))


@dataclass(frozen=True, slots=True)
class Failure:
    """One case that FAILED through the proxy, with what Autobahn saw."""

    case_id: str
    behavior: str  # as reported (FAILED, NO_CLOSE...)
    behavior_close: str
    description: str
    expectation: str
    expected_close_codes: tuple[int, ...]
    observed_close_code: int | None  # the close code the client received
    observed_close_reason: str | None
    client_close_code: int | None  # the close code the fuzzing client sent
    not_clean_reason: str | None
    result: str
    result_close: str
    direct_behavior: str | None  # the same case without the proxy

    def lines(self) -> list[str]:
        expected = "/".join(str(c) for c in self.expected_close_codes) or "-"
        reason = "" if self.observed_close_reason is None else f" {self.observed_close_reason!r}"
        out = [
            f"{self.case_id}  {self.behavior} (close {self.behavior_close}; direct: {self.direct_behavior or '-'})"
            f"  expected close {expected}, got {self.observed_close_code}{reason},"
            f" client sent {self.client_close_code}",
            f"    {self.description}",
            f"    expectation: {self.expectation}",
            f"    result: {self.result} / {self.result_close}",
        ]
        if self.not_clean_reason:
            out.append(f"    not clean: {self.not_clean_reason}")
        return out


def failure_of(case_id: str, entry: Mapping[str, Any], report: Mapping[str, Any],
               direct_entry: Mapping[str, Any] | None) -> Failure:
    """Build a Failure from the index entry and the per-case report."""
    expected_close = report.get("expectedClose") or {}
    return Failure(
        case_id=case_id,
        behavior=str(entry.get("behavior")),
        behavior_close=str(entry.get("behaviorClose")),
        description=_plain(str(report.get("description", ""))),
        expectation=str(report.get("expectation", "")),
        expected_close_codes=tuple(expected_close.get("closeCode", ())),
        observed_close_code=report.get("remoteCloseCode"),
        observed_close_reason=report.get("remoteCloseReason"),
        client_close_code=report.get("localCloseCode"),
        not_clean_reason=report.get("wasNotCleanReason"),
        result=str(report.get("result", "")),
        result_close=str(report.get("resultClose", "")),
        direct_behavior=None if direct_entry is None else str(direct_entry.get("behavior")),
    )


def _plain(html: str) -> str:
    """Autobahn's descriptions are HTML fragments: one line of text instead."""
    return " ".join(re.sub(r"<br\s*/?>", " ", html).split())


def failed_cases(proxied: CaseIndex) -> list[str]:
    return sorted((c for c, e in proxied.items() if outcome(e) == "FAILED"), key=case_key)


def close_differences(direct: CaseIndex, proxied: CaseIndex) -> list[tuple[str, str, str]]:
    """(case, direct behaviorClose, proxied behaviorClose) where they differ."""
    out = []
    for case_id in sorted(proxied, key=case_key):
        d = direct.get(case_id)
        if d is None:
            continue
        if d.get("behaviorClose") != proxied[case_id].get("behaviorClose"):
            out.append((case_id, str(d.get("behaviorClose")), str(proxied[case_id].get("behaviorClose"))))
    return out


def verdict(groups: Mapping[int, GroupCounts]) -> list[str]:
    """Why the run fails (empty: it passes).

    It fails if any case FAILED through the proxy, or if OK + NON-STRICT
    through the proxy is lower than direct in any group.
    """
    problems = []
    for group, counts in groups.items():
        if counts.proxied["FAILED"]:
            problems.append(f"group {group}: {counts.proxied['FAILED']} case(s) FAILED through the proxy")
        if counts.passing_proxied < counts.passing_direct:
            problems.append(
                f"group {group}: OK+NON-STRICT {counts.passing_proxied} through the proxy"
                f" < {counts.passing_direct} direct"
            )
    return problems


def format_table(groups: Mapping[int, GroupCounts]) -> list[str]:
    """One row per group: each outcome as direct/proxied, then a total row."""
    heads = ["group", *OUTCOMES]
    rows = []
    total = GroupCounts()
    for group, counts in groups.items():
        title = GROUP_TITLES.get(group, "")
        cells = [f"{group} {title}".rstrip()]
        for o in OUTCOMES:
            cells.append(f"{counts.direct[o]} / {counts.proxied[o]}")
            total.direct[o] += counts.direct[o]
            total.proxied[o] += counts.proxied[o]
        rows.append(cells)
    rows.append(["all", *(f"{total.direct[o]} / {total.proxied[o]}" for o in OUTCOMES)])
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [
        "direct / through wsproxy",
        line(heads),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(r) for r in rows),
    ]


def load_index(path: Path, agent: str | None = None) -> dict[str, Any]:
    """The case → entry mapping of one agent of an index.json (the only one if None)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if agent is None:
        if len(data) != 1:
            raise ValueError(f"{path}: expected one agent, found {sorted(data)}")
        (agent,) = data
    return dict(data[agent])


def load_case(report_dir: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The per-case report an index.json entry names ({} if it is missing)."""
    path = report_dir / str(entry.get("reportfile", ""))
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded
