#!/usr/bin/env bash
# Proof, by hand, that `workers: 2` and the upgrade work under a real systemd 252 as PID 1
# (../shared/systemd-lab) with systemd/wsproxy.service unchanged plus systemd/workers.conf.
# Not run by pytest: needs root and systemd-nspawn (apt-get install -y systemd-container).
#
#   tests/systemd_lab_workers.sh         # exit 0 = every check passed
#   SITE=/path/to/venv/site-packages tests/systemd_lab_workers.sh   # deps (default: .venv of the checkout)
#
# Steps: start (READY=1 once both workers serve; the workers are the supervisor's children in
# the unit's cgroup), reload (both workers on generation 2), `wsproxy upgrade` under load
# (no connection refused, a session opened before it still echoes, MainPID moves to the new
# supervisor, the old one exits once its session ended), reload and stop reach the new main pid.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
L="${SYSTEMD_LAB:-$REPO/../shared/systemd-lab/run-unit.sh}"
NAME="${SYSTEMD_LAB_NAME:-wsproxy-workers-lab}"
SITE="${SITE:-$REPO/.venv/lib/python3.11/site-packages}"
TMP="$(mktemp -d)"
FAILED=0

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
command -v systemd-nspawn >/dev/null || { echo "apt-get install -y systemd-container" >&2; exit 2; }
[ -x "$L" ] || { echo "no lab script at $L" >&2; exit 2; }
[ -d "$SITE" ] || { echo "no site-packages at $SITE (set SITE)" >&2; exit 2; }

