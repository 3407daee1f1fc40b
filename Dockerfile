# syntax=docker/dockerfile:1
# registry-connector image: built with the official Rust image, run on distroless.
#   docker build -t registry-connector:0.1.0 .
# The runtime is distroless/cc (glibc, libgcc, CA certificates, no shell): the binary
# links glibc dynamically, and its TLS (rustls with aws-lc) needs nothing else.

# Bookworm, so the binary links the glibc of the Debian 12 runtime below; a newer build
# image could require glibc symbols the runtime does not have.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only what the build reads (.dockerignore lets nothing else in): the workspace
# manifests, the lock file and the crates. --locked: the image gets exactly the
# dependency versions that were tested.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
# The cache mounts keep the registry and compiled dependencies between builds; the
# target dir lives only in the cache, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p registry-connector \
    && install -D -m 0755 target/release/registry-connector /out/registry-connector

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/registry-connector /usr/local/bin/registry-connector
# Numeric (the image's "nonroot" user), so Kubernetes can check runAsNonRoot.
USER 65532:65532
# Admin server: /healthz, /readyz, /metrics (listen on it with --admin-addr=0.0.0.0:9090).
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/registry-connector"]
