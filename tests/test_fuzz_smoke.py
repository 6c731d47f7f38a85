"""The fuzzers of fuzz/ in the test suite: their seeds, their open findings, and a few seconds of fuzzing.

- Every committed seed (fuzz/corpus/TARGET/) replays through the target's
  ``test_one_input`` without a finding, with or without atheris installed, so
  the harness code runs in every test run.
- Every open finding (fuzz/findings/TARGET-*) still reproduces. Once one no
  longer does, its bug was fixed: move the file into fuzz/corpus/TARGET/ (it
  becomes a seed that guards the fix) and drop its row in fuzz/findings/README.md.
- A harness catches the bugs it is there for: with a scanner that forgets the
  masking rule, a seed makes the frame target report a finding.
- With atheris installed (the ``test`` extra on Linux x86-64), each target is
  fuzzed for about 3 s in a subprocess (two at a time) and must end without a finding (the open
  findings' tags are set aside with FUZZ_IGNORE, so a known bug is not
  reported twice).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fuzz._harness import Finding
from fuzz.run import TARGETS, run_target

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
FINDINGS = sorted(p for p in (FUZZ / "findings").iterdir() if p.name.split("-", 1)[0] in TARGETS)
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


def _target(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"fuzz.fuzz_{name}")


@pytest.mark.parametrize("target", list(TARGETS))
def test_seed_corpus_replays_without_a_finding(target: str) -> None:
    seeds = sorted((FUZZ / "corpus" / target).iterdir())
    assert len(seeds) >= 10, f"fuzz/corpus/{target} has {len(seeds)} seeds; run python -m fuzz.make_seeds"
    test_one_input = _target(target).test_one_input
    for seed in seeds:
        test_one_input(seed.read_bytes())


def _tag_of(path: Path) -> str | None:
    try:
        _target(path.name.split("-", 1)[0]).test_one_input(path.read_bytes())
    except Finding as finding:
        return finding.tag
    return None


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_open_finding_still_reproduces(path: Path) -> None:
    target = path.name.split("-", 1)[0]
    assert _tag_of(path) is not None, (
        f"{path.name} no longer reproduces, so it was fixed: move it to fuzz/corpus/{target}/ "
        "and drop its row in fuzz/findings/README.md"
    )


def test_the_frame_harness_catches_a_missing_mask_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsproxy._mypyc import load_pure_copies

    # The pure copy of the scanner: a compiled class ignores a method patched at run time
    # (and the fuzzers themselves run the source, WSPROXY_PURE=1, so atheris can trace it).
    frames = load_pure_copies()["wsproxy.proto.frames"]
    frame_target = _target("frames")
    monkeypatch.setattr(frame_target, "FrameScanner", frames.FrameScanner)
    monkeypatch.setattr(frame_target, "Violation", frames.Violation)
    unmasked_from_client = b"\x01\x00" + b"\x81\x02hi"  # flags: from_client; no splits
    frame_target.test_one_input(unmasked_from_client)  # today's scanner refuses it: no finding
    monkeypatch.setattr(frames.FrameScanner, "_fail_mask", lambda self, pos, from_client: None)
    with pytest.raises(Finding) as info:
        frame_target.test_one_input(unmasked_from_client)
    assert info.value.tag.startswith("frames-")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Every target fuzzed for about 3 s, two at a time: each run spends most of its time
    instrumenting the modules at start, and the machine has two cores."""
    known = {tag for path in FINDINGS if (tag := _tag_of(path))}
    ignore = ",".join(sorted(known | set(filter(None, os.environ.get("FUZZ_IGNORE", "").split(",")))))
    base = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=2) as pool:
        patch.setenv("FUZZ_IGNORE", ignore)
        runs = {
            target: pool.submit(run_target, target, 3, seed=1, work=base / target / "work", crashes=base / target / "crashes")
            for target in TARGETS
        }
        return {target: run.result() for target, run in runs.items()}


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed (seed replay above still ran)")
@pytest.mark.timeout(240)  # the first one waits for every target's run (the fixture)
@pytest.mark.parametrize("target", list(TARGETS))
def test_a_few_seconds_of_fuzzing_find_nothing_new(target: str, fuzzed: dict[str, dict[str, object]]) -> None:
    result = fuzzed[target]
    log = Path(str(result["log"])).read_text(errors="replace")
    assert result["returncode"] == 0 and not result["artifacts"], log[-3000:]
    assert int(result["inputs"]) > 0, log[-3000:]  # type: ignore[call-overload]


def test_the_router_harness_catches_routing_on_the_raw_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 15 item 2 as the harness sees it: a "normaliser" that changes nothing lets
    # /%61dmin take the open route while a decoding backend serves /admin.
    router_target = _target("router")
    routes = bytes([1, 0, 1, 0, 0])  # two routes: * /admin, then * /
    data = routes + bytes([11]) + b"example.com" + b"/%61dmin"
    monkeypatch.setattr(router_target, "NORMALISE", lambda target: target)
    with pytest.raises(Finding) as info:
        router_target.test_one_input(data)
    assert info.value.tag == "target-route"
