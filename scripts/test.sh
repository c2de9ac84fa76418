#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds everything, runs every test.
# README.md gives this command; .ci/run calls it unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental caches help edit-compile loops, not one-shot runs, and cost ~0.6 GB of
# disk in a clean build (CI's disk has run out before). Keep a developer's choice.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== disk free for the build: $(df -h --output=avail . | tail -n 1 | tr -d ' ')"

# The chart checks' tools first: a machine that cannot get them fails in seconds, not
# after the build and the tests.
bash scripts/tools.sh          # helm, kubectl, kubernetes-validate into .tools/ (cached)

echo "== build"
cargo build --workspace --all-targets
if command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- Cargo.lock; then
  echo "warning: Cargo.lock was out of date with the manifests; commit the updated Cargo.lock" >&2
fi

echo "== unit, integration and cluster tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc

echo "== chart, manifests, shell scripts"
bash scripts/check-chart.sh
echo "== all tests passed"
