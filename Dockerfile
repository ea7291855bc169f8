# Multi-stage build of the tracer image for the DaemonSet in deploy/kubernetes.
#
# Build stage: the same recipe `cargo xtask build` follows on a host
# (LLVM 22 from apt, bpf-linker built against it, nightly rust-src), so the
# BPF object is compiled and embedded in the one binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup toolchain install nightly --profile minimal --component rust-src
COPY . .
# xtask installs llvm-22-dev and bpf-linker when missing, then builds.
RUN cargo xtask build && cp target/release/tracer /tracer

# Runtime: nothing but the binary and its libc. Python stacks are read by
# the tracer itself (the py-spy crate, linked in): no py-spy binary.
FROM debian:bookworm-slim
COPY --from=build /tracer /usr/local/bin/tracer
USER 0
ENTRYPOINT ["/usr/local/bin/tracer"]
CMD ["watch", "--format=json", "--metrics-addr=127.0.0.1:9464", "--health-addr=127.0.0.1:9465", "--pods-dir=/var/log/pods"]
