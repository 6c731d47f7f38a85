"""wsproxy benchmark runner: the same workloads direct and through the proxy, in one invocation.

    python bench/run.py                                   # the plain (ws://) workloads, ~1-2 min
    python bench/run.py --tls                             # the wss:// workloads (= --workloads tls)
    python bench/run.py --workloads pp50,st50 --reps 3 --json /tmp/bench.json
    python bench/run.py --proxy-cmd "CMD ... {config}"    # start another command as the proxy
    python bench/run.py --target 127.0.0.1:30080 --target-pid 4242 --echo-port 29000

For each workload and rep it measures DIRECT (load generator -> echo server) and PROXIED
(load generator -> proxy -> the same echo server), then prints one markdown table with the
medians, the ratio proxied / direct, and the proxy's CPU cost per relayed message (or per
handshake), followed by a rig table (CPU use of proxy, echo and load generator) that tells
which process was the bottleneck. TLS workloads (tls-*) get their own table: direct = load
generator -> a TLS echo server (echo.py --tls-cert), proxied = load generator -> the proxy's TLS
listener -> the plain echo server; certificates (ECDSA P-256, RSA 2048) are made at run time
in the temp dir. Exit status 1 if any payload error, failed handshake, resumed TLS session,
dropped or stalled connection was seen (the counts are printed), 2 on setup failures.

Stdlib only; Linux only (epoll, /proc, sched_setaffinity). See bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # the sibling modules, also for "python -m bench.run"

from loadgen import (  # noqa: E402
    PLAIN_WORKLOADS,
    TLS_WORKLOADS,
    WORKLOADS,
    Options,
    Workload,
    loopback_target,
    measure,
    pid_list,
)
from procstat import pin_all_threads, raise_nofile, with_descendants  # noqa: E402
from tlsutil import make_certs  # noqa: E402

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 20.0  # after a proxied run: how long the proxy may take to close its connections
SETTLE_SLACK_FDS = 8  # open fds above the count before the run that still count as settled

CONFIG_TEMPLATE = """\
listeners:
  - name: bench
    bind: "127.0.0.1:{proxy_port}"
routes:
  - host: "*"
    path: "/"
    pool: echo
pools:
  echo:
    balance: round_robin
    backends:
      - address: "127.0.0.1:{echo_port}"
timeouts:
  idle: 1h
limits:
  max_message_bytes: 0
"""

#: a TLS listener, inserted after the plain one when TLS workloads run
TLS_LISTENER_TEMPLATE = """\
  - name: {name}
    bind: "127.0.0.1:{port}"
    tls:
      cert: {cert}
      key: {key}
"""

#: the certificate kinds and what the report calls them
CERT_NAMES = {"ec": "ECDSA P-256", "rsa": "RSA 2048"}


def proxy_config(proxy_port: int, echo_port: int, tls: dict[str, tuple[int, Path, Path]]) -> str:
    """wsproxy's YAML: the plain listener, plus one TLS listener per certificate kind in ``tls``
    ({kind: (port, cert, key)}), all routed to the plain echo server."""
    text = CONFIG_TEMPLATE.format(proxy_port=proxy_port, echo_port=echo_port)
    extra = "".join(
        TLS_LISTENER_TEMPLATE.format(name=f"bench-tls-{kind}", port=port, cert=json.dumps(str(cert)),
                                     key=json.dumps(str(key)))
        for kind, (port, cert, key) in tls.items()
    )
    return text.replace("routes:\n", extra + "routes:\n", 1)


class SetupError(Exception):
    """The rig could not be set up (a process did not start or died)."""


# ---------------------------------------------------------------------------------------------
# processes the runner owns
# ---------------------------------------------------------------------------------------------


def child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """A preexec_fn: pin the child (all its future threads) and let it die with the runner."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:  # PR_SET_PDEATHSIG = 1: SIGTERM when the runner dies, even by SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    return setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


