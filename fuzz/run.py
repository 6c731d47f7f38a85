"""Run every fuzz target for a bounded time and print what each did (``make fuzz``).

    .venv/bin/python -m fuzz.run [--seconds 60] [TARGET ...]

Each target runs in its own subprocess under libFuzzer (atheris), one after
the other, starting from its committed seeds (fuzz/corpus/TARGET/, never
written to) and the corpus it grew in earlier runs (fuzz/work/TARGET/,
gitignored). A target stops at its first finding, which libFuzzer writes to
fuzz/crashes/TARGET/ (crash-*, timeout-* or oom-*); replay one with

    .venv/bin/python -m fuzz.fuzz_TARGET fuzz/crashes/TARGET/crash-...

``FUZZ_IGNORE=tag,...`` sets known findings aside (see fuzz/findings/README.md).
The table at the end counts the inputs each target ran (libFuzzer's
``stat::number_of_executed_units``) and its findings; the exit status is 1
when there was any finding. This is a tool, not part of wsproxy.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: target → libFuzzer's -max_len (bytes): room for the structure each input needs, no more.
TARGETS = {
    "frames": 4096,
    "handshake": 2048,
    "proxy_protocol": 1600,
    "router": 512,
    "config": 8192,
}

_EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(rb"^Done (\d+) runs", re.M)
_PROGRESS = re.compile(rb"^#(\d+)\s", re.M)
_ARTIFACT = re.compile(rb"Test unit written to (\S+)")
_FINDING = re.compile(rb"^(?:fuzz\._harness\.)?Finding: (.*)$|^(\w+(?:Error|Exception)): (.*)$", re.M)


def run_target(target: str, seconds: int, *, seed: int | None = None, work: Path | None = None,
               crashes: Path | None = None) -> dict[str, object]:
    """Fuzz one target for ``seconds``; return inputs run, findings and the log's path."""
    work = work or HERE / "work" / target
    crashes = crashes or HERE / "crashes" / target
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    log = work.parent / f"{work.name}.log"
    command = [
        sys.executable, "-m", f"fuzz.fuzz_{target}",
        f"-max_total_time={seconds}",
        "-timeout=10",  # one input taking longer is a finding (a hang)
        "-rss_limit_mb=2048",
        f"-max_len={TARGETS[target]}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
        *([f"-seed={seed}"] if seed is not None else []),
        str(work),
        str(HERE / "corpus" / target),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["WSPROXY_PURE"] = "1"  # the modules' source: atheris traces Python, not their mypyc build
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, timeout=seconds + 120)
    elapsed = time.monotonic() - started
    text = log.read_bytes()
    counts = _EXECUTED.findall(text) or _DONE.findall(text) or _PROGRESS.findall(text)
    artifacts = [a.decode() for a in _ARTIFACT.findall(text)]
    reasons = []
    for match in _FINDING.finditer(text):
        reasons.append((match[1] or (match[2] + b": " + match[3])).decode("utf-8", "replace")[:160])
    return {
        "target": target,
        "inputs": int(counts[-1]) if counts else 0,
        "seconds": elapsed,
        "returncode": process.returncode,
        "artifacts": artifacts,
        "reasons": reasons[-1:],
        "log": str(log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")),
                        help="per target (default: $FUZZ_SECONDS or 60)")
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: `make fuzz` installs it (pip install -e '.[fuzz]')", file=sys.stderr)
        return 2
    results = []
    for target in args.targets or list(TARGETS):
        print(f"fuzzing {target} for {args.seconds}s ...", flush=True)
        results.append(run_target(target, args.seconds))
    print()
    print(f"{'target':<16}{'inputs':>12}{'seconds':>9}{'inputs/s':>10}  findings")
    total = 0
    found = 0
    for r in results:
        inputs, seconds = int(r["inputs"]), float(r["seconds"])  # type: ignore[arg-type]
        total += inputs
        artifacts = r["artifacts"]
        failed = bool(artifacts) or r["returncode"] != 0
        found += failed
        note = "0" if not failed else f"1: {', '.join(artifacts) or 'exit ' + str(r['returncode'])} (log {r['log']})"  # type: ignore[arg-type]
        print(f"{r['target']:<16}{inputs:>12,}{seconds:>9.0f}{inputs / max(seconds, 1e-9):>10,.0f}  {note}")
        for reason in r["reasons"]:  # type: ignore[attr-defined]
            print(f"{'':<16}  {reason}")
    print(f"{'total':<16}{total:>12,}{'':>19}  {found}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
