#!/usr/bin/env bash
# Runs a local 3-node raftkv cluster in the foreground (Ctrl-C stops it).
# Data and logs go under .cluster/ (override with RAFTKV_CLUSTER_DIR). Ports are
# raftexample's: peers 12379/22379/32379, clients 12380/22380/32380.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p raftkv-node
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/raftkv-node"
dir="${RAFTKV_CLUSTER_DIR:-$PWD/.cluster}"
mkdir -p "$dir"
cluster="http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379"
pids=()
stop() {
  trap - EXIT INT TERM # once, whichever signal or exit came first
  echo
  echo "stopping the cluster (SIGTERM)..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM
for i in 1 2 3; do
  # Clients on loopback only: this cluster has no TLS and no admin token.
  "$bin" --id "$i" --cluster "$cluster" --port "${i}2380" --listen-client-addr "127.0.0.1:${i}2380" \
    --data-dir "$dir/node-$i" \
    >"$dir/node-$i.log" 2>&1 &
  pids+=("$!")
done
for i in 1 2 3; do
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:${i}2380/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${pids[$((i-1))]}" 2>/dev/null; then
      echo "node $i exited; see $dir/node-$i.log" >&2; tail -5 "$dir/node-$i.log" >&2; exit 1
    fi
    sleep 0.1
  done
done
cat <<MSG
raftkv: 3 nodes running, data and logs in $dir
  node 1: client http://127.0.0.1:12380  peer http://127.0.0.1:12379
  node 2: client http://127.0.0.1:22380  peer http://127.0.0.1:22379
  node 3: client http://127.0.0.1:32380  peer http://127.0.0.1:32379
Try:
  curl -L -X PUT http://127.0.0.1:12380/my-key -d hello
  curl -L http://127.0.0.1:22380/my-key
  curl -s http://127.0.0.1:32380/v1/members
Ctrl-C stops the cluster (data stays in $dir).
MSG
wait
