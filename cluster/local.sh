#!/usr/bin/env bash
# A two-node Ray cluster on this machine, for `ray job submit`: a head (GCS, dashboard, job
# server) and one worker node, both on 127.0.0.1, token authentication on.
#
#   cluster/local.sh start    start both nodes, wait until both are up, print RAY_ADDRESS
#   cluster/local.sh status   what is running
#   cluster/local.sh stop     stop exactly the two nodes `start` started, and any Ray worker
#                             of theirs that outlived them (not any other Ray)
#
# Settings (environment): RAY_PORT (6390), DASHBOARD_PORT (8265), HEAD_CPUS (1),
# WORKER_CPUS (2), OBJECT_STORE_MB (1024 per node), CLUSTER_DIR (.cluster: pids, logs,
# Ray's session files), WORKER_CACHE (the worker node's own ALLMREC_CACHE, so that it shares
# no local files with the head), RAY_AUTH_TOKEN_PATH (the cluster's token; default
# ~/.ray/auth_token, generated when missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
RAY_PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-2}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-1024}"
CLUSTER_DIR="$(mkdir -p "${CLUSTER_DIR:-$repo/.cluster}" && cd "${CLUSTER_DIR:-$repo/.cluster}" && pwd)"
# Ray's Unix sockets live under its temp dir and their paths must stay short (108 bytes);
# a temp dir of its own also keeps `ray.init()` elsewhere on this machine from joining it.
RAY_TMP="/tmp/allmrec-ray-$RAY_PORT"
venv_bin="$repo/.venv/bin"
[[ -x "$venv_bin/ray" ]] || venv_bin="$(dirname "$(command -v ray)")"
# Job entry points say `python`: it must be the Python that has allmrec installed.
export PATH="$venv_bin:$PATH"
# Every Ray worker inherits its node's environment: what allmrec's jobs want on every node
# (spin-waiting OpenMP threads cost 10x on shared cores; models never come from a hub).
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TRAIN_ENABLE_PRINT_PATCH=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5
export RAY_AUTH_MODE=token

ensure_token() {
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
            mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
            (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' \
                >"$RAY_AUTH_TOKEN_PATH")
        fi
    else
        ray get-auth-token --generate >/dev/null 2>&1
    fi
}

alive() { [[ -f "$CLUSTER_DIR/$1.pid" ]] && kill -0 "$(cat "$CLUSTER_DIR/$1.pid")" 2>/dev/null; }

nodes_alive() {
    python - "$RAY_PORT" <<'EOF' 2>/dev/null
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
}

wait_for_nodes() {
    local want="$1" deadline=$((SECONDS + 120))
    until [[ "$(nodes_alive || true)" == "$want" ]]; do
        if ((SECONDS > deadline)); then
            echo "cluster: $want node(s) not up after 120 s; logs in $CLUSTER_DIR" >&2
            return 1
        fi
        for node in head worker; do
            if [[ -f "$CLUSTER_DIR/$node.pid" ]] && ! alive "$node"; then
                echo "cluster: the $node node exited; its log:" >&2
                tail -20 "$CLUSTER_DIR/$node.log" >&2
                return 1
            fi
        done
        sleep 2
    done
}

# Each node's agents get ports of their own, derived from DASHBOARD_PORT: both nodes - and any
# other Ray on this machine, which takes Ray's default ports - share one port space.
agent_ports() {
    local base=$((DASHBOARD_PORT + $1))
    echo "--dashboard-agent-listen-port=$base --dashboard-agent-grpc-port=$((base + 1))" \
        "--metrics-export-port=$((base + 2)) --runtime-env-agent-port=$((base + 3))"
}

start() {
    if alive head || alive worker; then
        echo "cluster: already running (cluster/local.sh status; cluster/local.sh stop)" >&2
        exit 1
    fi
    ensure_token
    local store=$((OBJECT_STORE_MB * 1024 * 1024))
    # --block: each `ray start` stays in the foreground of its own process and takes its node
    # down when it gets SIGTERM, so `stop` stops these nodes and nothing else.
    # The head holds the GCS: it has no one to drain its work to, so it need not wait 30 s.
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5 nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
        --num-cpus="$HEAD_CPUS" --object-store-memory="$store" --temp-dir="$RAY_TMP" \
        $(agent_ports 200) --disable-usage-stats >"$CLUSTER_DIR/head.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/head.pid"
    wait_for_nodes 1
    env ${WORKER_CACHE:+ALLMREC_CACHE="$WORKER_CACHE"} nohup ray start --block \
        --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 \
        --num-cpus="$WORKER_CPUS" --object-store-memory="$store" \
        $(agent_ports 100) --disable-usage-stats >"$CLUSTER_DIR/worker.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/worker.pid"
    wait_for_nodes 2
    echo "cluster: 2 nodes up (head: $HEAD_CPUS CPU, worker: $WORKER_CPUS CPU), token auth on"
    echo "dashboard and job server: http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
}

stop_node() {
    local node="$1" pid
    [[ -f "$CLUSTER_DIR/$node.pid" ]] || return 0
    pid="$(cat "$CLUSTER_DIR/$node.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster: the $node node did not stop in 30 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$CLUSTER_DIR/$node.pid"
    echo "cluster: $node node stopped"
}

# Ray workers that outlived their node: a Ray 2.60 worker can deadlock in its own exit handler
# and sleep on, its log files still open in this cluster's temp dir. Only Ray's own worker
# processes (named `ray::...`) are taken: a driver or a `tail -f` on a log is left alone.
stragglers() {
    local pid
    for pid in $(find /proc/[0-9]*/fd -maxdepth 1 -lname "$RAY_TMP/*" 2>/dev/null | cut -d/ -f3 | sort -u); do
        if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == ray::* ]]; then
            echo "$pid"
        fi
    done
}

stop_stragglers() {
    local pids
    pids="$(stragglers)"
    [[ -n "$pids" ]] || return 0
    echo "cluster: killing $(echo "$pids" | wc -l) Ray worker(s) that outlived the nodes" >&2
    kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 20); do
        [[ -n "$(stragglers)" ]] || return 0
        sleep 0.5
    done
}

case "${1:-}" in
start) start ;;
stop)
    stop_node worker
    stop_node head
    stop_stragglers
    ;;
status)
    for node in head worker; do
        if alive "$node"; then echo "$node: running (pid $(cat "$CLUSTER_DIR/$node.pid"))"; else echo "$node: stopped"; fi
    done
    if alive head; then echo "RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"; fi
    ;;
*)
    echo "usage: cluster/local.sh start|status|stop" >&2
    exit 2
    ;;
esac
