#!/usr/bin/env bash
# Side-by-side benchmark: a 3-member raftkv, a 3-member etcd 3.4 (Debian's etcd-server)
# and a 3-node raftexample, each on 127.0.0.1 with data on the same disk, driven in turn
# by the same client (raftkv-bench) with the same workloads, repeated; prints medians
# and raftkv's ratios. Not a test: nothing asserts on the numbers.
#
# Usage: bash scripts/compare.sh [--repeat N] [--duration S] [--keys N] [--out DIR]
#                                [--no-build] [--restart-test [--restart-keys N]]
# Binaries come from ${CARGO_TARGET_DIR:-target}/release. All traffic stays on 127.0.0.1.
# Needs ../shared/tools/build-raftexample.sh (installs etcd, wrk, Go; builds raftexample).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

repeat=3
duration=10
keys=100000
out=""
build=1
restart_test=0
restart_keys=1000000
usage="usage: $0 [--repeat N] [--duration S] [--keys N] [--out DIR] [--no-build] [--restart-test [--restart-keys N]]"
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --restart-test) restart_test=1; shift ;;
    --restart-keys) restart_keys=$2; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$repeat$duration$keys$restart_keys" in *[!0-9]*) echo "$usage (numbers only)" >&2; exit 2 ;; esac

work=$(mktemp -d /tmp/raftkv-compare-XXXXXX)
out=${out:-$work/results}
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ "$build" = 1 ]; then
  echo "== build (release)"
  bash scripts/setup.sh >/dev/null
  cargo build --release -q -p raftkv-node -p raftkv-bench
fi
node="$target_dir/release/raftkv-node"
bench="$target_dir/release/raftkv-bench"
shared="$root/../shared/tools/build-raftexample.sh"
if [ ! -f "$shared" ]; then
  echo "compare.sh: $shared not found (the shared/ folder sits beside the repository)" >&2
  exit 1
fi
raftexample=$(OUT_DIR="$work/anchors" bash "$shared" | tail -1)
snapshot_count=10000

stop_all() { # SIGTERM, up to 10 s to exit, then SIGKILL; only the processes we started
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

wait_http() { # url: until it answers 2xx/404 (or 30 s)
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)
    case "$code" in 2*|404) return 0 ;; esac
    sleep 0.1
  done
  echo "compare.sh: $1 never answered" >&2
  return 1
}

