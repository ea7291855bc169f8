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

# py-spy, for `tracer watch --py-stack` (a static binary from its wheel).
FROM python:3.11-slim-bookworm AS pyspy
RUN pip install --no-cache-dir py-spy==0.4.3

# Runtime: nothing but the binary, py-spy and their libc.
FROM debian:bookworm-slim
COPY --from=build /tracer /usr/local/bin/tracer
COPY --from=pyspy /usr/local/bin/py-spy /usr/local/bin/py-spy
USER 0
ENTRYPOINT ["/usr/local/bin/tracer"]
CMD ["watch", "--format=json", "--metrics-addr=127.0.0.1:9464", "--health-addr=127.0.0.1:9465", "--pods-dir=/var/log/pods"]
