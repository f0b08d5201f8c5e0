# syntax=docker/dockerfile:1
# One image with every lab binary; docker-compose.yml picks each service's command.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles the .proto files in Rust, so no protoc is needed here.
# The cache mounts keep downloaded crates and compiled dependencies between
# builds, so changing one lab does not rebuild the world.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && find target/release -maxdepth 1 -type f -executable -exec cp {} /out/ \;

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home lab
COPY --from=build /out/ /usr/local/bin/
USER lab
ENV LOG_FORMAT=json
CMD ["lab", "up"]