raftkv_cluster="http://127.0.0.1:17301,http://127.0.0.1:17302,http://127.0.0.1:17303"
wait_200() { # url: until it answers 200 (or 120 s)
  for _ in $(seq 1 1200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "compare.sh: $1 never answered 200" >&2
  return 1
}

node_pid=()
start_raftkv_node() { # id: starts node <id> on $work/raftkv/n<id>; its pid goes last in pids and in node_pid[id]
  local i=$1 d="$work/raftkv"
  RUST_LOG=warn "$node" --id "$i" --cluster "$raftkv_cluster" --port "1740$i" --listen-client-addr "127.0.0.1:1740$i" \
    --data-dir "$d/n$i" --snapshot-count "$snapshot_count" >>"$d/n$i.log" 2>&1 &
  pids+=("$!")
  node_pid[i]=$!
}

start_raftkv() {
  local d="$work/raftkv"
  rm -rf "$d"; mkdir -p "$d"
  for i in 1 2 3; do start_raftkv_node "$i"; done
  for i in 1 2 3; do wait_http "http://127.0.0.1:1740$i/readyz"; done
  endpoints="http://127.0.0.1:17401,http://127.0.0.1:17402,http://127.0.0.1:17403"
}

start_etcd() {
  local d="$work/etcd" ic=""
  rm -rf "$d"; mkdir -p "$d"
  ic="e1=http://127.0.0.1:17311,e2=http://127.0.0.1:17312,e3=http://127.0.0.1:17313"
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$d/e$i" --listen-client-urls "http://127.0.0.1:1741$i" \
      --advertise-client-urls "http://127.0.0.1:1741$i" --listen-peer-urls "http://127.0.0.1:1731$i" \
      --initial-advertise-peer-urls "http://127.0.0.1:1731$i" --initial-cluster "$ic" \
      --initial-cluster-state new --snapshot-count "$snapshot_count" --log-level error >"$d/e$i.log" 2>&1 &
    pids+=("$!")
  done
  for i in 1 2 3; do wait_http "http://127.0.0.1:1741$i/health"; done
  endpoints="http://127.0.0.1:17411,http://127.0.0.1:17412,http://127.0.0.1:17413"
}

start_raftexample() {
  local d="$work/raftexample" c=""
  rm -rf "$d"; mkdir -p "$d"
  c="http://127.0.0.1:17321,http://127.0.0.1:17322,http://127.0.0.1:17323"
  for i in 1 2 3; do
    (cd "$d" && exec "$raftexample" --id "$i" --cluster "$c" --port "1742$i" >"$d/r$i.log" 2>&1) &
    pids+=("$!")
  done
  for i in 1 2 3; do wait_http "http://127.0.0.1:1742$i/compare-probe"; done
  endpoints="http://127.0.0.1:17421,http://127.0.0.1:17422,http://127.0.0.1:17423"
}

run() { # system workload rep
  local sys=$1 w=$2 rep=$3 server_pids
  server_pids=$(IFS=,; echo "${pids[*]}")
  "$bench" --target "$sys" --endpoints "$endpoints" --workload "$w" --keys "$keys" \
    --duration "${duration}s" --warmup 2s --connections 32 --value-size 256 --key-size 8 \
    --pids "$server_pids" --json >"$out/$sys-$w-$rep.json" 2>"$out/$sys-$w-$rep.err" || true
  printf '  %-12s %-17s rep %s: %s ops/s\n' "$sys" "$w" "$rep" \
    "$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["throughput"]))' "$out/$sys-$w-$rep.json" 2>/dev/null || echo failed)"
}

for rep in $(seq 1 "$repeat"); do
  for sys in raftkv etcd raftexample; do
    echo "== $sys (repeat $rep of $repeat)"
    "start_$sys"
    "$bench" --target "$sys" --endpoints "$endpoints" --workload load --keys "$keys" --connections 32 >/dev/null 2>&1 || true
    if [ "$sys" = raftexample ]; then # it acks before commit: wait until the last key is everywhere
      last=$(printf '%08d' $((keys - 1)))
      for i in 1 2 3; do wait_200 "http://127.0.0.1:1742$i/$last"; done
    fi
    if [ "$sys" = raftexample ]; then
      workloads="put get mix"   # raftexample's GET is a local read: its only kind
    else
      workloads="put get get-serializable mix"
    fi
    for w in $workloads; do run "$sys" "$w" "$rep"; done
    stop_all
  done
done

if [ "$restart_test" = 1 ]; then
  echo "== raftkv restart test: $restart_keys keys, kill -9 a follower, then the leader; restart; time to a linearizable read"
  start_raftkv
  "$bench" --target raftkv --endpoints "$endpoints" --workload load --keys "$restart_keys" \
    --connections 32 --value-size 256 --key-size 8 >"$out/restart-load.txt" 2>&1 || true
  last=$(printf '%08d' $((restart_keys - 1)))
  for i in 1 2 3; do wait_200 "http://127.0.0.1:1740$i/v1/kv/$last?consistency=serializable"; done
  echo "  node data dir: $(du -sh "$work/raftkv/n1" | cut -f1)"
  # A follower first (the usual case: the others keep serving), then the leader (the
  # other two must elect a new one before the restarted node can get a read index).
  for role in follower leader; do
    leader=$(curl -s "http://127.0.0.1:17401/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])' 2>/dev/null || echo 0)
    case "$leader" in 1|2|3) ;; *) echo "  no leader known; restart test skipped"; break ;; esac
    if [ "$role" = leader ]; then victim=$leader; else victim=$(( leader % 3 + 1 )); fi
    kill -9 "${node_pid[$victim]}"; wait "${node_pid[$victim]}" 2>/dev/null || true
    t0=$(date +%s%N)
    start_raftkv_node "$victim"
    served=0
    for _ in $(seq 1 6000); do # 60 s at most
      code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:1740$victim/v1/kv/$last" || true)
      if [ "$code" = 200 ]; then served=1; break; fi
      sleep 0.01
    done
    t1=$(date +%s%N)
    if [ "$served" = 1 ]; then
      echo "  restart of the $role (node $victim) to its first linearizable read: $(( (t1 - t0) / 1000000 )) ms" | tee -a "$out/restart.txt"
    else
      echo "  the $role (node $victim) did not serve a read within 60 s of its restart" | tee -a "$out/restart.txt"
    fi
  done
  stop_all