@dataclass
class Managed:
    """A child process started by the runner, with its stderr captured in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise SetupError(
                f"{self.name} exited with status {self.proc.returncode}; stderr tail:\n{tail(self.stderr_path)}"
            )

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after STOP_TIMEOUT_S."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; SIGKILL", file=sys.stderr)
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def _signal(self, sig: int) -> None:
        try:  # started with start_new_session, so its group id is its pid
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def spawn(name: str, argv: list[str], logdir: Path, cpus: set[int] | None, **kw: Any) -> Managed:
    stderr_path = logdir / f"{name}.stderr"
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stderr=err, start_new_session=True,
            preexec_fn=child_setup(cpus), **kw,
        )
    return Managed(name, proc, stderr_path)


class Echo:
    """An echo server (the plain backend, or a TLS one for direct wss:// runs); restartable on
    the same port. Accumulates its exit statistics."""

    def __init__(self, port: int, logdir: Path, cpus: set[int] | None, name: str = "echo",
                 extra_args: list[str] | None = None) -> None:
        self.port = port
        self.logdir = logdir
        self.cpus = cpus
        self.name = name
        self.extra_args = extra_args or []
        self.proc: Managed | None = None
        self.stats: dict[str, int] = {}

    def start(self) -> None:
        argv = [sys.executable, str(BENCH_DIR / "echo.py"), "--port", str(self.port), *self.extra_args]
        self.proc = spawn(self.name, argv, self.logdir, self.cpus, stdout=subprocess.PIPE)
        stdout = self.proc.proc.stdout
        assert stdout is not None
        if not select.select([stdout], [], [], READY_TIMEOUT_S)[0]:
            self.proc.stop()
            raise SetupError(f"{self.name} server did not print READY within {READY_TIMEOUT_S:.0f}s")
        line = stdout.readline().decode()  # "READY port=N"; EOF if it died
        if not line.startswith("READY port="):
            self.proc.check()
            raise SetupError(f"{self.name} server printed {line!r} instead of READY")
        self.port = int(line.split("=", 1)[1])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.stop()
        self._collect_stats()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _collect_stats(self) -> None:
        assert self.proc is not None
        lines = self.proc.stderr_path.read_text(errors="replace").splitlines()
        stats = [ln for ln in lines if ln.startswith("echo-stats ")]
        if stats:
            for item in stats[-1].split()[1:]:
                key, _, value = item.partition("=")
                self.stats[key] = self.stats.get(key, 0) + int(value)
        self.proc.stderr_path.write_text("")  # the next life starts a fresh log

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def wait_listening(port: int, proc: Managed, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise SetupError(f"{proc.name} did not accept on 127.0.0.1:{port} within {timeout:.0f}s; "
                     f"stderr tail:\n{tail(proc.stderr_path)}")


class Proxy:
    """The proxy under test: started by the runner (restartable) or an external process."""

    def __init__(self, args: argparse.Namespace, echo_port: int, logdir: Path, cpus: set[int] | None,
                 certs: dict[str, tuple[Path, Path]] | None = None) -> None:
        self.cpus = cpus
        self.logdir = logdir
        self.proc: Managed | None = None
        self.external = args.target is not None
        self.tls_ports: dict[str, int] = {}  # certificate kind -> TLS listener port
        self.idle_fds: int | None = None  # open fds before the first run of this proxy life
        if self.external:
            self.host, self.port = args.target
            if args.target_tls:
                self.tls_ports["ec"] = args.target_tls[1]
            if args.target_tls_rsa:
                self.tls_ports["rsa"] = args.target_tls_rsa[1]
            self.argv: list[str] = []
            self.roots: list[int] = args.target_pid
            return
        self.host, self.port = "127.0.0.1", free_port()
        certs = certs or {}
        tls = {kind: (free_port(), cert, key) for kind, (cert, key) in certs.items()}
        self.tls_ports = {kind: port for kind, (port, _, _) in tls.items()}
        config = logdir / "wsproxy.yaml"
        config.write_text(proxy_config(self.port, echo_port, tls))
        if args.proxy_cmd:
            subst = {"{config}": str(config), "{port}": str(self.port),
                     "{echo_port}": str(echo_port), "{echo}": str(echo_port),
                     "{tls_port}": str(self.tls_ports.get("ec", "")),
                     "{tls_rsa_port}": str(self.tls_ports.get("rsa", "")),
                     "{cert_dir}": str(logdir / "certs")}
            self.argv = [expand(word, subst) for word in shlex.split(args.proxy_cmd)]
        else:
            self.argv = [sys.executable, "-m", "wsproxy", "run", "-c", str(config)]
        self.roots = []

    def describe(self) -> str:
        if self.external:
            pids = ",".join(map(str, self.roots)) or "none given: CPU/RSS not measured"
            return f"already running (PIDs {pids})"
        return " ".join(shlex.quote(a) for a in self.argv)

    def ports(self) -> list[int]:
        return [self.port, *self.tls_ports.values()]

    def start(self) -> None:
        if self.external:
            for port in self.ports():
                try:
                    socket.create_connection((self.host, port), timeout=2).close()
                except OSError as exc:
                    raise SetupError(f"the target {self.host}:{port} does not accept connections: {exc}") from None
            if self.cpus:
                for pid in self.pids():
                    pin_all_threads(pid, self.cpus)
            return
        self.proc = spawn("proxy", self.argv, self.logdir, self.cpus, stdout=subprocess.DEVNULL, cwd=REPO_DIR)
        self.roots = [self.proc.pid]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for port in self.ports():
            wait_listening(port, self.proc, max(1.0, deadline - time.monotonic()))

    def pids(self) -> list[int]:
        """The processes whose CPU and RSS count as the proxy's (roots and descendants)."""
        return with_descendants(self.roots) if self.roots else []

    def open_fds(self) -> int | None:
        """Open file descriptors of the proxy's processes; None if unknown (no PIDs, no access)."""
        pids = self.pids()
        if not pids:
            return None
        total = 0
        for pid in pids:
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except FileNotFoundError:
                continue
            except OSError:
                return None
        return total

    def note_idle(self) -> None:
        """Before a run: remember the idle fd count (once per proxy life)."""
        if self.idle_fds is None:
            self.idle_fds = self.open_fds()

    def settle(self) -> float | None:
        """After a run: wait until the proxy has closed that run's connections.

        Otherwise the closing work of one run (thousands of sessions after hold) is charged to
        the next, and a SIGTERM that arrives meanwhile waits for wsproxy's shutdown drain.
        Returns the seconds it took, or None when the fd count is unknown or did not come down.
        """
        if self.idle_fds is None:
            return None
        t0 = time.monotonic()
        while True:
            n = self.open_fds()
            if n is None:
                return None
            if n <= self.idle_fds + SETTLE_SLACK_FDS:
                return round(time.monotonic() - t0, 2)
            if time.monotonic() - t0 > SETTLE_TIMEOUT_S:
                print(f"warning: the proxy still has {n} open fds (idle: {self.idle_fds}) "
                      f"{SETTLE_TIMEOUT_S:.0f} s after the run", file=sys.stderr, flush=True)
                return None
            time.sleep(0.05)

    def check(self) -> None:
        if self.proc:
            self.proc.check()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None
            self.idle_fds = None

    def restart(self) -> None:
        if not self.external:
            self.stop()
            self.start()


def expand(word: str, subst: dict[str, str]) -> str:
    for key, value in subst.items():
        word = word.replace(key, value)
    return word


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """Everything a measurement needs besides the workload."""

    args: argparse.Namespace
    echo: Echo
    proxy: Proxy
    load_cpus: tuple[int, ...] | None
    echo_tls: dict[str, Echo] = field(default_factory=dict)  # certificate kind -> TLS echo server
    runs: list[dict[str, Any]] = field(default_factory=list)
    fatal: str | None = None  # why the invocation stopped early (the proxy died, ...)

    def options(self, wl: Workload, host: str, port: int, cpu_pids: dict[str, list[int]],
                rss_pids: list[int]) -> Options:
        a = self.args
        return Options(host=host, port=port, workers=a.workers, duration=a.duration, warmup=a.warmup,
                       cpus=self.load_cpus, cpu_pids=cpu_pids, rss_pids=rss_pids,
                       hold_n=a.tls_hold_n if wl.tls else a.hold_n, hold_secs=a.hold_secs)

    def measure_direct(self, wl: Workload) -> dict[str, Any]:
        echo = self.echo_tls[wl.cert] if wl.tls else self.echo
        if wl.mode == "hold":
            echo.restart()  # RSS growth must not hide in memory kept from earlier runs
        pids = [echo.pid]
        return measure(wl, self.options(wl, "127.0.0.1", echo.port, {"target": pids, "echo": pids}, pids))

    def measure_proxied(self, wl: Workload) -> dict[str, Any]:
        if wl.mode == "hold":
            self.echo.restart()
            self.proxy.restart()
        self.proxy.check()
        pids = self.proxy.pids()
        cpu_pids = {"echo": [self.echo.pid]}
        if pids:
            cpu_pids["target"] = pids
        port = self.proxy.tls_ports[wl.cert] if wl.tls else self.proxy.port
        self.proxy.note_idle()
        try:
            result = measure(wl, self.options(wl, self.proxy.host, port, cpu_pids, pids))
        finally:
            settle_s = self.proxy.settle()
        self.proxy.check()
        result["proxy_settle_s"] = settle_s
        return result

    def run(self, wl: Workload, rep: int, side: str) -> None:
        how = self.measure_direct if side == "direct" else self.measure_proxied
        try:
            result = how(wl)
        except RuntimeError as exc:
            result = {"workload": wl.name, "errors": {"run_failed": 1}, "failure": str(exc)}
        result.update(side=side, rep=rep)
        self.runs.append(result)
        print(f"  {wl.name:12} rep {rep + 1} {side:8} {progress_line(result)}", file=sys.stderr, flush=True)

    def echo_stats(self) -> dict[str, int]:
        """Exit statistics of all echo servers, summed."""
        total: dict[str, int] = {}
        for echo in (self.echo, *self.echo_tls.values()):
            for key, value in echo.stats.items():
                total[key] = total.get(key, 0) + value
        return total


def progress_line(r: dict[str, Any]) -> str:
    parts = [f"{k}={r[k]}" for k in ("msgs_per_s", "mb_per_s", "p50_us", "hs_per_s", "kib_per_conn", "open_secs")
             if r.get(k)]
    if (r.get("proxy_settle_s") or 0) >= 0.5:
        parts.append(f"(proxy closed the run's connections in {r['proxy_settle_s']} s)")
    if r.get("errors"):
        parts.append(f"errors={r['errors']}")
    if r.get("failure"):
        parts.append(f"failure={r['failure']}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

#: (label, key) of the figures shown per workload; the first row also gets the CPU columns.
METRICS: dict[str, list[tuple[str, str]]] = {
    "pp1": [("p50 RTT µs", "p50_us"), ("p99 RTT µs", "p99_us"), ("msg/s", "msgs_per_s")],
    "pp50": [("msg/s", "msgs_per_s"), ("p50 RTT µs", "p50_us"), ("p99 RTT µs", "p99_us")],
    "st50": [("msg/s", "msgs_per_s")],
    "st64k": [("MB/s", "mb_per_s"), ("msg/s", "msgs_per_s")],
    "conn": [("handshakes/s", "hs_per_s")],
    "hold": [("RSS KiB/conn", "kib_per_conn"), ("open all, s", "open_secs")],
}


Figure = Callable[[dict[str, Any]], "float | None"]


def metrics_of(name: str) -> list[tuple[str, str]]:
    """The figures of a workload; a TLS one has those of its plain twin (tls-conn-rsa: conn)."""
    return METRICS[name.removeprefix("tls-").removesuffix("-rsa")]


def field_of(key: str) -> Figure:
    return lambda r: r.get(key)


def values_of(runs: list[dict[str, Any]], key: Figure) -> list[float]:
    return [v for v in (key(r) for r in runs) if v is not None]


def median_of(runs: list[dict[str, Any]], key: Figure) -> float | None:
    values = values_of(runs, key)
    return statistics.median(values) if values else None


def cell(runs: list[dict[str, Any]], key: Figure) -> str:
    """The median; with several reps also the spread: ``median (min–max)``."""
    values = values_of(runs, key)
    if len(values) < 2:
        return fmt(values[0] if values else None)
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def cpu_per_msg(r: dict[str, Any], who: str, hops: int = 2) -> float | None:
    """CPU µs of ``who`` per message hop (see ``cpu_cost_us``); None for handshake runs."""
    cpu = r.get("cpu_s", {}).get(who)
    if cpu is None or r.get("handshakes") or not r.get("msgs"):
        return None
    return float(cpu * 1e6 / (hops * r["msgs"]))


def cpu_per_handshake(r: dict[str, Any], who: str) -> float | None:
    cpu = r.get("cpu_s", {}).get(who)
    if cpu is None or not r.get("handshakes"):
        return None
    return float(cpu * 1e6 / r["handshakes"])


def cpu_cost_us(r: dict[str, Any], who: str, hops: int = 2) -> float | None:
    """CPU µs of ``who`` per handshake, or per message hop: a proxy relays each echoed
    message twice (``hops=2``: up and down), the echo server handles it once (``hops=1``)."""
    cpu = r.get("cpu_s", {}).get(who)
    if cpu is None:
        return None
    if r.get("handshakes"):
        return float(cpu * 1e6 / r["handshakes"])
    if r.get("msgs"):
        return float(cpu * 1e6 / (hops * r["msgs"]))
    return None


def busy(r: dict[str, Any], who: str) -> float | None:
    """Share of one core used by ``who`` in the window, in %.

    ``who="other"``: the whole machine's busy time minus the measured processes (proxy, echo,
    load generator), i.e. other tenants of the machine plus unattributed kernel work.
    """
    cpu_s = r.get("cpu_s", {})
    if who == "loadgen":
        cpu = r.get("loadgen_cpu_s")
    elif who == "other" and "machine" in cpu_s:
        ours = set(k for k in cpu_s if k != "machine")
        if r.get("side") == "direct":
            ours.discard("target")  # the echo server is the target
        cpu = max(0.0, cpu_s["machine"] - sum(cpu_s[k] for k in ours) - r.get("loadgen_cpu_s", 0.0))
    else:
        cpu = cpu_s.get(who)
    return None if cpu is None or not r.get("duration_s") else 100 * cpu / r["duration_s"]


def main_table(runs: list[dict[str, Any]], workloads: list[str]) -> list[str]:
    lines = [
        "| workload | figure | direct | proxied | ratio (proxied ÷ direct) | proxy CPU µs per relayed msg (conn: per handshake) |",
        "|---|---|---|---|---|---|",
    ]
    for name in workloads:
        direct = [r for r in runs if r["workload"] == name and r["side"] == "direct"]
        proxied = [r for r in runs if r["workload"] == name and r["side"] == "proxied"]
        for i, (label, key) in enumerate(metrics_of(name)):
            figure = field_of(key)
            d = median_of(direct, figure)
            p = median_of(proxied, figure)
            ratio = fmt(p / d if d and p is not None else None)
            cost = cell(proxied, lambda r: cpu_cost_us(r, "target")) if i == 0 and name != "hold" else "–"
            lines.append(f"| {name} | {label} | {cell(direct, figure)} | {cell(proxied, figure)} | {ratio} | {cost} |")
    return lines


def tls_table(runs: list[dict[str, Any]], workloads: list[str]) -> list[str]:
    """The TLS workloads: the plain table's columns, CPU per message and per handshake apart."""
    lines = [
        "| workload | figure | direct (TLS echo) | proxied (TLS → ws://) | ratio (proxied ÷ direct) "
        "| proxy CPU µs per relayed msg | proxy CPU µs per handshake (TLS + upgrade + close) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in workloads:
        mode = WORKLOADS[name].mode
        direct = [r for r in runs if r["workload"] == name and r["side"] == "direct"]
        proxied = [r for r in runs if r["workload"] == name and r["side"] == "proxied"]
        for i, (label, key) in enumerate(metrics_of(name)):
            figure = field_of(key)
            d = median_of(direct, figure)
            p = median_of(proxied, figure)
            ratio = fmt(p / d if d and p is not None else None)
            per_msg = cell(proxied, lambda r: cpu_per_msg(r, "target")) if i == 0 and mode in ("pingpong", "stream") else "–"
            per_hs = cell(proxied, lambda r: cpu_per_handshake(r, "target")) if i == 0 and mode == "connrate" else "–"
            lines.append(f"| {name} | {label} | {cell(direct, figure)} | {cell(proxied, figure)} | {ratio} "
                         f"| {per_msg} | {per_hs} |")
    return lines


def tls_summary(runs: list[dict[str, Any]]) -> str:
    """What was negotiated, per side, and how many sessions were resumed (must be 0)."""
    parts = []
    for side in ("direct", "proxied"):
        seen = sorted({r["tls"] for r in runs if r.get("tls") and r["side"] == side})
        if seen:
            parts.append(f"{side}: {', '.join(seen)}")
    resumed = sum(r.get("tls_resumed", 0) for r in runs)
    return f"negotiated {'; '.join(parts) or '–'}; resumed sessions: {resumed} (full handshakes only)"

def rig_table(runs: list[dict[str, Any]], workloads: list[str]) -> list[str]:
    lines = [
        "| workload | proxy CPU % | echo CPU % direct / proxied | load generator CPU % direct / proxied "
        "| other CPU % direct / proxied | echo CPU µs per echoed msg (conn: per handshake), direct "
        "| load generator CPU µs per echoed msg (conn: per handshake), direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in workloads:
        if WORKLOADS[name].mode == "hold":
            continue
        d = [r for r in runs if r["workload"] == name and r["side"] == "direct"]
        p = [r for r in runs if r["workload"] == name and r["side"] == "proxied"]
        echo_cost = median_of(d, lambda r: cpu_cost_us(r, "echo", hops=1))
        load_cost = median_of(d, loadgen_cost_us)
        lines.append(
            f"| {name} | {fmt(median_of(p, lambda r: busy(r, 'target')))} "
            f"| {fmt(median_of(d, lambda r: busy(r, 'echo')))} / {fmt(median_of(p, lambda r: busy(r, 'echo')))} "
            f"| {fmt(median_of(d, lambda r: busy(r, 'loadgen')))} / {fmt(median_of(p, lambda r: busy(r, 'loadgen')))} "
            f"| {fmt(median_of(d, lambda r: busy(r, 'other')))} / {fmt(median_of(p, lambda r: busy(r, 'other')))} "
            f"| {fmt(echo_cost)} | {fmt(load_cost)} |"
        )
    return lines


def loadgen_cost_us(r: dict[str, Any]) -> float | None:
    """The load generator's own CPU µs (all workers) per echoed message or per handshake."""
    cpu = r.get("loadgen_cpu_s")
    n = r.get("handshakes") or r.get("msgs")
    return float(cpu * 1e6 / n) if cpu is not None and n else None


def error_lines(runs: list[dict[str, Any]], echo_stats: dict[str, int]) -> list[str]:
    lines = []
    for r in runs:
        if r.get("errors"):
            detail = ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items()))
            extra = f" ({r['failure']})" if r.get("failure") else ""
            lines.append(f"- {r['workload']} rep {r['rep'] + 1} {r['side']}: {detail}{extra}")
    for key in ("protocol_errors", "bad_handshakes", "accept_errors", "tls_errors"):
        if echo_stats.get(key):
            lines.append(f"- echo server: {key}={echo_stats[key]}")
    return lines


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark wsproxy against a direct baseline (see bench/README.md)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated list of {','.join(WORKLOADS)}; also 'plain' (default: "
                   f"{','.join(PLAIN_WORKLOADS)}), 'tls' (all tls-*), 'all'")
    p.add_argument("--tls", action="store_true", help="run the TLS (wss://) workloads: same as --workloads tls")
    p.add_argument("--duration", type=float, default=3.0, help="measurement window per run, s (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="load before the window, s (default 0.5)")
    p.add_argument("--reps", type=int, default=1, help="repetitions; the table shows medians (default 1)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--hold-n", type=int, default=5000, help="connections held by 'hold' (default 5000)")
    p.add_argument("--tls-hold-n", type=int, default=3000, help="connections held by 'tls-hold' (default 3000)")
    p.add_argument("--hold-secs", type=float, default=3.0, help="how long 'hold' holds them, s (default 3)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="proxy on CPU 0, echo + load generator on CPU 1 (default: on with >= 2 CPUs)")
    p.add_argument("--proxy-cmd", help="start this instead of 'python -m wsproxy run -c {config}'; "
                   "placeholders {config} {port} {echo_port}")
    p.add_argument("--target", type=loopback_target, help="benchmark an already running proxy at 127.0.0.1:PORT")
    p.add_argument("--target-pid", type=pid_list, default=[], help="PID[,PID..] of that proxy (CPU/RSS)")
    p.add_argument("--target-tls", type=loopback_target,
                   help="with --target: its TLS listener (ECDSA certificate) for the tls-* workloads")
    p.add_argument("--target-tls-rsa", type=loopback_target,
                   help="with --target: its TLS listener with an RSA certificate, for tls-conn-rsa")
    p.add_argument("--echo-port", type=int, default=0,
                   help="port of the echo server (default: a free one; required with --target)")
    p.add_argument("--direct-only", action="store_true",
                   help="measure only the rig itself (load generator -> echo), no proxy")
    p.add_argument("--json", type=Path, help="also write the raw results to this file")
    args = p.parse_args(argv)
    if args.tls and args.workloads is not None:
        p.error("--tls is short for --workloads tls; give one of them")
    groups = {"plain": PLAIN_WORKLOADS, "tls": TLS_WORKLOADS, "all": list(WORKLOADS)}
    names: list[str] = []
    for w in ("tls" if args.tls else args.workloads or "plain").split(","):
        for name in groups.get(w.strip(), [w.strip()] if w.strip() else []):
            if name not in names:
                names.append(name)
    args.workloads = names
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}, plain, tls, all")
    if not args.workloads:
        p.error("no workloads given")
    tls_kinds = {WORKLOADS[w].cert for w in args.workloads if WORKLOADS[w].tls}
    if args.target and "ec" in tls_kinds and not args.target_tls:
        p.error("the tls-* workloads against --target need --target-tls 127.0.0.1:PORT (its TLS listener)")
    if args.target and "rsa" in tls_kinds and not args.target_tls_rsa:
        p.error("tls-conn-rsa against --target needs --target-tls-rsa 127.0.0.1:PORT (a TLS listener with an "
                "RSA certificate); leave it out with --workloads tls-conn,tls-pp50,...")
    if (args.target_tls or args.target_tls_rsa) and not args.target:
        p.error("--target-tls and --target-tls-rsa go with --target")
    if args.direct_only and (args.target or args.proxy_cmd):
        p.error("--direct-only excludes --target and --proxy-cmd")
    if args.target and args.proxy_cmd:
        p.error("--target and --proxy-cmd exclude each other")
    if args.target and not args.echo_port:
        p.error("--target needs --echo-port: the port your proxy forwards to, where the echo server will listen")
    if args.workers < 1 or args.reps < 1:
        p.error("--workers and --reps must be >= 1")
    if args.hold_n < 1 or args.tls_hold_n < 1:
        p.error("--hold-n and --tls-hold-n must be >= 1")
    return args


def choose_cpus(pin: bool | None) -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, echo + load generator CPUs), or (None, None) when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin is None:
        pin = len(cpus) >= 2
    if not pin:
        return None, None
    if len(cpus) < 2:
        print("warning: --pin needs 2 CPUs, running unpinned", file=sys.stderr)
        return None, None
    return {cpus[0]}, {cpus[1]}


def check_nofile(args: argparse.Namespace) -> tuple[int, str | None]:
    limit = raise_nofile()  # inherited by every process the runner starts; they raise it again
    for name, n, option in (("hold", args.hold_n, "--hold-n"), ("tls-hold", args.tls_hold_n, "--tls-hold-n")):
        need = 2 * n + 200
        if name in args.workloads and limit < need:
            return limit, (f"RLIMIT_NOFILE hard limit is {limit}, '{name}' with {n} connections needs about "
                           f"{need} (proxy: 2 sockets per connection); raise it (ulimit -Hn) or lower {option}")
    return limit, None


def header(args: argparse.Namespace, proxy: Proxy | None, echo: Echo, proxy_cpus: set[int] | None,
           load_cpus: set[int] | None, nofile: int, echo_tls: dict[str, Echo], certs_how: str) -> list[str]:
    pin = (f"proxy on CPU {fmt_cpus(proxy_cpus)}, echo + load generator on CPU {fmt_cpus(load_cpus)}"
           if proxy_cpus else "not pinned")
    what = ("none (--direct-only)" if args.direct_only or proxy is None
            else f"`{proxy.describe()}` on 127.0.0.1:{proxy.port}")
    holds = []
    if "hold" in args.workloads:
        holds.append(f"hold: {args.hold_n} connections")
    if "tls-hold" in args.workloads:
        holds.append(f"tls-hold: {args.tls_hold_n} connections")
    lines = [
        f"## wsproxy benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"- proxy: {what}",
        f"- echo server: bench/echo.py on 127.0.0.1:{echo.port}; load generator: bench/loadgen.py, "
        f"{args.workers} worker process(es)",
        f"- {os.cpu_count()} CPUs, {pin}; RLIMIT_NOFILE {nofile}; Python {sys.version.split()[0]}",
        f"- each run: {args.warmup:g} s warmup + {args.duration:g} s window; {args.reps} rep(s), medians"
        + (f"; {', '.join(holds)} for {args.hold_secs:g} s (fresh echo/proxy per hold run)" if holds else ""),
    ]
    if echo_tls:
        kinds = sorted(echo_tls)
        listeners = ("" if proxy is None or args.direct_only else
                     "; proxy TLS listeners " + ", ".join(f"{CERT_NAMES[k]} 127.0.0.1:{proxy.tls_ports[k]}"
                                                          for k in kinds) + " → plain ws:// to the echo server")
        lines.append(
            f"- TLS: self-signed {' and '.join(CERT_NAMES[k] for k in kinds)} certificates made with the {certs_how} "
            "in the temp dir; client: no verification (CERT_NONE), SNI localhost, a new session per connection "
            "(OP_NO_TICKET); direct = bench/echo.py --tls-cert on "
            + ", ".join(f"127.0.0.1:{echo_tls[k].port} ({CERT_NAMES[k]})" for k in kinds) + listeners)
    return lines


def fmt_cpus(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def measure_all(args: argparse.Namespace, logdir: Path) -> tuple[list[str], list[str], Rig]:
    """Start echo (and proxy), run every workload/rep/side; return (header, warnings, rig)."""
    nofile, nofile_warning = check_nofile(args)
    warnings = [nofile_warning] if nofile_warning else []
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    proxy_cpus, load_cpus = choose_cpus(args.pin)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the runner mostly sleeps; keep it off the proxy's core
    kinds = sorted({WORKLOADS[w].cert for w in args.workloads if WORKLOADS[w].tls})
    certs: dict[str, tuple[Path, Path]] = {}
    certs_how = ""
    if kinds:
        try:
            all_certs, certs_how = make_certs(logdir / "certs")
        except RuntimeError as exc:
            raise SetupError(str(exc)) from None
        certs = {k: all_certs[k] for k in kinds}
    echo = Echo(args.echo_port, logdir, load_cpus)
    echo_tls = {k: Echo(0, logdir, load_cpus, name=f"echo-tls-{k}",
                        extra_args=["--tls-cert", str(crt), "--tls-key", str(key)])
                for k, (crt, key) in certs.items()}
    proxy: Proxy | None = None
    try:
        echo.start()
        for e in echo_tls.values():
            e.start()
        proxy = Proxy(args, echo.port, logdir, proxy_cpus, certs)
        if not args.direct_only:
            print(f"proxy: {proxy.describe()}", file=sys.stderr, flush=True)
            proxy.start()
        rig = Rig(args, echo, proxy, tuple(load_cpus) if load_cpus else None, echo_tls)
        sides = ("direct",) if args.direct_only else ("direct", "proxied")
        try:
            for name in args.workloads:
                for rep in range(args.reps):
                    for side in sides:
                        rig.run(WORKLOADS[name], rep, side)
        except SetupError as exc:  # keep what was measured so far
            rig.fatal = str(exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
    finally:
        if proxy:
            proxy.stop()
        echo.stop()
        for e in echo_tls.values():
            e.stop()
    return header(args, proxy, echo, proxy_cpus, load_cpus, nofile, echo_tls, certs_how), warnings, rig


def report(args: argparse.Namespace, head: list[str], warnings: list[str], rig: Rig) -> tuple[list[str], bool]:
    """The markdown report, and whether any error was seen."""
    plain = [w for w in args.workloads if not WORKLOADS[w].tls]
    tls = [w for w in args.workloads if WORKLOADS[w].tls]
    lines = head
    if plain:  # (the heading only when a TLS table follows: plain-only output stays as it was)
        lines += ["", "### Plain (ws://)", ""] if tls else [""]
        lines += main_table(rig.runs, plain)
    if tls:
        lines += ["", "### TLS (wss://)", "", tls_summary(rig.runs) + ".", ""] + tls_table(rig.runs, tls)
    if any(WORKLOADS[w].mode != "hold" for w in args.workloads):
        lines += ["", "Rig check (100 % = one core busy; the busiest process is the bottleneck; "
                  "'other' = the rest of the machine: neighbours' load makes figures noisy"
                  + ("; tls-* direct: 'echo' is the TLS echo server" if tls else "") + "):", ""]
        lines += rig_table(rig.runs, args.workloads)
    other = max((busy(r, "other") or 0.0 for r in rig.runs), default=0.0)
    if other > 25:
        warnings.append(f"other processes kept up to {other:.0f} % of a core busy during a measurement; "
                        "absolute figures are unreliable. Compare ratios and CPU µs per message, use --reps 3, "
                        "or rerun on a quieter machine.")
    lines += [""] + [f"warning: {w}" for w in warnings] if warnings else []
    errors = error_lines(rig.runs, rig.echo_stats())
    if rig.fatal:
        first = rig.fatal.splitlines()[0].split("; stderr tail")[0]
        errors.append(f"- stopped early, the remaining runs are missing: {first} (its stderr tail is above)")
    status = 2 if rig.fatal else 1
    lines += ["", "Errors: none" if not errors else f"Errors (exit status {status}):"] + errors
    return lines, bool(errors)


def write_json(path: Path, args: argparse.Namespace, rig: Rig) -> None:
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"meta": meta, "proxy": rig.proxy.describe(), "echo_stats": rig.echo_stats(),
                                "runs": rig.runs}, indent=1))


def run_all(args: argparse.Namespace, logdir: Path) -> int:
    head, warnings, rig = measure_all(args, logdir)
    lines, failed = report(args, head, warnings, rig)
    print("\n".join(lines), flush=True)
    if args.json:
        write_json(args.json, args, rig)
    return 2 if rig.fatal else 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))  # run the finally blocks
    with tempfile.TemporaryDirectory(prefix="wsproxy-bench-") as tmp:
        try:
            return run_all(args, Path(tmp))
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; everything started was stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
