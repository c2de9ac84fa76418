#!/usr/bin/env bash
# raftkv end-to-end suite on a throwaway kind cluster. One command, from anywhere:
#
#   bash tests/e2e/run.sh
#
# Needs docker (with a running engine), kind, curl; helm and kubectl are taken from PATH or
# installed into .tools/ by scripts/tools.sh. Exits 0 with "SKIP: ..." when docker or kind
# is missing. Steps: create a kind cluster (unique name, deleted on exit), build and load
# both images, helm install the operator chart, apply deploy/examples/raftkv.yaml (3
# members), check that the API server refuses invalid spec changes (the CRD's CEL
# rules), write and read keys through the client Service, scale to 5 and back to 3
# checking membership and data, delete a pod and see it rejoin with its data, scrape the
# node and operator /metrics, schedule backups (spec.backup) and see a backup job
# succeed, then remove the schedule, uninstall cleanly.
#
# Environment:
#   KEEP_CLUSTER=1       keep the kind cluster afterwards (prints how to delete it)
#   SKIP_BUILD=1         don't build the images (they must already exist locally)
#   KIND_NODE_IMAGE=...  kind node image (kind's default when unset)
#   E2E_TIMEOUT=600      seconds allowed for each membership change to converge
#   INSTALL_WITH=helm    how to install the operator: helm (the chart) or kubectl
#                        (kubectl apply -k deploy/, the plain manifests)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

log() { printf '[e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

# --- prerequisites -------------------------------------------------------------------------
if ! command -v docker >/dev/null 2>&1; then
    echo "SKIP: docker/kind not found (no docker command); the kind e2e suite needs Docker and kind"
    exit 0
fi
if ! docker info >/dev/null 2>&1; then
    echo "SKIP: docker/kind not found (docker is installed but 'docker info' fails: no running engine)"
    exit 0
fi
if ! command -v kind >/dev/null 2>&1; then
    echo "SKIP: docker/kind not found (no kind command; see https://kind.sigs.k8s.io/docs/user/quick-start/)"
    exit 0
fi
command -v curl >/dev/null 2>&1 || die "curl is required"
export PATH="$PATH:$repo_root/.tools/bin" # tools.sh fallbacks; your own helm/kubectl win
if ! command -v helm >/dev/null 2>&1 || ! command -v kubectl >/dev/null 2>&1; then
    # tools.sh fetches Linux x86_64 binaries (and uses apt-get): elsewhere, ask the user.
    if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && command -v apt-get >/dev/null 2>&1; then
        log "helm/kubectl not found; installing them with scripts/tools.sh"
        bash scripts/tools.sh
    else
        die "helm and kubectl are required (install them: https://helm.sh/docs/intro/install/, https://kubernetes.io/docs/tasks/tools/)"
    fi
fi

version="$(bash scripts/build-images.sh --print-version)"
node_image="raftkv-node:$version"
operator_image="raftkv-operator:$version"
e2e_timeout="${E2E_TIMEOUT:-600}"
install_with="${INSTALL_WITH:-helm}"
case "$install_with" in
    helm | kubectl) ;;
    *) die "INSTALL_WITH must be helm or kubectl, not '$install_with'" ;;
esac

cluster="raftkv-e2e-$(date +%s)-$$"
ns=raftkv-e2e
operator_ns=raftkv-system
release=raftkv-operator
example=deploy/examples/raftkv.yaml

work="$(mktemp -d)"
export KUBECONFIG="$work/kubeconfig" # never touch the user's kubeconfig
pf_pids=()
cluster_created=0
succeeded=0

