#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N workers, each with its own temp dir, CPUs and
# logical GPUs, each in its own process group, stopped by those groups (never a bare `ray stop`).
#
#   cluster/local-cluster.sh start [WORKERS] [CPUS_PER_NODE] [GPUS_PER_NODE]   # default 1 worker, 1 CPU, 1 GPU
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m tuning.search --config tuning/configs/quick.yaml --data "$PWD/../shared/data/chest_xray" \
#       --set storage_path=/tmp/pneumonia-results --set shared_storage=true
#   cluster/local-cluster.sh stop
set -euo pipefail
STATE=${PNEUMONIA_CLUSTER_DIR:-/tmp/pneumonia-cluster}
PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=token
[ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null

start_node() {  # name, then ray start arguments
  local name=$1; shift
  setsid ray start --block --temp-dir "$STATE/$name" --node-ip-address 127.0.0.1 "$@" \
    >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pgid"
}

case "${1:-}" in
  start)
    workers=${2:-1}; cpus=${3:-1}; gpus=${4:-1}
    mkdir -p "$STATE"
    start_node head --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
      --ray-client-server-port 20401 --num-cpus "$cpus" --num-gpus "$gpus"
    until ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1; do sleep 1; done
    for i in $(seq 1 "$workers"); do
      start_node "worker$i" --address "127.0.0.1:$PORT" --num-cpus "$cpus" --num-gpus "$gpus"
    done
    until [ "$(ray list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --format yaml 2>/dev/null \
            | grep -c 'state: ALIVE')" -ge $((workers + 1)) ]; do sleep 1; done
    echo "Ray at 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT ($((workers + 1)) nodes)"
    ;;
  stop)
    groups=()
    for f in "$STATE"/*.pgid; do
      [ -e "$f" ] || continue
      groups+=("$(cat "$f")")
      rm -f "$f"
    done
    # SIGTERM to each `ray start --block` alone: it drains its node and stops the node's processes (~3 s). A
    # SIGTERM to the whole group would kill the GCS first and leave the head waiting 30 s on it.
    for g in "${groups[@]}"; do kill -TERM "$g" 2>/dev/null || true; done
    for _ in $(seq 1 60); do   # up to 30 s to exit cleanly, then SIGKILL what is left
      left=0
      for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && left=1; done
      [ "$left" = 0 ] && break
      sleep 0.5
    done
    for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    ;;
  *) echo "usage: $0 start [WORKERS] [CPUS] [GPUS] | stop" >&2; exit 2 ;;
esac
