# Sourced by bench/workers.sh and bench/placement.sh: wsproxy in front of the rig's echo server.
# The caller sets ROOT (the checkout), PY (its python), PORT (wsproxy's), ECHO_PORT and scratch (a folder).

start_wsproxy() {  # $1 = workers, $2 = CPUs (taskset); prints the supervisor's pid once every worker listens
    cat > "$scratch/wsproxy-$1.yaml" <<YAML
listeners: [{name: bench, bind: "127.0.0.1:$PORT"}]
routes: [{host: "*", path: "/", pool: echo}]
pools: {echo: {balance: round_robin, backends: [{address: "127.0.0.1:$ECHO_PORT"}]}}
timeouts: {idle: 1h}
limits: {max_message_bytes: 0, max_connections: 40000}
workers: $1
YAML
    PYTHONPATH=$ROOT taskset -c "$2" "$PY" -m wsproxy run -c "$scratch/wsproxy-$1.yaml" \
        >"$scratch/wsproxy-$1.log" 2>&1 &
    pid=$!
    i=0
    until [ "$(grep -c 'event=listening listener=bench' "$scratch/wsproxy-$1.log")" -ge "$1" ]; do
        i=$((i + 1)); [ $i -lt 300 ] || { cat "$scratch/wsproxy-$1.log" >&2; exit 1; }
        sleep 0.1
    done
    sleep 0.5  # every worker accepting (its line comes just before)
    echo "$pid"
}

stop_wsproxy() {  # $1 = the pid start_wsproxy printed (not our child: it ran in a subshell), polled until gone
    kill -TERM "$1"
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
}