cleanup() {
    local status=$?
    set +e
    for pid in "${pf_pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    if [ "$succeeded" -ne 1 ] && [ "$cluster_created" -eq 1 ]; then
        log "diagnostics after failure:"
        kubectl get rkv,statefulsets,cronjobs,jobs,pods,pvc,svc -A -o wide >&2
        kubectl -n "$ns" describe rkv >&2
        kubectl -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 40 >&2
        kubectl -n "$operator_ns" logs -l app.kubernetes.io/name=raftkv-operator \
            --tail=200 --prefix >&2
        kubectl -n "$ns" logs -l app.kubernetes.io/name=raftkv --tail=50 --prefix >&2
    fi
    if [ "$cluster_created" -eq 1 ]; then
        if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
            log "keeping kind cluster $cluster (KUBECONFIG=$work/kubeconfig);" \
                "delete it with: kind delete cluster --name $cluster"
        else
            log "deleting kind cluster $cluster"
            kind delete cluster --name "$cluster" >/dev/null 2>&1
        fi
    fi
    if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_until DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND every 2 s until it
# succeeds; fails the suite when the deadline passes.
wait_until() {
    local what="$1" timeout="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    log "waiting (<= ${timeout}s) for $what"
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "timed out after ${timeout}s waiting for $what"
        fi
        sleep 2
    done
    log "ok: $what"
}

# --- port-forwards ---------------------------------------------------------------------------
# port_forward TARGET REMOTE_PORT [NAMESPACE]: forwards a random 127.0.0.1 port to TARGET
# (svc/x, pod/x) in the background; sets PF_PID and PF_PORT once the tunnel is up.
PF_PID=""
PF_PORT=""
port_forward() {
    local target="$1" remote="$2" ns_="${3:-$ns}"
    local logf
    logf="$(mktemp "$work/pf.XXXXXX")"
    kubectl -n "$ns_" port-forward --address 127.0.0.1 "$target" ":$remote" >"$logf" 2>&1 &
    PF_PID=$!
    pf_pids+=("$PF_PID")
    PF_PORT=""
    local deadline=$((SECONDS + 30))
    while [ -z "$PF_PORT" ]; do
        PF_PORT="$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$logf" | head -n 1)"
        if [ -z "$PF_PORT" ]; then
            if ! kill -0 "$PF_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
                kill "$PF_PID" 2>/dev/null || true
                log "port-forward to $target failed: $(cat "$logf")"
                return 1
            fi
            sleep 1
        fi
    done
}

# The client Service tunnel used for reads and writes; re-established when it breaks
# (port-forward to a Service sticks to one pod, which scale-down or deletion can take away).
svc_pf_pid=""
svc_port=""
reforward_service() {
    if [ -n "$svc_pf_pid" ]; then
        kill "$svc_pf_pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + 120))
    until port_forward "svc/$name" 2379; do
        [ "$SECONDS" -lt "$deadline" ] || die "cannot port-forward svc/$name"
        sleep 2
    done
    svc_pf_pid="$PF_PID"
    svc_port="$PF_PORT"
    log "client Service $name forwarded to 127.0.0.1:$svc_port"
}

# api METHOD PATH [BODY]: one request through the client Service tunnel; sets HTTP_STATUS
# and HTTP_BODY. Connection failures re-establish the tunnel and retry (bounded).
HTTP_STATUS=""
HTTP_BODY=""
api() {
    local method="$1" path="$2"
    local args=(-sS --max-time 15 -X "$method" -o "$work/body" -w '%{http_code}')
    if [ "$#" -ge 3 ]; then
        args+=(--data-binary "$3")
    fi
    local attempt rc
    for attempt in 1 2 3 4 5 6; do
        rc=0
        HTTP_STATUS="$(curl "${args[@]}" "http://127.0.0.1:$svc_port$path")" || rc=$?
        if [ "$rc" -eq 0 ]; then
            HTTP_BODY="$(cat "$work/body")"
            return 0
        fi
        log "$method $path: curl exit $rc (attempt $attempt); re-forwarding the Service"
        reforward_service
    done
    die "$method $path kept failing"
}

# api_ok METHOD PATH [BODY]: like api, but retries (bounded) while the cluster answers 5xx,
# as it may for a moment while leadership moves; dies on any other non-2xx answer.
api_ok() {
    local attempt
    for attempt in $(seq 1 30); do
        api "$@"
        case "$HTTP_STATUS" in
            2??) return 0 ;;
            5??) log "$1 $2 answered $HTTP_STATUS (attempt $attempt): $HTTP_BODY" ;;
            *) die "$1 $2 answered $HTTP_STATUS: $HTTP_BODY" ;;
        esac
        sleep 1
    done
    die "$1 $2 kept answering $HTTP_STATUS: $HTTP_BODY"
}

