#!/usr/bin/env bash
# Proof, by hand, that systemd/wsproxy.service and systemd/wsproxy.socket work
# under a real systemd 252 as PID 1 (../shared/systemd-lab). Not run by pytest:
# it needs root and systemd-nspawn (apt-get install -y systemd-container).
#
#   tests/systemd_lab.sh            # from the checkout; exit 0 = every check passed
#
# The lab gets the two unit files unchanged, the project tree and this venv's
# site-packages read-only under /opt/wsproxy, Debian's /usr/bin/python3, a
# /opt/wsproxy/bin/wsproxy launcher (where the unit expects the venv's script), a `wsproxy` system user (the sysusers line of
# systemd/README.md), an admin socket in /run/wsproxy and an echo backend on
# 127.0.0.1:9001 (websockets, a transient unit). Listener "public"
# (ws://127.0.0.1:443) is the one wsproxy.socket passes; "secure"
# (wss://127.0.0.1:8443, key root:wsproxy 0640) always binds its own. The lab
# has its own network namespace (--private-network), so port 443 cannot clash
# with anything on the host; the clients run inside.
#
# Steps: verify + security in the lab, start (READY=1, uid, CapEff, limits),
# reload good (generation 2, same pid), reload bad (systemctl reload fails,
# still active, generation unchanged), watchdog (a frozen process is killed and
# restarted), restart without the socket (attempts refused), stop (exit 0),
# socket activation (first connection starts the service, the socket is
# passed by name, a restart under load refuses nothing), down (always, trap).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
L="${SYSTEMD_LAB:-$REPO/../shared/systemd-lab/run-unit.sh}"
NAME="${SYSTEMD_LAB_NAME:-wsproxy-lab}"
SITE="$REPO/.venv/lib/python3.11/site-packages"
TMP="$(mktemp -d)"
FAILED=0

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
command -v systemd-nspawn >/dev/null || { echo "apt-get install -y systemd-container" >&2; exit 2; }
[ -x "$L" ] || { echo "no lab script at $L" >&2; exit 2; }
[ -d "$SITE" ] || { echo "no venv at $REPO/.venv (make test creates it)" >&2; exit 2; }

cleanup() { "$L" down -n "$NAME" >/dev/null 2>&1 || true; rm -rf "$TMP"; }
trap cleanup EXIT

