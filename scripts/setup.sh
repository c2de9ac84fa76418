#!/usr/bin/env bash
# Installs what building and testing raftkv needs on a Debian machine with Rust:
# protoc (raft-rs's prost codec), Prometheus (the scrape test), iproute2 (network
# namespaces for the fault suite), shellcheck. Idempotent; uses sudo when not root.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v prometheus >/dev/null || need+=(prometheus)
command -v ip >/dev/null || need+=(iproute2)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v curl >/dev/null || need+=(curl)
command -v git >/dev/null || need+=(git) # check-chart.sh lists the scripts it checks
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && [ -z "$sudo" ]; then
    echo "setup.sh: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  fi
  echo "setup.sh: installing ${need[*]}"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# A Debian prometheus package starts and enables a service on :9090 (all interfaces);
# our tests run their own Prometheus on a free loopback port: stop it and keep it off.
if command -v systemctl >/dev/null && systemctl is-enabled --quiet prometheus 2>/dev/null; then
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
elif command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  $sudo systemctl stop prometheus 2>/dev/null || true
fi
echo "setup.sh: protoc $(protoc --version | awk '{print $2}'), prometheus, ip, shellcheck present"