# pod_get POD PATH: GET from one pod directly (its own view); sets HTTP_BODY.
pod_get() {
    local pod="$1" path="$2" rc=0
    port_forward "pod/$pod" 2379 || return 1
    HTTP_BODY="$(curl -sS --max-time 10 --fail "http://127.0.0.1:$PF_PORT$path")" || rc=$?
    kill "$PF_PID" 2>/dev/null || true
    return "$rc"
}

# --- checks on the API -----------------------------------------------------------------------
# count_role ROLE: members with that role in /v1/members (-1 when the request fails).
count_role() {
    api GET /v1/members
    if [ "$HTTP_STATUS" != 200 ]; then
        echo -1
        return 0
    fi
    grep -Eo "\"role\" *: *\"$1\"" <<<"$HTTP_BODY" | wc -l | tr -d ' '
}
has_voters() {
    local n
    count_role voter >"$work/count"
    n="$(cat "$work/count")"
    [ "$n" = "$1" ]
}
has_learners() {
    local n
    count_role learner >"$work/count"
    n="$(cat "$work/count")"
    [ "$n" = "$1" ]
}
rkv_ready() {
    [ "$(kubectl -n "$ns" get "rkv/$name" -o jsonpath='{.status.readyReplicas}' 2>/dev/null)" = "$1" ]
}
sts_ready() {
    local spec ready
    spec="$(kubectl -n "$ns" get "statefulset/$name" -o jsonpath='{.spec.replicas}' 2>/dev/null)"
    ready="$(kubectl -n "$ns" get "statefulset/$name" -o jsonpath='{.status.readyReplicas}' 2>/dev/null)"
    [ "$spec" = "$1" ] && [ "$ready" = "$1" ]
}
cluster_is() { has_voters "$1" && has_learners 0 && sts_ready "$1" && rkv_ready "$1"; }

written=0
# put_keys FROM TO: writes e2e-<i> = value-<i> through the client Service (acked on 2xx).
put_keys() {
    local i
    for i in $(seq "$1" "$2"); do
        api_ok PUT "/v1/kv/e2e-$i" "value-$i"
    done
    written="$2"
    log "wrote keys e2e-$1..e2e-$2"
}
# check_keys: every key written so far reads back its value (linearizable raw GET).
check_keys() {
    local i
    for i in $(seq 1 "$written"); do
        api_ok GET "/e2e-$i"
        [ "$HTTP_BODY" = "value-$i" ] || die "GET /e2e-$i returned '$HTTP_BODY', want 'value-$i'"
    done
    log "ok: all $written keys read back"
}

# --- 1. cluster and images -------------------------------------------------------------------
log "creating kind cluster $cluster"
kind_args=(create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --wait 180s)
if [ -n "${KIND_NODE_IMAGE:-}" ]; then
    kind_args+=(--image "$KIND_NODE_IMAGE")
fi
cluster_created=1
kind "${kind_args[@]}"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building images"
    bash scripts/build-images.sh
fi
log "loading $node_image and $operator_image into kind"
kind load docker-image --name "$cluster" "$node_image" "$operator_image"

# --- 2. operator -------------------------------------------------------------------------------
if [ "$install_with" = helm ]; then
    log "helm install $release"
    helm install "$release" charts/raftkv-operator --namespace "$operator_ns" --create-namespace \
        --set image.pullPolicy=Never --wait --timeout 5m
else
    log "kubectl apply -k deploy/"
    kubectl apply -k deploy/
fi
kubectl wait --for=condition=Established crd/raftkvs.raftkv.dev --timeout=60s
kubectl -n "$operator_ns" rollout status "deployment/$release" --timeout=180s

# --- 3. a 3-member cluster ---------------------------------------------------------------------
kubectl create namespace "$ns"
name="$(sed -n '/^metadata:/,/^[^ ]/ s/^  name: *//p' "$example" | head -n 1)"
[ -n "$name" ] || die "no metadata.name in $example"
log "applying $example (RaftKV $name)"
kubectl -n "$ns" apply -f "$example"
sts_exists() { kubectl -n "$ns" get "statefulset/$name" -o name >/dev/null 2>&1; }
wait_until "statefulset $name to exist" 120 sts_exists
wait_until "3 ready pods" "$e2e_timeout" sts_ready 3
reforward_service
wait_until "3 voters, RaftKV status ready 3" "$e2e_timeout" cluster_is 3

