# syntax=docker/dockerfile:1
# One image with every lab binary; docker-compose.yml picks each service's
# command. The RUN --mount lines need BuildKit: Docker Compose v2 and Docker
# Engine 23+ use it by default; compose v1 needs DOCKER_BUILDKIT=1.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# .dockerignore keeps out everything the build does not read (target/, .git,
# .env, logs, bench SVGs, the docs), so editing those rebuilds nothing.
COPY . .
# protox compiles the .proto files in Rust, so no protoc is needed here.
# The cache mounts keep downloaded crates and compiled dependencies between
# builds, so changing one lab does not rebuild the world. Each has an id of
# this project's own: without one BuildKit names a cache by its target path,
# and every project on the machine that mounts /src/target shares one.
# The binaries are copied by name (the six of `cargo metadata`; compose-check
# keeps this list whole): the cache outlives builds, so target/release may
# also hold a binary since renamed or removed, which must not reach the image.
RUN --mount=type=cache,id=system-design-lab-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=system-design-lab-target,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/caching target/release/catalog target/release/chat \
       target/release/lab target/release/outbox target/release/telemetry /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home lab
COPY --from=build /out/ /usr/local/bin/
USER lab
ENV LOG_FORMAT=json
CMD ["lab", "up"]
