"""`make conformance`: the Autobahn|Testsuite fuzzing client, direct and through wsproxy.

What it does, all on 127.0.0.1 with ports the kernel picks:

1. starts Autobahn's own echo servers (conformance/backend.py in the
   Autobahn virtualenv): ``echo`` (wstest's echoserver, no extensions) for
   groups 1-10 and ``deflate`` (wstest's testeeserver, which accepts
   permessage-deflate) for groups 12 and 13;
2. runs ``wstest -m fuzzingclient`` against them directly;
3. starts ``wsproxy run`` (this tree's wsproxy, with sys.executable) on a
   generated config: ``/deflate`` → the deflate backend, ``/`` → the echo
   backend, no message size limit, generous timeouts;
4. runs the same cases through the proxy;
5. prints one table per group (conformance/summary.py), the cases that FAILED
   through the proxy with the close codes expected and received, and exits 1
   if any case FAILED through the proxy or if OK + NON-STRICT through the
   proxy is lower than direct in any group.

Reports (Autobahn's HTML and JSON, the logs, summary.txt) go to
conformance/reports/{direct,proxied}/{echo,deflate}/ (gitignored).

What it is not: a unit test (it needs Python 2.7 and Autobahn, which
`make conformance` installs; tests/test_conformance_report.py covers the
summariser), and not a benchmark (group 9 times are printed for orientation).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from conformance import summary  # noqa: E402

ALL_GROUPS = (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)
DEFLATE_GROUPS = (12, 13)
START_TIMEOUT_S = 30.0
WSTEST_TIMEOUT_S = 3600.0  # one fuzzingclient run; all of 9.x takes minutes, not an hour


def select_cases(spec: str) -> dict[str, list[str]]:
    """CASES → wstest case patterns per backend kind.

    Tokens are separated by commas or spaces. A bare group number N means
    "N.*"; anything else (``6.3.*``, ``7.9.1``) is passed to wstest as it is.
    Empty or ``all`` means every group.
    """
    tokens = [t for t in re.split(r"[,\s]+", spec.strip()) if t]
    if not tokens or tokens == ["all"]:
        tokens = [str(g) for g in ALL_GROUPS]
    kinds: dict[str, list[str]] = {"echo": [], "deflate": []}
    for token in tokens:
        if not re.fullmatch(r"[0-9]+(\.([0-9]+|\*))*", token):
            raise SystemExit(f"conformance: bad CASES entry {token!r} (examples: 9, 6.3.*, 7.9.1)")
        pattern = f"{token}.*" if token.isdigit() else token
        group = int(token.split(".", 1)[0])
        kinds["deflate" if group in DEFLATE_GROUPS else "echo"].append(pattern)
    return {kind: patterns for kind, patterns in kinds.items() if patterns}


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float) -> re.Match[str]:
    """Poll a log file until a line matches (the process must stay alive)."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if match := regex.search(line):
                return match
        if proc.poll() is not None:
            raise SystemExit(f"conformance: {proc.args!r} exited with {proc.returncode}; see {path}")
        time.sleep(0.1)
    raise SystemExit(f"conformance: no line matching {pattern!r} in {path} within {timeout_s:.0f} s")


