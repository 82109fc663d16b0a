# syntax=docker/dockerfile:1
# The `infergate` binary (endpoint picker, simulator, gateway, bench) in a small non-root
# image. Build from the repository root:
#   docker build -t infergate:dev .
# The deploy/ manifests run it as `infergate epp ...` and `infergate sim ...`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p infergate --bin infergate \
    && cp target/release/infergate /usr/local/bin/infergate

# glibc, libgcc and CA certificates, no shell; runs as the `nonroot` user (65532), numeric so
# that `runAsNonRoot: true` can verify it.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/infergate /usr/local/bin/infergate
USER 65532:65532
# ext_proc, gRPC health, metrics of `infergate epp`; 8000 is `infergate sim`'s default port.
EXPOSE 9002 9003 9090 8000
ENTRYPOINT ["infergate"]