annotations="$(kubectl -n "$ns" get "pod/$name-0" -o jsonpath='{.metadata.annotations}')"
grep -q '"prometheus.io/scrape":"true"' <<<"$annotations" || die "pod lacks prometheus.io/scrape: $annotations"
grep -q '"prometheus.io/port":"2379"' <<<"$annotations" || die "pod lacks prometheus.io/port: $annotations"

# The CRD's validation rules run only in a real API server: each bad change must be
# refused with the rule's message.
for bad in \
    '{"spec":{"storage":{"storageClassName":"e2e-other"}}}|storage.storageClassName is immutable' \
    '{"spec":{"storage":{"size":"5Gi"}}}|storage.size is immutable' \
    '{"spec":{"storage":{"size":"ten gigs"}}}|should match' \
    '{"spec":{"imagePullPolicy":"Sometimes"}}|imagePullPolicy must be' \
    '{"spec":{"replicas":10}}|spec.replicas'; do
    patch="${bad%%|*}" want="${bad#*|}"
    if kubectl -n "$ns" patch "rkv/$name" --type merge -p "$patch" >"$work/patch.log" 2>&1; then
        die "the API server accepted the invalid change $patch"
    fi
    grep -q "$want" "$work/patch.log" || die "refusal of $patch does not say '$want': $(cat "$work/patch.log")"
done
log "ok: invalid spec changes refused (storage class, size and its format, pull policy, replicas)"

put_keys 1 50
check_keys
api GET "/e2e-missing"
[ "$HTTP_STATUS" = 404 ] || die "GET of a missing key answered $HTTP_STATUS, want 404"

# --- 4. scale to 5 and back to 3 ---------------------------------------------------------------
log "scaling to 5"
kubectl -n "$ns" scale "rkv/$name" --replicas=5
put_keys 51 80 # writes during the membership change
wait_until "5 voters, 5 ready pods" "$e2e_timeout" cluster_is 5
check_keys
for i in 3 4; do
    pod_get "$name-$i" "/v1/kv/e2e-50?consistency=serializable" \
        || die "new member $name-$i does not serve e2e-50"
    grep -q '"value-50"' <<<"$HTTP_BODY" || die "new member $name-$i has e2e-50 = $HTTP_BODY"
done
log "ok: new members $name-3 and $name-4 hold the data"

log "scaling back to 3"
kubectl -n "$ns" scale "rkv/$name" --replicas=3
put_keys 81 100
wait_until "3 voters, 3 ready pods" "$e2e_timeout" cluster_is 3
pvcs_gone() {
    ! kubectl -n "$ns" get pvc "data-$name-3" "data-$name-4" -o name 2>/dev/null | grep -q .
}
wait_until "PVCs of removed members deleted" 180 pvcs_gone
check_keys

# --- 5. a deleted pod rejoins with its data ----------------------------------------------------
victim="$name-1"
# incarnation POD: the pod's data-dir incarnation from /v1/status (empty on failure).
incarnation() {
    pod_get "$1" /v1/status || return 1
    grep -Eo '"incarnation" *: *"[0-9a-f]+"' <<<"$HTTP_BODY" | grep -Eo '[0-9a-f]{16}'
}
incarnation "$victim" >"$work/inc" || die "cannot read /v1/status of $victim"
before="$(cat "$work/inc")"
old_uid="$(kubectl -n "$ns" get "pod/$victim" -o jsonpath='{.metadata.uid}')"
log "deleting pod $victim (incarnation $before)"
kubectl -n "$ns" delete pod "$victim" --wait=true --timeout=120s
new_pod() {
    local uid
    uid="$(kubectl -n "$ns" get "pod/$victim" -o jsonpath='{.metadata.uid}' 2>/dev/null)"
    [ -n "$uid" ] && [ "$uid" != "$old_uid" ]
}
wait_until "pod $victim recreated" 180 new_pod
kubectl -n "$ns" wait --for=condition=Ready "pod/$victim" --timeout="${e2e_timeout}s"
incarnation "$victim" >"$work/inc" || die "cannot read /v1/status of the new $victim"
after="$(cat "$work/inc")"
[ "$before" = "$after" ] || die "$victim came back with a new data dir: incarnation $before -> $after"
pod_get "$victim" "/v1/kv/e2e-100?consistency=serializable" || die "$victim does not serve reads"
grep -q '"value-100"' <<<"$HTTP_BODY" || die "$victim lost data: e2e-100 = $HTTP_BODY"
wait_until "3 voters after the restart" "$e2e_timeout" cluster_is 3
put_keys 101 110
check_keys
log "ok: $victim rejoined with its data (incarnation $after)"

