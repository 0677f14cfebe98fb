# syntax=docker/dockerfile:1
# hubspot-files-gateway: build with the Rust toolchain, run on distroless (no shell, no
# package manager), as the numeric non-root user the Helm chart expects (65532).
#   docker build -t hubspot-files-gateway:0.1.0 .

# The toolchain the project is built and tested with.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# --no-default-features: the production binary carries no HubSpot simulator (no `demo`,
# no `simulate`). Cache mounts keep the registry and target dir between builds; the binary is copied out
# of the cached target dir in the same step, since cache mounts are not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin hubspot-files-gateway \
    && install -D -m 0755 target/release/hubspot-files-gateway /out/hubspot-files-gateway

# glibc and CA certificates, nothing else (rustls uses its built-in webpki roots anyway).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/hubspot-files-gateway /usr/local/bin/hubspot-files-gateway
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/hubspot-files-gateway"]
# The chart passes its own args; this default matches the chart's config path.
CMD ["serve", "--config", "/etc/hubspot-files-gateway/gateway.toml"]
