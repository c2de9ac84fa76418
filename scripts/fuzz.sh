#!/usr/bin/env bash
# Fuzzes raftkv's decoders and request paths with cargo-fuzz (libFuzzer): every target
# in fuzz/ (wal_records, snapshot_decode, peer_frames, http_request) for
# ${FUZZ_SECONDS:-60} seconds each.
#
# NOT run in CI: it takes minutes per target. CI runs the same target bodies on stable,
# briefly, over the seed corpora and fuzz/regressions/ plus a few thousand seeded random
# and mutated inputs: `cargo test -p raftkv-node --test hostile_input`.
#
# Usage: scripts/fuzz.sh [target...]        (no argument: every target)
# Env:   FUZZ_SECONDS    seconds per target (default 60)
#        FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: the code under test is safe
#                        Rust, and without ASan it runs several times faster; try address)
#
# cargo-fuzz needs nightly compiler features; on a stable toolchain RUSTC_BOOTSTRAP=1
# (set below) unlocks them. Builds go to fuzz/target (git-ignored). Inputs that found new
# coverage are added to fuzz/corpus/<target>/ (git-ignored but for the seed-* files). A
# crash stops that target and leaves its input in fuzz/artifacts/<target>/: fix the bug,
# then keep the input as fuzz/regressions/<target>/<what-it-was> (the hostile_input test
# runs every file there).
set -euo pipefail

cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
flags=(--release --debug-assertions --sanitizer "$sanitizer")

cd fuzz
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s"
    mkdir -p "corpus/$t"
    dirs=("corpus/$t")
    if [ -d "regressions/$t" ]; then
        dirs+=("regressions/$t")
    fi
    log="target/fuzz-$t.log"
    mkdir -p target
    status=0
    cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=60 -print_final_stats=1 >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ] || grep -qE 'panicked|deadly signal|Test unit written' "$log"; then
        grep -E 'panicked|Test unit written' "$log" || tail -n 20 "$log"
        failed+=("$t")
        echo "!! $t crashed: see $log and fuzz/artifacts/$t/"
    fi
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
echo "no crash in: ${targets[*]}"
