#!/usr/bin/env bash
# Tests tests/e2e/run.sh itself, without Docker or a cluster: runs it against the fake
# docker/kind/helm/kubectl in tests/e2e/fake/ (a simulated RaftKV and node API) and checks
#   1. the happy path passes despite broken port-forwards and 503s during writes, and
#      runs every step (scale 5 and 3, pod deletion, uninstall, cluster deletion);
#   2. the kubectl (kustomize) install path works the same way;
#   3. a pod that comes back with a new data dir fails the suite, and the cluster is
#      still deleted; so does an API server that accepts an invalid spec change, a
#      backup job that never succeeds, a pod template change no pod picks up, and one
#      that restarts every member at once;
#   4. without a Docker engine, or without kind, it prints SKIP and exits 0.
# Needs python3 and curl. About two minutes. Usage: bash tests/e2e/selftest.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/bin-nokind"
for tool in docker kind helm kubectl; do
    ln -s "$here/fake/fakekube.py" "$work/bin/$tool"
done
ln -s "$here/fake/fakekube.py" "$work/bin-nokind/docker"

failures=0
# check DESCRIPTION COMMAND...: runs COMMAND, counts a failure when it fails.
check() {
    local what="$1"
    shift
    if "$@"; then
        echo "ok: $what"
    else
        echo "FAIL: $what" >&2
        failures=$((failures + 1))
    fi
}

# run_suite NAME [VAR=VALUE...]: runs run.sh against the fake with a fresh state; sets rc.
run_suite() {
    local name="$1"
    shift
    rm -f "$work"/state*
    rc=0
    env "$@" FAKE_STATE="$work/state" PATH="$work/bin:$PATH" E2E_TIMEOUT=60 \
        timeout 300 bash "$here/run.sh" >"$work/$name.log" 2>&1 || rc=$?
    cp "$work/state.calls" "$work/$name.calls" 2>/dev/null || : >"$work/$name.calls"
}

# fails_with NAME CAUSE [VAR=VALUE...]: the suite run with the fault exits 1, names CAUSE
# in its log, and still deletes the kind cluster.
fails_with() {
    local name="$1" cause="$2"
    shift 2
    run_suite "$name" "$@"
    check "exit status 1 (was $rc)" [ "$rc" -eq 1 ]
    check "names the cause" grep -q "$cause" "$work/$name.log"
    check "kind cluster deleted" grep -q "^kind delete cluster --name raftkv-e2e-" "$work/$name.calls"
}
echo "== happy path with broken tunnels and 503s"
run_suite pass FAKE_PF_DIE=60 FAKE_503_EVERY=9
check "exit status 0 (was $rc)" [ "$rc" -eq 0 ]
check "PASS printed" grep -q "PASS: kind e2e suite" "$work/pass.log"
check "tunnel re-established" grep -q "re-forwarding the Service" "$work/pass.log"
check "503 retried" grep -q "answered 503" "$work/pass.log"
check "scaled to 5" grep -q "^kubectl .*scale rkv/example --replicas=5" "$work/pass.calls"
check "scaled to 3" grep -q "^kubectl .*scale rkv/example --replicas=3" "$work/pass.calls"
check "deleted a pod" grep -q "^kubectl .*delete pod example-1" "$work/pass.calls"
check "helm uninstall" grep -q "^helm uninstall raftkv-operator" "$work/pass.calls"
check "invalid spec changes tried" grep -q "^kubectl .*patch rkv/example --type merge -p .*imagePullPolicy" "$work/pass.calls"
check "invalid spec changes refused" grep -q "ok: invalid spec changes refused" "$work/pass.log"
check "kind cluster deleted" grep -q "^kind delete cluster --name raftkv-e2e-" "$work/pass.calls"
check "backups scheduled" grep -q "^kubectl .*patch rkv/example --type merge -p .*\"backup\"" "$work/pass.calls"
check "a backup job's result read" grep -q "ok: example-backup-29000000: " "$work/pass.log"
check "backup schedule removed" grep -q "ok: CronJob example-backup deleted" "$work/pass.log"
check "pod template changed" grep -q "^kubectl .*patch rkv/example --type merge -p .*\"resources\"" "$work/pass.calls"
check "members restarted onto it" grep -q "ok: every member restarted onto the new pod template" "$work/pass.log"
no_port_forward() { ! pgrep -f "$work/bin/kubectl" >/dev/null; }
check "no port-forward left running" no_port_forward

echo "== the plain-manifest install path"
run_suite kubectl INSTALL_WITH=kubectl
check "exit status 0 (was $rc)" [ "$rc" -eq 0 ]
check "installed with kubectl apply -k" grep -q "^kubectl apply -k deploy/" "$work/kubectl.calls"
check "uninstalled with kubectl delete" grep -q "^kubectl delete -f deploy/operator.yaml" "$work/kubectl.calls"
no_helm() { ! grep -q "^helm " "$work/kubectl.calls"; }
check "no helm used" no_helm

echo "== a member that loses its data fails the suite"
fails_with amnesia "came back with a new data dir" FAKE_AMNESIA=1
check "prints diagnostics" grep -q "diagnostics after failure" "$work/amnesia.log"

echo "== an API server that accepts an invalid spec change fails the suite"
fails_with badspec "accepted the invalid change" FAKE_ACCEPT_BAD_SPEC=1

echo "== a backup job that never succeeds fails the suite"
fails_with nobackup "timed out after 60s waiting for a backup job of CronJob example-backup to succeed" FAKE_BACKUP_FAIL=1

echo "== pods that never pick up a changed template fail the suite"
fails_with norestart "timed out after 60s waiting for every member restarted onto template" FAKE_NO_RESTART=1
echo "== members restarted all at once fail the suite"
fails_with restartall "members did not restart one at a time" FAKE_RESTART_ALL=1
echo "== skips"
rc=0
FAKE_STATE="$work/state" FAKE_DOCKER_DOWN=1 PATH="$work/bin:$PATH" \
    bash "$here/run.sh" >"$work/noengine.log" || rc=$?
check "no engine: exit 0 (was $rc)" [ "$rc" -eq 0 ]
check "no engine: SKIP message" grep -q "^SKIP: docker/kind not found (docker is installed" "$work/noengine.log"
if [ -e /usr/bin/kind ] || [ -e /bin/kind ]; then
    echo "skipped: the no-kind case (kind is installed in /usr/bin or /bin)"
else
    rc=0
    FAKE_STATE="$work/state" PATH="$work/bin-nokind:/usr/bin:/bin" \
        bash "$here/run.sh" >"$work/nokind.log" || rc=$?
    check "no kind: exit 0 (was $rc)" [ "$rc" -eq 0 ]
    check "no kind: SKIP message" grep -q "^SKIP: docker/kind not found (no kind" "$work/nokind.log"
fi

if [ "$failures" -ne 0 ]; then
    echo "selftest: $failures check(s) failed; logs:" >&2
    tail -n 30 "$work"/*.log >&2
    exit 1
fi
echo "selftest: run.sh behaves as specified against the fake cluster"
