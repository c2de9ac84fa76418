#!/usr/bin/env bash
# Fault soak: runs the fault tests of raftkv-tests (process_faults, churn, partitions,
# fault_suite; names without a file in tests/tests/ are skipped) in soak mode
# (RAFTKV_SOAK=1), SOAK_ROUNDS times (default 5), one test at a time. Stops at the first
# failure and keeps everything: each round's output in the log folder, and the failed
# test's node logs and data dirs (RAFTKV_KEEP_TEST_DIR=1; test temp dirs are created
# under the log folder). Not run in CI: it takes a long time on purpose (one round of all
# four test files: about 13 minutes on a busy 2-core machine).
#
# Usage: bash scripts/fault-soak.sh [--rounds N] [--log-dir DIR] [--no-build]
#                                   [-- extra args for the test runner]
# Environment: SOAK_ROUNDS (rounds, default 5), SOAK_LOG_DIR (default
# ${CARGO_TARGET_DIR:-target}/fault-soak/<UTC time>), RAFTKV_CHURN_SEED (fixes the churn
# test's fault schedule; by default each round gets its own seed, printed), CARGO_TARGET_DIR.
# Uses `cargo nextest run` when installed, else `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

rounds=${SOAK_ROUNDS:-5}
log_dir=${SOAK_LOG_DIR:-}
build=1
extra=()
usage="usage: $0 [--rounds N] [--log-dir DIR] [--no-build] [-- extra test runner args]"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=${2:?$usage}; shift 2 ;;
    --log-dir) log_dir=${2:?$usage}; shift 2 ;;
    --no-build) build=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$rounds" in
  ''|*[!0-9]*) echo "rounds must be a positive integer, got '$rounds'" >&2; exit 2 ;;
esac
if [ "$rounds" -lt 1 ]; then
  echo "rounds must be at least 1" >&2
  exit 2
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ -z "$log_dir" ]; then
  log_dir="$target_dir/fault-soak/$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$log_dir/tmp"
log_dir=$(cd "$log_dir" && pwd)

# The fault tests that exist in this checkout.
tests=()
for name in process_faults churn partitions fault_suite; do
  if [ -f "tests/tests/$name.rs" ]; then
    tests+=("$name")
  else
    echo "skipping $name: tests/tests/$name.rs does not exist"
  fi
done
if [ "${#tests[@]}" -eq 0 ]; then
  echo "no fault tests found under tests/tests/" >&2
  exit 1
fi
test_args=()
for name in "${tests[@]}"; do
  test_args+=(--test "$name")
done

use_nextest=0
if cargo nextest --version >/dev/null 2>&1; then
  use_nextest=1
fi

if [ "$build" -eq 1 ]; then
  echo "== build (raftkv-node and the fault tests)"
  cargo build -p raftkv-node
  if [ "$use_nextest" -eq 1 ]; then
    cargo nextest list -p raftkv-tests "${test_args[@]}" >/dev/null
  else
    cargo test -p raftkv-tests "${test_args[@]}" --no-run
  fi
fi

export RAFTKV_SOAK=1
export RAFTKV_KEEP_TEST_DIR=1
# Kept test dirs (node logs, data dirs) land next to the round logs.
export TMPDIR="$log_dir/tmp"
seed_base=$(date +%s)

echo "== fault soak: ${tests[*]}; $rounds rounds; logs in $log_dir"
started=$(date +%s)
for round in $(seq 1 "$rounds"); do
  log="$log_dir/round-$round.log"
  seed=${RAFTKV_CHURN_SEED:-$((seed_base + round))}
  echo "-- round $round/$rounds (churn seed $seed), output in $log"
  status=0
  if [ "$use_nextest" -eq 1 ]; then
    # --no-capture: every test's output goes to the log; tests run one at a time.
    RAFTKV_CHURN_SEED=$seed cargo nextest run -p raftkv-tests "${test_args[@]}" \
      --no-capture "${extra[@]}" >"$log" 2>&1 || status=$?
  else
    RAFTKV_CHURN_SEED=$seed cargo test -p raftkv-tests "${test_args[@]}" "${extra[@]}" \
      -- --nocapture --test-threads 1 >"$log" 2>&1 || status=$?
  fi
  grep -E 'operations checked|acknowledged writes\) in' "$log" || true
  if [ "$status" -ne 0 ]; then
    echo "round $round FAILED (exit $status) after $(($(date +%s) - started)) s"
    echo "output: $log"
    grep -E 'keeping test dir' "$log" || true
    echo "replay the churn schedule with RAFTKV_CHURN_SEED=$seed"
    tail -n 40 "$log"
    exit "$status"
  fi
done
echo "== fault soak passed: $rounds rounds in $(($(date +%s) - started)) s; logs in $log_dir"