step() { echo; echo "=== $*"; }
ok() { echo "PASS: $*"; }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
ctl() { "$L" ctl -n "$NAME" "$@"; }
lab() { "$L" exec -n "$NAME" -- "$@"; }
prop() { ctl show -p "$1" --value "$2"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
tool() { lab /usr/bin/python3 -I /opt/lab/tool.py "$@"; }
URL="ws://127.0.0.1:443/"
TLS_URL="wss://127.0.0.1:8443/"
wait_status() {  # wait_status REGEX: StatusText of wsproxy.service matches within 10 s
  local i
  for ((i = 0; i < 100; i++)); do
    prop StatusText wsproxy.service | grep -Eq "$1" && return 0
    sleep 0.1
  done
  return 1
}
wait_state() {  # wait_state UNIT STATE [TRIES of 0.1 s]
  local i
  for ((i = 0; i < ${3:-100}; i++)); do
    [ "$(prop ActiveState "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# ------------------------------------------------------------------ files for the lab
mkdir -p "$TMP/lab" "$TMP/tls"
cat >"$TMP/wsproxy" <<'EOF'
#!/usr/bin/python3 -I
# the lab's /opt/wsproxy/bin/wsproxy: the checkout on Debian's python3, deps from the venv
import sys
sys.path[:0] = ["/opt/wsproxy/src", "/opt/wsproxy/site-packages"]
from wsproxy.__main__ import main
sys.exit(main())
EOF
chmod 0755 "$TMP/wsproxy"

cat >"$TMP/lab/tool.py" <<'EOF'
"""Lab helpers: echo PORT | probe URL | hammer URL SECONDS | admin PATH (websockets, stdlib)."""
import http.client, json, socket, ssl, sys, threading, time
sys.path.insert(0, "/opt/wsproxy/site-packages")
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

CA = "/opt/lab/ca.pem"

def once(url, timeout_s=10.0):
    tls = {"ssl": ssl.create_default_context(cafile=CA)} if url.startswith("wss:") else {}
    with connect(url, open_timeout=timeout_s, close_timeout=2, **tls) as ws:
        ws.send("hello")
        reply = ws.recv(timeout=timeout_s)
        if reply != "hello":
            raise AssertionError(f"echo sent back {reply!r}")

def echo(port):
    def handler(ws):
        for message in ws:
            ws.send(message)
    with serve(handler, "127.0.0.1", int(port)) as server:
        server.serve_forever()

def probe(url):
    t0 = time.monotonic()
    try:
        once(url)
    except Exception as exc:
        print(f"probe {url}: {exc!r}")
        return 1
    print(f"probe {url}: echo ok in {time.monotonic() - t0:.2f}s")
    return 0

def hammer(url, seconds, threads=4):
    """Sessions back to back from a few threads: connect, TLS, upgrade, echo, close."""
    counts = {"ok": 0, "refused": 0, "closed": 0, "other": 0}
    errors, lock = set(), threading.Lock()
    deadline = time.monotonic() + float(seconds)
    def worker():
        while time.monotonic() < deadline:
            try:
                once(url)
                key = "ok"
            except ConnectionRefusedError:
                key = "refused"
            except ConnectionClosed as exc:
                key = "closed"
                errors.add(repr(exc))
            except Exception as exc:
                key = "other"
                errors.add(repr(exc))
            with lock:
                counts[key] += 1
            if key != "ok":
                time.sleep(0.01)
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({**counts, "errors": sorted(errors)[:4]}))
    return 0

def admin(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    conn.request("GET", "/status")
    status = json.loads(conn.getresponse().read())
    print(json.dumps({k: status.get(k) for k in ("generation", "sessions", "reloads", "reload_failures", "last_reload_error")}))
    return 0

command, *args = sys.argv[1:]
sys.exit({"echo": echo, "probe": probe, "hammer": hammer, "admin": admin}[command](*args) or 0)
EOF

# a CA and a certificate for 127.0.0.1/localhost (trustme, from the venv)
"$REPO/.venv/bin/python" - "$TMP" <<'EOF'
import sys, trustme
tmp = sys.argv[1]
ca = trustme.CA()
cert = ca.issue_cert("127.0.0.1", "localhost")
ca.cert_pem.write_to_path(f"{tmp}/lab/ca.pem")
cert.cert_chain_pems[0].write_to_path(f"{tmp}/tls/cert.pem")
for pem in cert.cert_chain_pems[1:]:
    pem.write_to_path(f"{tmp}/tls/cert.pem", append=True)
cert.private_key_pem.write_to_path(f"{tmp}/tls/key.pem")
EOF

config() {  # config IDLE: a valid config; the idle timeout tells the generations apart
  cat <<EOF
# systemd lab: "public" is wsproxy.socket's FileDescriptorName; "secure" is never passed
listeners:
  - name: public
    bind: 127.0.0.1:443
  - name: secure
    bind: 127.0.0.1:8443
    tls:
      cert: /etc/wsproxy/tls/cert.pem
      key: /etc/wsproxy/tls/key.pem
routes:
  - pool: echo
pools:
  echo:
    backends:
      - address: 127.0.0.1:9001
timeouts:
  idle: $1
shutdown:
  timeout: 5s
  spread: 1s
admin:
  bind: unix:/run/wsproxy/admin.sock
EOF
}
config 10m >"$TMP/lab/good1.yaml"
config 20m >"$TMP/lab/good2.yaml"
config 20m | sed 's/pool: echo/pool: ehco/; s/idle: 20m/idle: 20/' >"$TMP/lab/bad.yaml"
cp -r "$TMP/tls" "$TMP/lab/tls"

SYSUSERS='u wsproxy - "wsproxy WebSocket reverse proxy" / /usr/sbin/nologin'
install_config() {  # install_config FILE: as packaging would, root:wsproxy 0640
  lab install -o root -g wsproxy -m 0640 "/opt/lab/$1" /etc/wsproxy/wsproxy.yaml
}

# ------------------------------------------------------------------ up
step "up: systemd 252 in a private network namespace"
"$L" up -n "$NAME" --private-network \
  --unit systemd/wsproxy.service --unit systemd/wsproxy.socket \
  --file "$TMP/wsproxy:/opt/wsproxy/bin/wsproxy" \
  --file "$TMP/lab:/opt/lab" \
  --bind-ro "$REPO:/opt/wsproxy/src" \
  --bind-ro "$SITE:/opt/wsproxy/site-packages" || exit 1
lab systemd-sysusers --inline "$SYSUSERS"
lab install -d -o root -g wsproxy -m 0750 /etc/wsproxy /etc/wsproxy/tls
lab install -o root -g wsproxy -m 0640 /opt/lab/tls/cert.pem /opt/lab/tls/key.pem /etc/wsproxy/tls/
install_config good1.yaml
lab ls -l /etc/wsproxy /etc/wsproxy/tls
lab systemd-run --quiet --unit=lab-echo /usr/bin/python3 -I /opt/lab/tool.py echo 9001
check "echo backend running" wait_state lab-echo.service active

step "systemd-analyze verify (unchanged units, real /opt/wsproxy/bin/wsproxy) and security, inside the lab"
VERIFY="$(lab systemd-analyze verify --man=no /etc/systemd/system/wsproxy.service /etc/systemd/system/wsproxy.socket 2>&1)"
VERIFY_RC=$?
echo "$VERIFY"
check "verify: exit 0, no warnings" test "$VERIFY_RC:$VERIFY" = "0:"
lab systemd-analyze security --no-pager wsproxy.service | tail -n 1

# ------------------------------------------------------------------ start
step "start wsproxy.service (Type=notify: returns once READY=1 arrived)"
t0="$(now)"
check "systemctl start" ctl start wsproxy.service
echo "start took $(since "$t0")s"
check "is-active" ctl is-active --quiet wsproxy.service
ctl show -p ActiveState -p SubState -p MainPID -p StatusText -p WatchdogUSec -p NRestarts wsproxy.service
PID="$(prop MainPID wsproxy.service)"
lab ps -o user=,uid=,comm= -p "$PID"
check "runs as user wsproxy" test "$(lab ps -o user= -p "$PID" | tr -d ' ')" = wsproxy
CAPS="$(lab grep -E '^Cap(Eff|Bnd|Amb):' "/proc/$PID/status" | tr -s '\t ' ' ' | tr '\n' ' ')"
echo "$CAPS"
check "capabilities: CAP_NET_BIND_SERVICE only (0x400)" bash -c "[ \"\$(echo '$CAPS' | grep -o 'CapEff: [0-9a-f]*')\" = 'CapEff: 0000000000000400' ]"
lab grep 'Max open files' "/proc/$PID/limits"
lab ls -ld /run/wsproxy /run/wsproxy/admin.sock
check "ws:// echo through port 443" tool probe "$URL"
check "wss:// echo through port 8443 (key file root:wsproxy 0640)" tool probe "$TLS_URL"
tool admin /run/wsproxy/admin.sock
check "STATUS= says generation 1" wait_status 'config generation 1$'

# ------------------------------------------------------------------ reload good
step "reload with a good config (check, then SIGHUP: RELOADING=1 ... READY=1)"
install_config good2.yaml
t0="$(now)"
check "systemctl reload exits 0" ctl reload wsproxy.service
echo "reload took $(since "$t0")s"
check "STATUS= says generation 2" wait_status 'config generation 2$'
check "still active" ctl is-active --quiet wsproxy.service
check "same MainPID" test "$(prop MainPID wsproxy.service)" = "$PID"
ctl show -p ActiveState -p SubState -p MainPID -p StatusText wsproxy.service
tool admin /run/wsproxy/admin.sock
check "echo after reload" tool probe "$URL"

# ------------------------------------------------------------------ reload bad
step "reload with a bad config: systemctl reload fails, the old config keeps serving"
install_config bad.yaml
t0="$(now)"
if ctl reload wsproxy.service; then bad "systemctl reload should have failed"; else ok "systemctl reload failed (exit $?)"; fi
echo "failed reload took $(since "$t0")s"
check "still active" ctl is-active --quiet wsproxy.service
check "same MainPID" test "$(prop MainPID wsproxy.service)" = "$PID"
check "STATUS= still generation 2" wait_status 'config generation 2$'
ctl show -p ActiveState -p SubState -p StatusText wsproxy.service
check "echo with the old config" tool probe "$URL"
"$L" journal -n "$NAME" -u wsproxy.service -o cat | grep -E 'ehco|timeouts.idle|Control process|reload' | tail -n 6
install_config good2.yaml

# ------------------------------------------------------------------ watchdog
step "watchdog: WatchdogSec=2s; pings keep it up, a frozen process is killed and restarted"
lab mkdir -p /etc/systemd/system/wsproxy.service.d
lab sh -c 'printf "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n" >/etc/systemd/system/wsproxy.service.d/lab-watchdog.conf'
ctl daemon-reload
ctl restart wsproxy.service
sleep 4
check "alive after 2 watchdog periods, no restart" test "$(prop NRestarts wsproxy.service)/$(prop ActiveState wsproxy.service)" = 0/active
PID="$(prop MainPID wsproxy.service)"
lab kill -STOP "$PID"
echo "SIGSTOP sent to $PID"
for _ in $(seq 100); do [ "$(prop NRestarts wsproxy.service)" = 1 ] && break; sleep 0.1; done
check "killed by the watchdog and restarted" test "$(prop NRestarts wsproxy.service)" = 1
check "active again" wait_state wsproxy.service active
echo "MainPID $PID -> $(prop MainPID wsproxy.service)"
"$L" journal -n "$NAME" -u wsproxy.service -o cat | grep -iE 'watchdog' | tail -n 3
lab rm /etc/systemd/system/wsproxy.service.d/lab-watchdog.conf
ctl daemon-reload
ctl reset-failed wsproxy.service >/dev/null 2>&1 || true

# ------------------------------------------------------------------ restart without the socket
step "restart WITHOUT wsproxy.socket under load (wsproxy binds itself): attempts are refused"
ctl restart wsproxy.service
tool hammer "$URL" 3 >"$TMP/hammer-plain" &
HAMMER=$!
sleep 1
ctl restart wsproxy.service
wait "$HAMMER"
cat "$TMP/hammer-plain"
check "refusals seen (so the hammer can see them)" bash -c "! grep -q '\"refused\": 0,' '$TMP/hammer-plain'"

# ------------------------------------------------------------------ stop
step "stop (SIGTERM: STOPPING=1, exit 0)"
t0="$(now)"
check "systemctl stop" ctl stop wsproxy.service
echo "stop took $(since "$t0")s"
ctl show -p ActiveState -p Result -p ExecMainStatus -p ExecMainCode wsproxy.service
check "exit status 0" test "$(prop ExecMainStatus wsproxy.service)" = 0
check "Result=success" test "$(prop Result wsproxy.service)" = success
if tool probe "$URL" >/dev/null 2>&1; then bad "port 443 still answers"; else ok "port 443 closed"; fi

# ------------------------------------------------------------------ socket activation
step "socket activation: wsproxy.socket holds 0.0.0.0:443 as \"public\""
check "systemctl start wsproxy.socket" ctl start wsproxy.socket
check "wsproxy.service not running yet" test "$(prop ActiveState wsproxy.service)" = inactive
t0="$(now)"
check "first connection starts the service and is answered" tool probe "$URL"
check "the listener without a passed socket opened its own (wss:// 8443)" tool probe "$TLS_URL"
echo "first session (activation included) took $(since "$t0")s"
check "service active" ctl is-active --quiet wsproxy.service
ctl show -p TriggeredBy -p MainPID -p StatusText wsproxy.service
"$L" journal -n "$NAME" -u wsproxy.service -o cat | grep -E 'listener_inherited|listen_fd|event=listening' | tail -n 3
check "the listener took the passed socket" \
  bash -c "'$L' journal -n '$NAME' -u wsproxy.service -o cat | grep -q 'event=listener_inherited listener=public'"
check "reload under socket activation" ctl reload wsproxy.service

step "restart WITH wsproxy.socket under load: no attempt refused"
tool hammer "$URL" 4 >"$TMP/hammer-socket" &
HAMMER=$!
sleep 1
t0="$(now)"
ctl restart wsproxy.service
echo "restart took $(since "$t0")s"
wait "$HAMMER"
cat "$TMP/hammer-socket"
check "no refused connection" grep -q '"refused": 0,' "$TMP/hammer-socket"
check "no failed session (1001 closes by the stopping process aside)" grep -q '"other": 0,' "$TMP/hammer-socket"
check "service active after restart" ctl is-active --quiet wsproxy.service
check "stop service and socket" ctl stop wsproxy.service wsproxy.socket

step "journal: systemd and wsproxy's control lines (sessions left out)"
"$L" journal -n "$NAME" -u wsproxy.service -u wsproxy.socket -o short-monotonic |
  grep -vE 'wsproxy\.edge\.session|wsproxy\.control\.health' | tail -n 60

step "summary"
if [ "$FAILED" = 0 ]; then echo "SYSTEMD LAB OK"; else echo "SYSTEMD LAB: $FAILED check(s) FAILED"; fi
[ "$FAILED" = 0 ]
