# syntax=docker/dockerfile:1
# raftkv-operator image. Build from the repository root (scripts/build-images.sh does):
#   docker build -f images/operator.Dockerfile -t raftkv-operator:<version> .
# Runs as uid/gid 65532 with a read-only root filesystem; /metrics and /healthz on 8080.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# protoc: harmless here, and needed if the operator ever links raftkv-node (raft-proto).
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p raftkv-operator --bin raftkv-operator \
    && install -D -m 0755 target/release/raftkv-operator /out/usr/local/bin/raftkv-operator

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 raftkv \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin raftkv
COPY --from=builder /out/usr/local/bin/raftkv-operator /usr/local/bin/raftkv-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/raftkv-operator"]
CMD ["run"]
