#!/usr/bin/env bash
# Builds both container images from the repository root with docker (BuildKit):
#   raftkv-node:<version>      images/node.Dockerfile
#   raftkv-operator:<version>  images/operator.Dockerfile
# <version> is [workspace.package] version in Cargo.toml, which is also the operator's
# default node image tag and the chart's appVersion.
#
# Usage: scripts/build-images.sh [--print-version] [extra docker build args...]
#   IMAGE_PREFIX=registry.example.com/team/  prefixes both image names (default: none)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
if [ -z "$version" ]; then
    echo "build-images.sh: no [workspace.package] version in Cargo.toml" >&2
    exit 1
fi
if [ "${1:-}" = "--print-version" ]; then
    echo "$version"
    exit 0
fi

if ! command -v docker >/dev/null 2>&1; then
    echo "build-images.sh: docker not found" >&2
    exit 1
fi

prefix="${IMAGE_PREFIX:-}"
export DOCKER_BUILDKIT=1
for component in node operator; do
    tag="${prefix}raftkv-${component}:${version}"
    echo "build-images.sh: building $tag" >&2
    docker build -f "images/${component}.Dockerfile" -t "$tag" "$@" .
done
echo "build-images.sh: built ${prefix}raftkv-node:${version} ${prefix}raftkv-operator:${version}" >&2