@contextmanager
def process(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with stdout and stderr in log_path, stopped on exit."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start_backend(stack: ExitStack, python2: Path, kind: str, log_dir: Path) -> int:
    log_path = log_dir / f"backend-{kind}.log"
    proc = stack.enter_context(process([str(python2), str(HERE / "backend.py"), kind], log_path))
    return int(wait_for_line(log_path, r"^listening (\d+)$", proc, START_TIMEOUT_S).group(1))


def wsproxy_config(echo_port: int | None, deflate_port: int | None) -> str:
    """The config of the proxied run: nothing in the way of the cases."""
    routes, pools = [], []
    for path, pool, port in (("/deflate", "deflate", deflate_port), ("/", "echo", echo_port)):
        if port is None:
            continue
        routes.append(f"  - path: {path}\n    pool: {pool}\n")
        pools.append(f"  {pool}:\n    retries: 0\n    backends:\n      - address: \"127.0.0.1:{port}\"\n")
    return (
        "# generated by conformance/run.py\n"
        "listeners:\n  - name: conformance\n    bind: \"127.0.0.1:0\"\n"
        "routes:\n" + "".join(routes) +
        "pools:\n" + "".join(pools) +
        "timeouts: {handshake: 60s, connect: 10s, upstream_handshake: 60s, idle: 30m}\n"
        "limits: {max_message_bytes: 0, max_header_bytes: 64KiB}\n"
        "shutdown: {timeout: 5s, spread: 1s}\n"
        "log: {format: text, level: info}\n"
    )


def start_wsproxy(stack: ExitStack, config_text: str, log_dir: Path) -> int:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsproxy-conformance-")))
    config = tmp / "wsproxy.yaml"
    config.write_text(config_text, encoding="utf-8")
    (log_dir / "wsproxy.yaml").write_text(config_text, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this tree's wsproxy, not an installed one
    log_path = log_dir / "wsproxy.log"
    proc = stack.enter_context(process([sys.executable, "-m", "wsproxy", "run", "-c", str(config)], log_path, env))
    match = wait_for_line(log_path, r"event=listening listener=conformance address=\S+:(\d+)", proc, START_TIMEOUT_S)
    return int(match.group(1))


def run_wstest(wstest: Path, agent: str, url: str, patterns: list[str], out_dir: Path) -> float:
    """One fuzzingclient run; returns the seconds it took."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "outdir": str(out_dir),
        "servers": [{"agent": agent, "url": url}],
        "cases": patterns,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    started = time.monotonic()
    with open(out_dir / "wstest.log", "wb") as log_file:
        try:
            subprocess.run(
                [str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=out_dir,
                timeout=WSTEST_TIMEOUT_S, check=True,
            )
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"conformance: wstest exited with {exc.returncode}; see {out_dir / 'wstest.log'}")
    took_s = time.monotonic() - started
    shown = " ".join(patterns)
    if len(shown) > 40:
        shown = f"{shown[:30]}... ({len(patterns)} patterns)"
    print(f"  {agent:<8} {shown:<40} {took_s:7.1f} s", flush=True)
    return took_s


def merged(reports: Path, run: str, kinds: list[str]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The case → entry mapping of one run over its backends, and each case's report dir."""
    index: dict[str, Any] = {}
    dirs: dict[str, Path] = {}
    for kind in kinds:
        out_dir = reports / run / kind
        for case_id, entry in summary.load_index(out_dir / "index.json").items():
            index[case_id] = entry
            dirs[case_id] = out_dir
    return index, dirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wstest", type=Path, required=True, help="wstest in the Autobahn virtualenv")
    parser.add_argument("--python2", type=Path, required=True, help="python of the Autobahn virtualenv")
    parser.add_argument("--cases", default="", help="groups or case patterns, e.g. '1 2 6.3.* 7.9.1' (default: all)")
    parser.add_argument("--reports", type=Path, default=HERE / "reports")
    parser.add_argument("--reuse-direct", action="store_true",
                        help="skip the direct run and read its reports from the last run (same CASES)")
    args = parser.parse_args(argv)
    # SIGTERM (make being stopped) unwinds like Ctrl-C: every child is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # absolute, not resolved: a virtualenv's python is a symlink out of it
    args.wstest, args.python2 = args.wstest.absolute(), args.python2.absolute()

    selection = select_cases(args.cases)
    kinds = list(selection)
    reports: Path = args.reports.absolute()  # wstest runs in the report directory
    reports.mkdir(parents=True, exist_ok=True)
    if not args.reuse_direct:
        for run in ("direct", "proxied"):
            for kind in ("echo", "deflate"):
                for stale in (reports / run / kind).glob("*"):
                    stale.unlink()
    else:
        for kind in ("echo", "deflate"):
            for stale in (reports / "proxied" / kind).glob("*"):
                stale.unlink()

    started = time.monotonic()
    with ExitStack() as stack:
        ports = {kind: start_backend(stack, args.python2, kind, reports) for kind in kinds}
        paths = {"echo": "/", "deflate": "/deflate"}
        if not args.reuse_direct:
            print("direct (Autobahn's echo servers):", flush=True)
            for kind in kinds:
                run_wstest(args.wstest, "direct", f"ws://127.0.0.1:{ports[kind]}{paths[kind]}",
                           selection[kind], reports / "direct" / kind)
        proxy_port = start_wsproxy(stack, wsproxy_config(ports.get("echo"), ports.get("deflate")), reports)
        print("through wsproxy:", flush=True)
        for kind in kinds:
            run_wstest(args.wstest, "wsproxy", f"ws://127.0.0.1:{proxy_port}{paths[kind]}",
                       selection[kind], reports / "proxied" / kind)
    took_s = time.monotonic() - started

    direct, _ = merged(reports, "direct", kinds)
    proxied, proxied_dirs = merged(reports, "proxied", kinds)
    groups = summary.count_groups(direct, proxied)
    out = ["", *summary.format_table(groups), ""]
    failed = summary.failed_cases(proxied)
    out.append(f"FAILED through wsproxy: {len(failed)}")
    for case_id in failed:
        report = summary.load_case(proxied_dirs[case_id], proxied[case_id])
        out.extend(summary.failure_of(case_id, proxied[case_id], report, direct.get(case_id)).lines())
    differences = summary.close_differences(direct, proxied)
    if differences:
        out.append("")
        out.append(f"closing behaviour differs from direct ({len(differences)}; informative):")
        out.extend(f"  {c}: direct {d}, through wsproxy {p}" for c, d, p in differences)
    problems = summary.verdict(groups)
    out.append("")
    out.extend(f"conformance: {p}" for p in problems)
    out.append(f"conformance: {'FAIL' if problems else 'PASS'} ({len(proxied)} cases through wsproxy,"
               f" {took_s:.0f} s in all; reports in {reports})")
    text = "\n".join(out)
    print(text)
    (reports / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
