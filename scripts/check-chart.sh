#!/usr/bin/env bash
# CI check for the Kubernetes packaging (issue 5). Offline; run scripts/tools.sh first.
#   1. helm lint (strict) of charts/raftkv-operator, with default and all-features values
#   2. helm template output, the plain manifests (kubectl kustomize deploy/) and the
#      examples validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
#      strict, for each version in K8S_VERSIONS), and so are the objects the operator
#      creates for each example (`raftkv-operator render`, built with cargo); RaftKV
#      objects against the CRD's own
#      openAPIV3Schema; ServiceMonitors against a minimal structural check; plus project
#      rules: restricted pod security, /healthz probes, no wildcard or secrets RBAC
#   3. CRD drift: deploy/crd.yaml and the chart's crds/raftkv.yaml are identical (the Rust
#      test operator/tests/crd_drift.rs compares them with what the operator generates;
#      pass --cargo to run it here too)
#   4. rendered-manifest drift: deploy/operator.yaml equals the rendered chart
#   5. shellcheck of every *.sh in the repository
#   6. tests/e2e/selftest.sh: the kind suite's own logic against a fake cluster (~1 min)
# Usage: bash scripts/check-chart.sh [--cargo]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PATH="$repo_root/.tools/bin:$PATH"

K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.34.0}"
chart=charts/raftkv-operator

run_cargo=0
for arg in "$@"; do
    case "$arg" in
        --cargo) run_cargo=1 ;;
        *)
            echo "check-chart.sh: unknown argument: $arg (usage: check-chart.sh [--cargo])" >&2
            exit 2
            ;;
    esac
done

failures=0
step() { printf '\n== %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    failures=$((failures + 1))
}

for tool in helm kubectl shellcheck; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "check-chart.sh: $tool not found; run: bash scripts/tools.sh" >&2
        exit 1
    fi
done
python="$repo_root/.tools/venv/bin/python"
if [ ! -x "$python" ] || ! "$python" -c 'import kubernetes_validate' 2>/dev/null; then
    echo "check-chart.sh: kubernetes-validate not found in .tools/venv; run: bash scripts/tools.sh" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- 0. versions agree ---------------------------------------------------------------------
step "chart version matches the workspace version"
workspace_version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
chart_version="$(sed -n 's/^version: *//p' "$chart/Chart.yaml")"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' "$chart/Chart.yaml")"
if [ -z "$workspace_version" ] || [ "$chart_version" != "$workspace_version" ] \
    || [ "$app_version" != "$workspace_version" ]; then
    fail "Chart.yaml version=$chart_version appVersion=$app_version, workspace version=$workspace_version"
else
    echo "ok: $workspace_version"
fi

# --- 1. lint -------------------------------------------------------------------------------
# Values that switch every optional template on (and RBAC/ServiceAccount off).
cat >"$tmp/all-on.yaml" <<'YAML'
cluster:
  create: true
  name: lint
  replicas: 5
  image: raftkv-node:lint
  imagePullPolicy: Never
  storage:
    size: 2Gi
    storageClassName: standard
  resources:
    requests:
      cpu: 100m
      memory: 128Mi
serviceMonitor:
  enabled: true
  labels:
    release: prometheus
watchNamespace: raftkv-e2e
podAnnotations:
  example.com/a: "b"
imagePullSecrets:
  - name: regcred
extraEnv:
  - name: EXTRA
    value: "1"
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - key: kubernetes.io/os
              operator: In
              values: ["linux"]
YAML
cat >"$tmp/no-rbac.yaml" <<'YAML'
rbac:
  create: false
serviceAccount:
  create: false
  name: existing
replicaCount: 1
YAML

step "helm lint"
for values in "" "$tmp/all-on.yaml" "$tmp/no-rbac.yaml"; do
    args=(lint --strict "$chart" --namespace raftkv-system)
    [ -n "$values" ] && args+=(-f "$values")
    if ! helm "${args[@]}" >"$tmp/lint.log" 2>&1; then
        cat "$tmp/lint.log" >&2
        fail "helm lint ${values:+-f $(basename "$values")}"
    else
        echo "ok: helm lint ${values:+-f $(basename "$values")}"
    fi
