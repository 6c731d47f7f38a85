#!/bin/sh
# Where the scheduler puts two workers: wsproxy `workers: 2` and HAProxy with two threads, both
# unpinned (`taskset -c 0,1`) like in bench/workers.sh, in alternating pp50 runs, with the rig's echo
# server and load generator pinned to CPU 1 as the rig pins them.
#
#   bench/placement.sh            # 4 pairs of 6 s runs, about 2 minutes
#   PAIRS=8 bench/placement.sh
#
# For each run, one line: msg/s, p50 and p99 round trip, then per worker process (wsproxy) or
# thread (HAProxy): the client sessions it holds (wsproxy; HAProxy's threads share one socket
# table), the share of a core it used, the CPU it last ran on, and its voluntary and involuntary
# context switches a second, sampled over 4 s in the middle of the run. Steal (ticks of
# /proc/stat, 200 a second over both CPUs) for the whole run is printed at the end. It measures;
# it changes nothing. See bench/README.md, "Eighth window".
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RIG=${RIG:-/work/benchrig/bench}
PY=${PY:-$ROOT/.venv/bin/python}
PAIRS=${PAIRS:-4}
ECHO_PORT=${ECHO_PORT:-29000}
HAPROXY_PORT=${PROXY_PORT:-29080}
PORT=${WSPROXY_PORT:-30080}
WL="pingpong -c 50 -s 1024"
scratch=$(mktemp -d)
cd "$RIG"
export ECHO_PORT RUNDIR="$scratch"
ulimit -n "$(ulimit -Hn)"

echo_pid=$(./targets.sh start-echo)
trap './targets.sh stop "$echo_pid" >/dev/null 2>&1 || true' EXIT

sample() {  # the tasks' stat lines: id, utime+stime, last CPU, voluntary, involuntary switches
    for t in "$@"; do
        printf '%s %s %s %s\n' "$(basename "$t")" "$(awk '{print $14 + $15, $39}' "$t/stat")" \
            "$(awk '/^voluntary_ctxt/{print $2}' "$t/status")" "$(awk '/^nonvoluntary_ctxt/{print $2}' "$t/status")"
    done
}

measure() {  # $1 = name, $2 = port, $3 = how to find the tasks (a shell snippet printing /proc paths)
    taskset -c 1 ./wsload $WL -u "ws://127.0.0.1:$2/" -d 2 -W 0.5 >/dev/null 2>&1
    taskset -c 1 ./wsload $WL -u "ws://127.0.0.1:$2/" -d 6 -W 0 >"$scratch/out" 2>&1 &
    load=$!
    sleep 1
    tasks=$(eval "$3")
    sample $tasks >"$scratch/s0"
    sleep 4
    sample $tasks >"$scratch/s1"
    ss -tnpH state established "( sport = :$2 )" >"$scratch/ss"
    wait "$load"
    "$PY" - "$1" "$scratch" <<'PY'
import json, re, sys
name, scratch = sys.argv[1], sys.argv[2]
s0 = {l.split()[0]: l.split()[1:] for l in open(f"{scratch}/s0")}
s1 = {l.split()[0]: l.split()[1:] for l in open(f"{scratch}/s1")}
sockets = open(f"{scratch}/ss").read()
parts = []
for task, now in s1.items():
    before = s0.get(task)
    if before is None or int(now[0]) == int(before[0]):
        continue  # a task that did no work (HAProxy's master side, idle helpers)
    held = len(re.findall(rf"pid={task},", sockets))
    parts.append(
        f"{task}: {'sessions=%d ' % held if name == 'wsproxy-w2' else ''}"
        f"cores={(int(now[0]) - int(before[0])) / 400:.2f} cpu={now[1]} "
        f"vcs/s={(int(now[2]) - int(before[2])) / 4:.0f} ivcs/s={(int(now[3]) - int(before[3])) / 4:.0f}"
    )
run = json.loads(open(f"{scratch}/out").read().strip().splitlines()[-1])
print(f"{name:10} {int(run['msgs_per_s']):>7,} msg/s  p50 {run['p50_us']:>7.1f}  p99 {run['p99_us']:>7.1f} µs  | " + " | ".join(parts))
PY
}

. "$ROOT/bench/wsproxy_process.sh"  # start_wsproxy, stop_wsproxy

steal() { awk '/^cpu /{print $9}' /proc/stat; }
steal0=$(steal)
pair=0
while [ $pair -lt "$PAIRS" ]; do
    pair=$((pair + 1))
    hp=$(PROXY_PORT=$HAPROXY_PORT ./targets.sh start haproxy2)  # the rig's own config, on CPUs 0,1
    measure haproxy2 "$HAPROXY_PORT" "ls -d /proc/$hp/task/*"
    ./targets.sh stop "$hp" >/dev/null 2>&1 || true

    sup=$(start_wsproxy 2 0,1)
    measure wsproxy-w2 "$PORT" "for w in \$(pgrep -P $sup -f 'wsproxy worker'); do echo /proc/\$w; done"
    stop_wsproxy "$sup"
done
echo "steal: $(( $(steal) - steal0 )) ticks over the $PAIRS pairs"
