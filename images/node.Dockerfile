# syntax=docker/dockerfile:1
# raftkv-node image. Build from the repository root (scripts/build-images.sh does):
#   docker build -f images/node.Dockerfile -t raftkv-node:<version> .
# Runs as uid/gid 65532; data in the volume /var/lib/raftkv; client API 2379, peers 2380.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# raft-proto (prost codec) and our own messages need protoc at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and build artifacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p raftkv-node --bin raftkv-node \
    && install -D -m 0755 target/release/raftkv-node /out/usr/local/bin/raftkv-node \
    && install -d -m 0750 /out/var/lib/raftkv

FROM ${RUNTIME_IMAGE}
# tini as PID 1 forwards SIGTERM (the node hands leadership over on it) and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 raftkv \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin raftkv
COPY --from=builder /out/usr/local/bin/raftkv-node /usr/local/bin/raftkv-node
COPY --from=builder --chown=65532:65532 /out/var/lib/raftkv /var/lib/raftkv
ENV RAFTKV_DATA_DIR=/var/lib/raftkv \
    RAFTKV_PORT=2379
USER 65532:65532
VOLUME ["/var/lib/raftkv"]
EXPOSE 2379 2380
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/raftkv-node"]
