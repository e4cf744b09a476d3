# syntax=docker/dockerfile:1
# Kiln's image: one `kiln` binary for every role (dispatcher, runner, observer, CLI).
#
#   docker build -t kiln .
#   docker run -p 7878:7878 -v kiln-data:/var/lib/kiln kiln serve --listen 0.0.0.0:7878 --data-dir /var/lib/kiln
#   docker run kiln runner --dispatcher http://DISPATCHER:7878 --name r1
#
# The base images are arguments so that a mirror (or, in `scripts/check-image`, images made
# from Debian's packages) can stand in for Docker Hub's.
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---- build: the pinned toolchain, the locked dependencies -------------------------------------
FROM ${RUST_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kiln \
    && install -D -m 0755 target/release/kiln /out/kiln

# ---- runtime: slim, non-root ------------------------------------------------------------------
FROM ${BASE_IMAGE}
# git for the runners' checkouts and the dispatcher's mirrors, ca-certificates for https
# remotes and TLS, tini as PID 1: it forwards SIGTERM to kiln (not to kiln's job processes:
# a draining runner lets its jobs finish) and reaps orphaned processes of jobs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git libssl3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kiln \
    && useradd --system --uid 10001 --gid kiln --home-dir /var/lib/kiln --create-home kiln
COPY --from=build /out/kiln /usr/local/bin/kiln
USER 10001:10001
WORKDIR /var/lib/kiln
# HOME is writable even with a read-only root filesystem when /var/lib/kiln is a volume.
ENV HOME=/var/lib/kiln
EXPOSE 7878
# `kiln serve` stops gracefully on SIGTERM; `kiln runner` drains (takes no new work, finishes
# its jobs, hands their output over) and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/kiln"]
CMD ["serve", "--listen", "0.0.0.0:7878", "--data-dir", "/var/lib/kiln"]