fi

echo
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), data on $(df -h "$work" | awk 'NR==2{print $1" ("$2")"}')"
python3 - "$out" <<'PY'
import json, glob, os, statistics, sys
out = sys.argv[1]
rows = {}
stolen = []  # runs during which the hypervisor took more than 5 % of the CPU time
failing = []  # runs with errors above 0.1 % of their requests, or no success at all
for f in glob.glob(os.path.join(out, "*.json")):
    try:
        d = json.load(open(f))
    except Exception:
        continue
    errors, ok = d.get("error_total", 0), d.get("ok", 0)
    if errors > 0.001 * max(ok + errors, 1):
        failing.append(f"{d['target']} {d['workload']} {os.path.basename(f)}: {errors} errors, {ok} ok")
    if ok == 0:
        continue  # a run where nothing succeeded has no throughput or latency to count
    key = (d["target"], d["workload"])
    r = rows.setdefault(key, {"tput": [], "p99": [], "rss": [], "cpu_per_op": [], "steal": [], "errors": []})
    r["errors"].append(errors)
    r["tput"].append(d["throughput"])
    r["p99"].append(d["latency"]["p99_us"] / 1000)
    # Missing when a server process could not be sampled (e.g. it died): skip the value.
    if d.get("server_peak_rss_kib_sum") is not None:
        r["rss"].append(d["server_peak_rss_kib_sum"] / 1024)
    if d.get("server_cpu_seconds_sum") is not None:
        r["cpu_per_op"].append(d["server_cpu_seconds_sum"] / max(d["ok"], 1) * 1e6)
    if d.get("host"):
        r["steal"].append(d["host"]["steal_percent"])
        if d["host"]["steal_percent"] > 5:
            stolen.append(f"{d['target']} {d['workload']} {os.path.basename(f)}: {d['host']['steal_percent']:.0f} %")
med = {k: {m: (statistics.median(v) if v else float("nan")) for m, v in r.items()} for k, r in rows.items()}
print(f"{'system':12} {'workload':17} {'ops/s':>9} {'p99 ms':>8} {'peak RSS MiB':>13} {'server CPU us/op':>17} {'steal %':>8} {'errors':>7}")
for (s, w) in sorted(med):
    m = med[(s, w)]
    print(f"{s:12} {w:17} {m['tput']:9.0f} {m['p99']:8.2f} {m['rss']:13.1f} {m['cpu_per_op']:17.1f} {m['steal']:8.1f} {m['errors']:7.0f}")
def warn(runs, *lines):
    if runs:
        print()
        print(*lines, sep="\n")
        for s in sorted(runs):
            print("  " + s)
warn(failing, "WARNING: runs with errors (over 0.1 % of requests, or nothing succeeded; the latter are",
     "left out of the medians; failed requests are not in the latency percentiles):")
warn(stolen, "WARNING: the hypervisor took more than 5 % of the CPU time during these runs; their",
     "numbers measure the host's other tenants too (repeat the comparison):")
print()
def ratio(w, other, ow=None, metric="tput"):
    a, b = med.get(("raftkv", w)), med.get((other, ow or w))
    return f"{a[metric] / b[metric]:.2f}x" if a and b and b[metric] else "n/a"
print("raftkv / etcd:        PUT", ratio("put", "etcd"), " GET", ratio("get", "etcd"),
      " GET-serializable", ratio("get-serializable", "etcd"), " mix", ratio("mix", "etcd"),
      " PUT p99", ratio("put", "etcd", metric="p99"), " peak RSS (PUT run)", ratio("put", "etcd", metric="rss"))
print("raftkv / raftexample: PUT", ratio("put", "raftexample"),
      " GET-serializable vs its GET", ratio("get-serializable", "raftexample", "get"),
      " mix", ratio("mix", "raftexample"))
PY
echo "raw results: $out"
