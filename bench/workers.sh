#!/bin/sh
# wsproxy with `workers: 2` (unpinned, like haproxy2 and nginxauto) and with `workers: 1`
# (pinned to CPU 0, like haproxy1), through the reference rig's `custom` target.
#
#   bench/workers.sh                              # the lead's run, in a quiet window (≈ 25 min)
#   DURATION=2 WARMUP=1 REPS=1 WORKLOADS="pp50" bench/workers.sh   # a smoke run (≈ 1 min)
#
# RIG is a built copy of ../shared/bench (default /work/benchrig/bench); it is copied to a
# scratch folder first (the rig writes results/ beside itself). The rig benchmarks one
# `custom` proxy per invocation, so there are invocations back to back, each with its own
# `direct` baseline: compare ratios to direct, across the files. The first also runs haproxy2
# and nginxauto (both use the two cores), so wsproxy-w2 and they share a baseline; the second
# runs haproxy1 beside wsproxy-w1. `hold` runs last, in freshly started processes.
# Knobs of run.sh (DURATION WARMUP REPS HOLD_N HOLD_SECS WORKLOADS) pass through.
# Tables: $OUT_DIR/workers2.md, workers1.md, workers2-hold.md, workers1-hold.md (printed at the end).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RIG=${RIG:-/work/benchrig/bench}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
ECHO_PORT=${ECHO_PORT:-29000}
PORT=${WSPROXY_PORT:-30080}
scratch=$(mktemp -d)
cp -r "$RIG" "$scratch"/
OUT_DIR=${OUT_DIR:-$scratch}
cd "$scratch"/bench
ulimit -n "$(ulimit -Hn)"

. "$ROOT/bench/wsproxy_process.sh"  # start_wsproxy, stop_wsproxy

# `hold` measures RSS growth, so it gets a freshly started process of its own, and one rep: after
# the message workloads, or after a first hold, the heap has room already, and holding 5,000
# sessions hardly grows it (HAProxy returns its pools' memory between reps; wsproxy's RSS stays).
WORKLOADS=${WORKLOADS:-pp1 pp50 st50 st64k conn hold}
MESSAGES=$(echo " $WORKLOADS " | sed 's/ hold / /g' | xargs)
HOLD=$(case " $WORKLOADS " in *" hold "*) echo hold ;; esac)

invocation() {  # $1 = workers, $2 = CPUs, $3 = table, $4 = workloads, $5 = reps; then the rig's targets
    n=$1 cpus=$2 out=$3 workloads=$4 reps=$5
    shift 5
    [ -n "$workloads" ] || return 0
    pid=$(start_wsproxy "$n" "$cpus")
    REPS=$reps WORKLOADS="$workloads" CUSTOM_PORT=$PORT CUSTOM_NAME=wsproxy-w$n OUT="$out" ECHO_PORT=$ECHO_PORT \
        ./run.sh custom "$@" || true
    stop_wsproxy "$pid"
}

# w2 beside the two-core targets; then w1 pinned to CPU 0 beside haproxy1, pinned like it, so the
# two files also give HAProxy's own two-thread/one-thread ratio on this machine (what the
# machine allows a two-core proxy, whatever its code: see bench/README.md)
REPS=${REPS:-3}
invocation 2 0,1 "$OUT_DIR/workers2.md" "$MESSAGES" "$REPS" haproxy2 nginxauto
invocation 1 0 "$OUT_DIR/workers1.md" "$MESSAGES" "$REPS" haproxy1
invocation 2 0,1 "$OUT_DIR/workers2-hold.md" "$HOLD" 1 haproxy2
invocation 1 0 "$OUT_DIR/workers1-hold.md" "$HOLD" 1

for table in workers2 workers1 workers2-hold workers1-hold; do
    [ -f "$OUT_DIR/$table.md" ] && cat "$OUT_DIR/$table.md"
done
echo "tables: $OUT_DIR/workers*.md; wsproxy logs: $scratch/wsproxy-*.log"
