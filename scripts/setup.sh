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
  # Through env: sudo's env_reset would drop a variable set in front of it.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # Debian's prometheus package starts and enables a service on :9090 (all interfaces).
  # Our tests run their own Prometheus on a free loopback port: a service this script
  # brought in is turned off for good; one that was there before is left alone.
  if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
echo "setup.sh: protoc $(protoc --version | awk '{print $2}'), prometheus, ip, shellcheck present"
