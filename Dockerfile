# syntax=docker/dockerfile:1
# CALSYNC_BINARY picks the stage the binary is copied from:
#   build   (default) compiled in the Rust stage below: `docker build -t calsync .`
#   context a production binary built on the host (same command as the build stage) and taken
#           from the build context, for CI, which cannot pull rust: images:
#           `podman build --format docker --build-arg CALSYNC_BINARY=context -t calsync .`
ARG CALSYNC_BINARY=build

# Build stage: pinned toolchain. Pin by digest as well in your release pipeline.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# The whole context minus .dockerignore, so new crates and folders need no change here.
COPY . .
# The production binary: no lab (demo, drill, bench, simulator), no debug info. docker-compose.yml
# empties CALSYNC_CARGO_FEATURES for a lab build, whose image also runs the simulator.
ARG CALSYNC_CARGO_FEATURES=--no-default-features
RUN cargo build --profile production --locked ${CALSYNC_CARGO_FEATURES} --bin calsync \
 && install -D target/production/calsync /out/calsync

FROM scratch AS context
# Lets .ci/image.sh remove this stage's image once built: the binary lives on in the runtime stage.
LABEL calsync.stage=context
COPY target/production/calsync /out/calsync

FROM ${CALSYNC_BINARY} AS binary

# Runtime stage: slim Debian with only CA certificates added.
FROM debian:12.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 calsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin calsync \
 && mkdir /data && chown 10001:10001 /data
COPY --from=binary /out/calsync /usr/local/bin/calsync
USER 10001:10001
ENV CALSYNC_SERVER__LISTEN=0.0.0.0:8080 \
    CALSYNC_SERVER__PUBLIC_LISTEN=0.0.0.0:8081 \
    CALSYNC_STORE__URL=sqlite:///data/calsync.db \
    CALSYNC_LOG__FORMAT=json
VOLUME ["/data"]
# 8080: health, metrics, status page, admin API (keep internal); 8081: notifications only.
EXPOSE 8080 8081
# `calsync health` asks the running service for /healthz; no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 CMD ["calsync", "health"]
ENTRYPOINT ["calsync"]
CMD ["serve"]
