#!/usr/bin/env bash
# CPU per TLS handshake, full vs resumed (TLS 1.3 tickets), wsproxy beside HAProxy, on the
# benchmark rig (a built copy of ../shared/bench: wsload, haproxy; see its README).
#
#   bench/tls_resume.sh                      # DURATION=3 REPS=3 (a quiet machine, about 2 minutes)
#   DURATION=2 REPS=1 bench/tls_resume.sh    # a 2-second smoke run: proves the plumbing, not a figure
#
# It starts `wsproxy run` (this checkout, $PY) with a plain listener on $CUSTOM_PORT and a TLS
# listener on $CUSTOM_TLS_PORT using the rig's ECDSA P-256 certificate, then runs the rig's
# run.sh twice with WORKLOADS=tls-conn against `haproxy1 custom`: once with every handshake a
# full one (TLS_CLIENT_ARGS=-k, the rig's default) and once with wsload's --tls-resume (each
# client thread resumes its last session). The figure is "proxy CPU µs per handshake" of the two
# tables; the rig's `direct` line (its own TLS echo server) is in both. Both proxies issue tickets
# by default (HAProxy 2.6: tickets and session cache on; wsproxy: session_ticket_lifetime 1h).
# Environment: RIG (default /work/benchrig/bench), PY (default .venv/bin/python), DURATION, REPS,
# CUSTOM_PORT (29180), CUSTOM_TLS_PORT (29543), OUT_DIR (default bench/results).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
RIG=${RIG:-/work/benchrig/bench}
PY=${PY:-$HERE/.venv/bin/python}
DURATION=${DURATION:-3}
REPS=${REPS:-3}
CUSTOM_PORT=${CUSTOM_PORT:-29180}
CUSTOM_TLS_PORT=${CUSTOM_TLS_PORT:-29543}
ECHO_PORT=${ECHO_PORT:-29000}
OUT_DIR=${OUT_DIR:-$HERE/bench/results}
STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT_DIR"
[ -s "$RIG/certs/ec.crt" ] || "$RIG/mkcert.sh" >&2

work=$(mktemp -d)
trap 'kill "$proxy_pid" 2>/dev/null; wait "$proxy_pid" 2>/dev/null; rm -rf "$work"' EXIT
cat >"$work/wsproxy.yaml" <<EOF
listeners:
  - name: bench
    bind: "127.0.0.1:$CUSTOM_PORT"
  - name: bench-tls
    bind: "127.0.0.1:$CUSTOM_TLS_PORT"
    tls: {cert: "$RIG/certs/ec.crt", key: "$RIG/certs/ec.key", session_ticket_lifetime: 1h}
routes:
  - pool: echo
pools:
  echo:
    backends:
      - address: "127.0.0.1:$ECHO_PORT"
timeouts:
  idle: 1h
limits:
  max_message_bytes: 0
log:
  level: warning
EOF
(cd "$HERE" && exec "$PY" -m wsproxy run -c "$work/wsproxy.yaml") >"$work/wsproxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$CUSTOM_TLS_PORT") 2>/dev/null && break
    sleep 0.1
done
kill -0 "$proxy_pid" || { cat "$work/wsproxy.log" >&2; exit 1; }

for mode in full resumed; do
    args=-k
    [ "$mode" = resumed ] && args="-k --tls-resume"
    echo "== $mode handshakes (TLS_CLIENT_ARGS=\"$args\") ==" >&2
    WORKLOADS=tls-conn DURATION=$DURATION REPS=$REPS TLS_CLIENT_ARGS="$args" \
        CUSTOM_PORT=$CUSTOM_PORT CUSTOM_TLS_PORT=$CUSTOM_TLS_PORT CUSTOM_PIDS=$proxy_pid CUSTOM_NAME=wsproxy \
        OUT="$OUT_DIR/tls-resume-$STAMP-$mode.md" "$RIG/run.sh" haproxy1 custom || true
    echo "-- $OUT_DIR/tls-resume-$STAMP-$mode.md" >&2
    cat "$OUT_DIR/tls-resume-$STAMP-$mode.md"
done
grep -q "tls_tickets_fallback" "$work/wsproxy.log" && { echo "wsproxy fell back to OpenSSL's ticket keys:" >&2; cat "$work/wsproxy.log" >&2; }
exit 0