cleanup() { "$L" down -n "$NAME" >/dev/null 2>&1 || true; rm -rf "$TMP"; }
trap cleanup EXIT
step() { echo; echo "=== $*"; }
ok() { echo "PASS: $*"; }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
ctl() { "$L" ctl -n "$NAME" "$@"; }
lab() { "$L" exec -n "$NAME" -- "$@"; }
prop() { ctl show -p "$1" --value "$2"; }
tool() { lab /usr/bin/python3 -I /opt/lab/tool.py "$@"; }
URL="ws://127.0.0.1:443/"
wait_for() {  # wait_for TRIES CMD...: CMD succeeds within TRIES × 0.1 s
  local tries="$1" i; shift
  for ((i = 0; i < tries; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

mkdir -p "$TMP/lab"
cat >"$TMP/wsproxy" <<'EOF'
#!/usr/bin/python3 -I
import sys
sys.path[:0] = ["/opt/wsproxy/src", "/opt/wsproxy/site-packages"]
from wsproxy.__main__ import main
sys.exit(main())
EOF
chmod 0755 "$TMP/wsproxy"

cat >"$TMP/lab/tool.py" <<'EOF'
"""echo PORT | probe URL | hammer URL SECONDS | status | hold URL SECONDS (websockets, stdlib)."""
import http.client, json, socket, sys, threading, time
sys.path.insert(0, "/opt/wsproxy/site-packages")
from websockets.sync.client import connect
from websockets.sync.server import serve

def echo(port):
    def handler(ws):
        for message in ws:
            ws.send(message)
    with serve(handler, "127.0.0.1", int(port)) as server:
        server.serve_forever()

def once(url):
    with connect(url, open_timeout=10, close_timeout=2) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"

def probe(url):
    once(url)
    print("probe ok")

def hammer(url, seconds):
    counts = {"ok": 0, "refused": 0, "other": 0}
    errors, lock = set(), threading.Lock()
    deadline = time.monotonic() + float(seconds)
    def loop():
        while time.monotonic() < deadline:
            try:
                once(url); key = "ok"
            except ConnectionRefusedError:
                key = "refused"
            except Exception as exc:
                key = "other"; errors.add(repr(exc))
            with lock:
                counts[key] += 1
    threads = [threading.Thread(target=loop) for _ in range(4)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(json.dumps({**counts, "errors": sorted(errors)[:4]}))

def hold(url, seconds):
    """One session, a numbered message every 0.2 s for SECONDS; prints sent/echoed."""
    with connect(url, open_timeout=10) as ws:
        sent = echoed = 0
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            ws.send(str(sent)); sent += 1
            if ws.recv(timeout=10) == str(sent - 1):
                echoed += 1
            time.sleep(0.2)
    print(json.dumps({"sent": sent, "echoed": echoed}))

def status():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("/run/wsproxy/admin.sock")
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    conn.request("GET", "/status")
    body = json.loads(conn.getresponse().read())
    print(json.dumps({"pid": body["pid"], "generation": body["generation"],
                      "workers": [[w["pid"], w["state"], w["generation"]] for w in body["workers"]]}))

command, *args = sys.argv[1:]
{"echo": echo, "probe": probe, "hammer": hammer, "hold": hold, "status": status}[command](*args)
EOF

config() {
  cat <<EOF
listeners: [{name: public, bind: "127.0.0.1:443"}]
routes: [{pool: echo}]
pools: {echo: {backends: [{address: "127.0.0.1:9001"}]}}
timeouts: {idle: $1}
shutdown: {timeout: 5s, spread: 1s}
upgrade: {timeout: 30s}
admin: {bind: "unix:/run/wsproxy/admin.sock"}
workers: 2
EOF
}
config 10m >"$TMP/lab/good1.yaml"
config 20m >"$TMP/lab/good2.yaml"

step "up: systemd 252, wsproxy.service unchanged + workers.conf"
"$L" up -n "$NAME" --private-network \
  --unit systemd/wsproxy.service \
  --file systemd/workers.conf:/etc/systemd/system/wsproxy.service.d/workers.conf \
  --file "$TMP/wsproxy:/usr/bin/wsproxy" \
  --file "$TMP/lab:/opt/lab" \
  --bind-ro "$REPO:/opt/wsproxy/src" \
  --bind-ro "$SITE:/opt/wsproxy/site-packages" || exit 1
lab systemd-sysusers --inline 'u wsproxy - "wsproxy" / /usr/sbin/nologin'
lab install -d -o root -g wsproxy -m 0750 /etc/wsproxy
lab install -o root -g wsproxy -m 0640 /opt/lab/good1.yaml /etc/wsproxy/wsproxy.yaml
ctl daemon-reload
lab systemd-run --quiet --unit=lab-echo /usr/bin/python3 -I /opt/lab/tool.py echo 9001
check "echo backend running" wait_for 100 test "$(prop ActiveState lab-echo.service)" = active

step "start: READY=1 once both workers serve"
check "systemctl start" ctl start wsproxy.service
check "NotifyAccess=all (drop-in)" test "$(prop NotifyAccess wsproxy.service)" = all
PID="$(prop MainPID wsproxy.service)"
S="$(tool status)"; echo "$S"
check "two workers, ready" grep -Eq '"workers": \[\[[0-9]+, "ready", 1\], \[[0-9]+, "ready", 1\]\]' <<<"$S"
lab systemd-cgls --no-pager -u wsproxy.service | head -n 8
check "echo through the workers" tool probe "$URL"
ctl show -p StatusText wsproxy.service

step "reload: both workers apply generation 2"
lab install -o root -g wsproxy -m 0640 /opt/lab/good2.yaml /etc/wsproxy/wsproxy.yaml
check "systemctl reload" ctl reload wsproxy.service
sleep 1.5
S="$(tool status)"; echo "$S"
check "workers on generation 2" grep -Eq '"generation": 2, "workers": \[\[[0-9]+, "ready", 2\], \[[0-9]+, "ready", 2\]\]' <<<"$S"

step "upgrade under load: wsproxy upgrade"
tool hold "$URL" 6 >"$TMP/hold" &
HOLD=$!
tool hammer "$URL" 4 >"$TMP/hammer" &
HAMMER=$!
sleep 1
lab /usr/bin/wsproxy upgrade -c /etc/wsproxy/wsproxy.yaml
check "wsproxy upgrade exit 0" test $? = 0
wait "$HAMMER"; wait "$HOLD"
cat "$TMP/hammer" "$TMP/hold"
check "no connection refused or failed during the upgrade" grep -q '"refused": 0, "other": 0' "$TMP/hammer"
check "the session opened before the upgrade echoed every message" python3 -c "import json,sys; d=json.load(open('$TMP/hold')); sys.exit(d['sent'] != d['echoed'] or d['sent'] < 20)"
NEW="$(prop MainPID wsproxy.service)"
echo "MainPID $PID -> $NEW"
check "MainPID moved to the new supervisor" bash -c "[ '$NEW' != '$PID' ] && [ '$NEW' != 0 ]"
check "service still active" test "$(prop ActiveState wsproxy.service)" = active
gone() { ! lab kill -0 "$1" 2>/dev/null; }
check "the old supervisor exited after its session" wait_for 100 gone "$PID"
tool status
check "reload reaches the new main pid" ctl reload wsproxy.service
check "echo after the upgrade" tool probe "$URL"

step "stop"
check "systemctl stop" ctl stop wsproxy.service
ctl show -p Result -p ExecMainStatus -p ExecMainCode -p MainPID wsproxy.service
check "Result=success" test "$(prop Result wsproxy.service)" = success
"$L" journal -n "$NAME" -u wsproxy.service -o cat | grep -vE 'event=(open|close)' | tail -n 25

echo
[ "$FAILED" = 0 ] && echo "ALL PASSED" || echo "$FAILED FAILED"
exit "$FAILED"