done
# The schema must reject bad input.
if helm template x "$chart" --set cluster.replicas=0 >/dev/null 2>&1; then
    fail "values.schema.json accepted cluster.replicas=0"
else
    echo "ok: values.schema.json rejects cluster.replicas=0"
fi

# --- 2. schema validation ------------------------------------------------------------------
step "render"
helm template raftkv-operator "$chart" --namespace raftkv-system >"$tmp/default.yaml"
helm template raftkv-operator "$chart" --namespace raftkv-system -f "$tmp/all-on.yaml" \
    --include-crds >"$tmp/all-on.rendered.yaml"
helm template other "$chart" --namespace ops -f "$tmp/no-rbac.yaml" >"$tmp/no-rbac.rendered.yaml"
if ! kubectl kustomize deploy/ >"$tmp/kustomize.yaml"; then
    fail "kubectl kustomize deploy/"
fi
echo "ok: rendered $(grep -c '^kind:' "$tmp/default.yaml") default objects"
# What the operator itself creates for each example (its Rust builders): validated below
# like the chart, so a field the API server would refuse fails here, not in a cluster.
operator_objects=()
for example in deploy/examples/*.yaml; do
    out="$tmp/operator-$(basename "$example")"
    if cargo run -q -p raftkv-operator -- render "$example" >"$out"; then
        operator_objects+=("$out")
    else
        fail "raftkv-operator render $example"
    fi
done
echo "ok: rendered the operator's objects for ${#operator_objects[@]} examples"

step "validate against Kubernetes $K8S_VERSIONS schemas (kubernetes-validate, strict)"
crd_file=deploy/crd.yaml
if [ ! -f "$crd_file" ]; then
    fail "$crd_file missing (generate it: bash scripts/gen-manifests.sh)"
    crd_file=""
fi
# shellcheck disable=SC2086 # K8S_VERSIONS is a space-separated list on purpose
if ! "$python" - "$crd_file" "$K8S_VERSIONS" \
    "$tmp/default.yaml" "$tmp/all-on.rendered.yaml" "$tmp/no-rbac.rendered.yaml" \
    "$tmp/kustomize.yaml" deploy/examples/*.yaml "${operator_objects[@]}" <<'PY'; then
"""Validates every object of the given YAML files.

Built-in kinds: kubernetes-validate, strict (unknown fields are errors), for each version.
RaftKV: the openAPIV3Schema of the CRD in argv[1] (the served version).
ServiceMonitor: minimal structure (the prometheus-operator CRD is not vendored here).
Any other kind is an error: nothing passes unchecked.
"""
import sys

import jsonschema
import kubernetes_validate
import yaml

crd_path, versions, files = sys.argv[1], sys.argv[2].split(), sys.argv[3:]

def strict(schema):
    """Rejects unknown fields like the API server's strict field validation (kubectl
    --validate=strict): objects with declared properties get additionalProperties: false
    unless they preserve unknown fields."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


crd_schemas = {}
if crd_path:
    with open(crd_path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                schema = v.get("schema", {}).get("openAPIV3Schema")
                if v.get("served") and schema:
                    key = (spec["group"] + "/" + v["name"], spec["names"]["kind"])
                    # The root implicitly allows apiVersion, kind and metadata.
                    for prop in schema.get("properties", {}).values():
                        strict(prop)
                    crd_schemas[key] = schema


def check_service_monitor(obj):
    spec = obj.get("spec") or {}
    errors = []
    if not isinstance(spec.get("selector"), dict):
        errors.append("spec.selector must be a label selector")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        errors.append("spec.endpoints must be a non-empty list")
    else:
        for i, ep in enumerate(endpoints):
            if not isinstance(ep, dict) or not (ep.get("port") or ep.get("targetPort")):
                errors.append(f"spec.endpoints[{i}] needs port or targetPort")
    ns = spec.get("namespaceSelector", {})
    if not isinstance(ns, dict) or set(ns) - {"any", "matchNames"}:
        errors.append("spec.namespaceSelector takes only any/matchNames")
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        errors.append("apiVersion must be monitoring.coreos.com/v1")
    return errors


def check_policy(obj):
    """Project rules beyond the schema: restricted pod security, probes, least privilege."""
    kind, errors = obj.get("kind"), []
    if kind == "Deployment":
        pod = obj["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            errors.append("pod securityContext.runAsNonRoot must be true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append("pod seccompProfile must be RuntimeDefault")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"container {c['name']}: readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"container {c['name']}: allowPrivilegeEscalation must be false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                errors.append(f"container {c['name']}: capabilities must drop ALL")
            for probe in ("livenessProbe", "readinessProbe"):
                if c.get(probe, {}).get("httpGet", {}).get("path") != "/healthz":
                    errors.append(f"container {c['name']}: {probe} must GET /healthz")
    if kind in ("ClusterRole", "Role"):
        for rule in obj.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in rule.get(field, []):
                    errors.append(f"wildcard in {field}: {rule}")
            if {"secrets", "configmaps", "nodes"} & set(rule.get("resources", [])):
                errors.append(f"the operator needs no secrets, configmaps or nodes: {rule}")
            if kind == "ClusterRole" and "leases" in rule.get("resources", []):
                errors.append("leases belong in the namespaced Role")
    return errors


failed = 0
count = 0
for path in files:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for obj in docs:
        count += 1
        kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
        name = f"{path}: {kind}/{obj.get('metadata', {}).get('name', '?')}"
        if kind == "ServiceMonitor":
            errors = check_service_monitor(obj)
        elif (api, kind) in crd_schemas:
            validator = jsonschema.Draft7Validator(crd_schemas[(api, kind)])
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                      for e in validator.iter_errors(obj)]
        elif api.split("/")[0].endswith("raftkv.dev"):
            errors = [f"no CRD schema for {api} {kind} (is deploy/crd.yaml current?)"]
        else:
            errors = []
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"k8s {version}: {'.'.join(map(str, e.path))}: {e.message}")
                except Exception as e:  # schema not found, unsupported version
                    errors.append(f"k8s {version}: {getattr(e, 'message', e)}")
            errors += check_policy(obj)
        if errors:
            failed += 1
            for err in errors:
                print(f"ERROR {name}: {err}")
print(f"validated {count} objects, {failed} invalid")
sys.exit(1 if failed else 0)
PY
    fail "schema validation"
fi

# --- 3. CRD drift ----------------------------------------------------------------------------
step "CRD copies"
if [ -n "$crd_file" ]; then
    if cmp -s deploy/crd.yaml "$chart/crds/raftkv.yaml"; then
        echo "ok: deploy/crd.yaml == $chart/crds/raftkv.yaml"
    else
        fail "deploy/crd.yaml and $chart/crds/raftkv.yaml differ; run: bash scripts/gen-manifests.sh"
    fi
fi
if [ "$run_cargo" -eq 1 ]; then
    step "CRD drift against the operator (cargo test -p raftkv-operator --test crd_drift)"
    if ! cargo test --quiet -p raftkv-operator --test crd_drift; then
        fail "CRD drift test"
    fi
fi

# --- 4. rendered-manifest drift ------------------------------------------------------------
step "deploy/operator.yaml is the rendered chart"
if bash scripts/gen-manifests.sh --check --operator-only; then
    echo "ok: deploy/operator.yaml is current"
else
    fail "deploy/operator.yaml drift"
fi

# --- 5. shellcheck ---------------------------------------------------------------------------
step "shellcheck"
scripts=()
while IFS= read -r -d '' f; do
    scripts+=("$f")
done < <(if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard -- '*.sh'
else # a source tree without .git (a tarball)
    find . -name '*.sh' -not -path './target*' -not -path './.tools/*' -not -path './.cluster/*' -print0
fi)
if [ "${#scripts[@]}" -eq 0 ]; then
    fail "no shell scripts found"
elif shellcheck --external-sources "${scripts[@]}"; then
    echo "ok: ${#scripts[@]} scripts: ${scripts[*]}"
else
    fail "shellcheck"
fi

# --- 6. the e2e suite's logic ----------------------------------------------------------------
step "tests/e2e/run.sh against a fake cluster (tests/e2e/selftest.sh)"
if ! bash tests/e2e/selftest.sh; then
    fail "e2e selftest"
fi

echo
if [ "$failures" -ne 0 ]; then
    echo "check-chart.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "check-chart.sh: all checks passed"
