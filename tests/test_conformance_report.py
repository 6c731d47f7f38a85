"""The pure parts of `make conformance`: case selection and the report summariser.

Fed with a small sample of real Autobahn|Testsuite reports
(conformance/samples/: a direct and a proxied run of cases 1.1.1, 2.1, 2.10,
6.3.1, 7.9.1 and 12.1.1, made by conformance/run.py against wsproxy before it
checked UTF-8 and close codes; the per-case reports are trimmed to the fields
the summariser reads). Needs neither Python 2.7 nor Autobahn.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conformance import summary
from conformance.run import select_cases, wsproxy_config

SAMPLES = Path(__file__).resolve().parent.parent / "conformance" / "samples"


@pytest.fixture
def direct() -> dict:
    return summary.load_index(SAMPLES / "direct" / "index.json")


@pytest.fixture
def proxied() -> dict:
    return summary.load_index(SAMPLES / "proxied" / "index.json", agent="wsproxy")


def test_counts_per_group(direct: dict, proxied: dict) -> None:
    groups = summary.count_groups(direct, proxied)
    assert list(groups) == [1, 2, 6, 7, 12]
    assert groups[2].direct["OK"] == groups[2].proxied["OK"] == 2
    assert groups[6].direct == {"OK": 1, "NON-STRICT": 0, "INFORMATIONAL": 0, "UNIMPLEMENTED": 0, "FAILED": 0}
    assert groups[6].proxied["FAILED"] == 1 and groups[6].passing_proxied == 0
    assert groups[7].proxied["FAILED"] == 1
    assert groups[12].direct["OK"] == groups[12].proxied["OK"] == 1


def test_failures_name_expected_and_observed_close_codes(direct: dict, proxied: dict) -> None:
    assert summary.failed_cases(proxied) == ["6.3.1", "7.9.1"]
    case = summary.failure_of(
        "7.9.1", proxied["7.9.1"],
        summary.load_case(SAMPLES / "proxied", proxied["7.9.1"]), direct["7.9.1"],
    )
    assert case.expected_close_codes == (1002,)
    assert case.observed_close_code == 1014
    assert case.observed_close_reason == "backend went away"
    assert case.client_close_code == 0
    assert case.direct_behavior == "OK"
    text = "\n".join(case.lines())
    assert "expected close 1002, got 1014 'backend went away'" in text
    utf8 = summary.failure_of(
        "6.3.1", proxied["6.3.1"], summary.load_case(SAMPLES / "proxied", proxied["6.3.1"]), direct["6.3.1"]
    )
    assert utf8.expected_close_codes == (1007,)
    assert "<br>" not in utf8.description and "MESSAGE:" in utf8.description


def test_verdict_fails_on_failed_cases_and_lost_passes(direct: dict, proxied: dict) -> None:
    problems = summary.verdict(summary.count_groups(direct, proxied))
    assert problems == [
        "group 6: 1 case(s) FAILED through the proxy",
        "group 6: OK+NON-STRICT 0 through the proxy < 1 direct",
        "group 7: 1 case(s) FAILED through the proxy",
        "group 7: OK+NON-STRICT 0 through the proxy < 1 direct",
    ]
    assert summary.verdict(summary.count_groups(direct, direct)) == []


def test_fewer_passes_without_a_failure_still_fail(direct: dict) -> None:
    # OK through the proxy turned INFORMATIONAL: nothing FAILED, yet it is worse
    worse = copy.deepcopy(direct)
    worse["2.1"]["behavior"] = "INFORMATIONAL"
    assert summary.verdict(summary.count_groups(direct, worse)) == [
        "group 2: OK+NON-STRICT 1 through the proxy < 2 direct"
    ]
    # NON-STRICT counts as passing
    worse["2.1"]["behavior"] = "NON-STRICT"
    assert summary.verdict(summary.count_groups(direct, worse)) == []


@pytest.mark.parametrize("behavior", ["NO_CLOSE", "SOMETHING NEW", None])
def test_no_close_and_unknown_outcomes_count_as_failed(direct: dict, behavior: str | None) -> None:
    odd = copy.deepcopy(direct)
    odd["1.1.1"]["behavior"] = behavior
    assert summary.count_groups(direct, odd)[1].proxied["FAILED"] == 1
    assert summary.failed_cases(odd) == ["1.1.1"]


def test_table_has_a_row_per_group_and_a_total(direct: dict, proxied: dict) -> None:
    lines = summary.format_table(summary.count_groups(direct, proxied))
    rows = [line for line in lines if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "group", "1 framing", "2 pings/pongs", "6 UTF-8 handling", "7 close handling",
        "12 permessage-deflate (messages)", "all",
    ]
    total = rows[-1].split("|")
    assert total[2].strip() == "6 / 4"  # OK direct / proxied
    assert total[6].strip() == "0 / 2"  # FAILED


def test_close_differences(direct: dict, proxied: dict) -> None:
    assert summary.close_differences(direct, proxied) == [
        ("6.3.1", "OK", "FAILED"), ("7.9.1", "OK", "WRONG CODE"),
    ]


def test_case_ids_sort_numerically() -> None:
    assert sorted(["6.10.1", "6.9.2", "10.1.1", "2.1", "6.9.10"], key=summary.case_key) == [
        "2.1", "6.9.2", "6.9.10", "6.10.1", "10.1.1",
    ]


def test_load_index_wants_one_agent_unless_named(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text('{"a": {"1.1.1": {}}, "b": {}}')
    with pytest.raises(ValueError, match="expected one agent"):
        summary.load_index(path)
    assert summary.load_index(path, agent="a") == {"1.1.1": {}}
    assert summary.load_case(tmp_path, {"reportfile": "missing.json"}) == {}


def test_case_selection() -> None:
    every = select_cases("")
    assert every["echo"] == ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
    assert every["deflate"] == ["12.*", "13.*"]
    assert select_cases("all") == every
    assert select_cases("9, 6.3.*  7.9.1") == {"echo": ["9.*", "6.3.*", "7.9.1"]}
    assert select_cases("13.1.1") == {"deflate": ["13.1.1"]}
    with pytest.raises(SystemExit, match="bad CASES entry"):
        select_cases("6.3; rm -rf /")


def test_generated_config_is_valid() -> None:
    from wsproxy.config.load import parse_config

    config = parse_config(wsproxy_config(9001, 9002), "conformance.yaml")
    assert [r.path for r in config.routes] == ["/deflate", "/"]
    assert config.limits.max_message_bytes == 0