# --- 5b. a changed pod template restarts every member, one at a time ----------------------------
# template_hash KIND/NAME: the operator's pod-template hash on a pod or the StatefulSet.
template_hash() {
    local path='{.metadata.annotations.raftkv\.dev/template-hash}'
    case "$1" in statefulset/*) path='{.spec.template.metadata.annotations.raftkv\.dev/template-hash}' ;; esac
    kubectl -n "$ns" get "$1" -o "jsonpath=$path" 2>/dev/null
}
old_template="$(template_hash "statefulset/$name")" || die "cannot read the StatefulSet's template hash"
[ -n "$old_template" ] || die "the StatefulSet's pod template carries no raftkv.dev/template-hash"
incarnations_before=""
for i in 0 1 2; do
    incarnation "$name-$i" >"$work/inc" || die "cannot read /v1/status of $name-$i"
    incarnations_before+="$(cat "$work/inc") "
done
log "changing the pod template (spec.resources; template $old_template)"
kubectl -n "$ns" patch "rkv/$name" --type merge \
    -p '{"spec":{"resources":{"requests":{"cpu":"20m","memory":"64Mi"}}}}'
new_template=""
template_changed() {
    new_template="$(template_hash "statefulset/$name")"
    [ -n "$new_template" ] && [ "$new_template" != "$old_template" ]
}
wait_until "the StatefulSet's pod template to change" 120 template_changed
put_keys 111 140 # writes while members restart
# One member at a time: at every look (every 2 s), at least two of the three pods are ready.
fewest_ready=3
all_restarted() {
    local i ready
    ready="$(kubectl -n "$ns" get "statefulset/$name" -o jsonpath='{.status.readyReplicas}' 2>/dev/null)"
    if [ -n "$ready" ] && [ "$ready" -lt "$fewest_ready" ]; then fewest_ready="$ready"; fi
    for i in 0 1 2; do
        [ "$(template_hash "pod/$name-$i")" = "$new_template" ] || return 1
    done
    cluster_is 3
}
wait_until "every member restarted onto template $new_template" "$e2e_timeout" all_restarted
[ "$fewest_ready" -ge 2 ] || die "only $fewest_ready of 3 pods were ready at one point: members did not restart one at a time"
updated="$(kubectl -n "$ns" get "rkv/$name" -o jsonpath='{.status.updatedReplicas}')"
[ "$updated" = 3 ] || die "status.updatedReplicas is $updated after the restarts, want 3"
incarnations_after=""
for i in 0 1 2; do
    incarnation "$name-$i" >"$work/inc" || die "cannot read /v1/status of the restarted $name-$i"
    incarnations_after+="$(cat "$work/inc") "
done
[ "$incarnations_before" = "$incarnations_after" ] \
    || die "members came back with new data dirs: incarnations $incarnations_before-> $incarnations_after"
pod_get "$name-0" "/v1/kv/e2e-140?consistency=serializable" || die "$name-0 does not serve reads"
check_keys
log "ok: every member restarted onto the new pod template with its data"

# --- 6. metrics ----------------------------------------------------------------------------------
api_ok GET /metrics
metrics="$HTTP_BODY"
grep -q '^raftkv_' <<<"$metrics" || die "node /metrics has no raftkv_ series"
grep -q '^raftkv_server_has_leader 1' <<<"$metrics" || die "node /metrics: raftkv_server_has_leader is not 1"
log "ok: node /metrics ($(grep -c '^raftkv_' <<<"$metrics") raftkv_ samples)"
port_forward "svc/$release-metrics" 8080 "$operator_ns" || die "cannot forward operator metrics"
operator_metrics="$(curl -sS --max-time 10 --fail "http://127.0.0.1:$PF_PORT/metrics")" \
    || die "operator /metrics failed"
kill "$PF_PID" 2>/dev/null || true
grep -q '^# TYPE ' <<<"$operator_metrics" || die "operator /metrics is not Prometheus text"
log "ok: operator /metrics ($(grep -c '^# TYPE ' <<<"$operator_metrics") metric families)"

# --- 7. scheduled backups --------------------------------------------------------------------
log "scheduling a backup every minute (spec.backup)"
kubectl -n "$ns" patch "rkv/$name" --type merge \
    -p '{"spec":{"backup":{"schedule":"* * * * *","keep":2,"storage":{"size":"100Mi"}}}}'
backup_selector="app.kubernetes.io/name=raftkv-backup,app.kubernetes.io/instance=$name"
backup_job=""
backup_succeeded() {
    backup_job="$(kubectl -n "$ns" get jobs -l "$backup_selector" \
        -o 'jsonpath={.items[?(@.status.succeeded==1)].metadata.name}' 2>/dev/null | awk '{print $1}')"
    [ -n "$backup_job" ]
}
wait_until "a backup job of CronJob $name-backup to succeed" "$e2e_timeout" backup_succeeded
# The job's succeeded pod (a failed first attempt may be there too, and `logs job/...`
# could pick it).
backup_pod="$(kubectl -n "$ns" get pods -l "job-name=$backup_job" --field-selector=status.phase=Succeeded \
    -o 'jsonpath={.items[0].metadata.name}')" || die "cannot find the succeeded pod of $backup_job"
backup_out="$(kubectl -n "$ns" logs "pod/$backup_pod")" || die "cannot read the log of $backup_pod"
grep -q '"applied_index"' <<<"$backup_out" || die "backup job $backup_job printed no result: $backup_out"
grep -q '"file":"/backups/backup-' <<<"$backup_out" || die "backup job $backup_job wrote no backup file: $backup_out"
log "ok: $backup_job: $backup_out"
log "removing spec.backup"
kubectl -n "$ns" patch "rkv/$name" --type json -p '[{"op":"remove","path":"/spec/backup"}]'
cronjob_gone() { ! kubectl -n "$ns" get "cronjob/$name-backup" -o name 2>/dev/null | grep -q .; }
wait_until "CronJob $name-backup deleted" "$e2e_timeout" cronjob_gone
kubectl -n "$ns" get "pvc/$name-backups" -o name >/dev/null \
    || die "the backups claim $name-backups went with the schedule (it must stay)"
log "ok: the backups claim $name-backups stays"

# --- 8. clean uninstall --------------------------------------------------------------------------
kill "$svc_pf_pid" 2>/dev/null || true
log "deleting RaftKV $name"
kubectl -n "$ns" delete "rkv/$name" --wait=true --timeout=180s
sts_gone() { ! kubectl -n "$ns" get "statefulset/$name" -o name 2>/dev/null | grep -q .; }
pods_gone() {
    ! kubectl -n "$ns" get pods -l "app.kubernetes.io/instance=$name" -o name 2>/dev/null | grep -q .
}
wait_until "StatefulSet $name garbage-collected" 180 sts_gone
wait_until "pods of $name gone" 180 pods_gone
if [ "$install_with" = helm ]; then
    log "helm uninstall $release"
    helm uninstall "$release" --namespace "$operator_ns" --wait --timeout 3m
else
    # Only the operator: the CRD is deleted below, the namespace with it.
    log "kubectl delete -f deploy/operator.yaml"
    kubectl delete -f deploy/operator.yaml --wait=true --timeout=180s
fi
operator_gone() {
    ! kubectl -n "$operator_ns" get deployments,pods,services,serviceaccounts \
        -l app.kubernetes.io/instance="$release" -o name 2>/dev/null | grep -q .
}
wait_until "operator objects gone" 180 operator_gone
if kubectl get clusterrole,clusterrolebinding -o name | grep -q "/$release\$"; then
    die "cluster RBAC of $release left behind"
fi
# Helm keeps CRDs on uninstall by design; remove it like a user would.
kubectl delete crd raftkvs.raftkv.dev --wait=true --timeout=120s
if [ "$install_with" = kubectl ]; then
    kubectl delete namespace "$operator_ns" --wait=true --timeout=180s
fi

succeeded=1
log "PASS: kind e2e suite (cluster $cluster, installed with $install_with)"
