# syntax=docker/dockerfile:1
#
# trackmesh: the four services built once, with dependencies cached in their own
# layer (cargo-chef). Every service image holds all four binaries; the targets
# differ only in command, port and HEALTHCHECK:
#
#   docker build --target gateway         -t trackmesh/gateway:dev .
#   docker build --target refinement-api  -t trackmesh/refinement-api:dev .
#   docker build --target learning-api    -t trackmesh/learning-api:dev .
#   docker build --target storage-service -t trackmesh/storage-service:dev .
#
# (`docker-compose build` builds all four.) Without --target you get the gateway.
# protoc comes from the protoc-bin-vendored crate and librdkafka is built from
# source by rdkafka-sys with cc/make; zlib is linked from the system.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm
ARG CARGO_CHEF_VERSION=0.1.78

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION
# Use the image's toolchain as is: rust-toolchain.toml would also ask rustup
# for rustfmt and clippy, which a release build does not need.
ARG RUST_VERSION
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The bundled librdkafka build needs a C toolchain, make, perl, pkg-config and
# zlib headers: all part of the rust:*-bookworm image (buildpack-deps).
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml/Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
        --bin gateway --bin refinement-api --bin learning-api --bin storage-service --bin trackctl
COPY . .
# trackctl rides along for smoke tests from inside the cluster (kubectl exec).
RUN cargo build --release --locked \
        --bin gateway --bin refinement-api --bin learning-api --bin storage-service --bin trackctl \
    && mkdir -p /out \
    && cp target/release/gateway target/release/refinement-api \
          target/release/learning-api target/release/storage-service target/release/trackctl /out/

# ---------------------------------------------------------------- runtime
# Same Debian release as the builder, so glibc matches. Needs only libc,
# libgcc_s and libz, all in debian-slim: no package is installed.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG DEBIAN_RELEASE
LABEL org.opencontainers.image.title="trackmesh" \
      org.opencontainers.image.description="trackmesh services: gateway, refinement-api, learning-api, storage-service" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/trackmesh/trackmesh"
RUN groupadd --system --gid 10001 trackmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin trackmesh
COPY --from=builder /out/ /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp
ENV SERVER_HOST=0.0.0.0 \
    LOG_FORMAT=json \
    RUST_LOG=info
# SIGTERM starts the graceful drain (SHUTDOWN_GRACE, 20s by default): give
# `docker stop` more than that (compose sets stop_grace_period: 30s).
STOPSIGNAL SIGTERM

# One target per service. `<binary> healthcheck` asks the gRPC health service on
# 127.0.0.1:$SERVER_PORT and exits 0 only when SERVING, so the container is
# healthy once its dependencies are reachable.
FROM runtime AS refinement-api
ENV SERVER_PORT=50051
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["refinement-api", "healthcheck"]
CMD ["refinement-api"]

FROM runtime AS learning-api
ENV SERVER_PORT=50052
EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["learning-api", "healthcheck"]
CMD ["learning-api"]

FROM runtime AS storage-service
ENV SERVER_PORT=50053
EXPOSE 50053
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["storage-service", "healthcheck"]
CMD ["storage-service"]

FROM runtime AS gateway
ENV SERVER_PORT=50050
EXPOSE 50050
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["gateway", "healthcheck"]
CMD ["gateway"]
