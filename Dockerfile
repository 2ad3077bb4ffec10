# One small image with every orderflow binary (fetcher, transformer, writer, orderflow, jst-sim,
# target-sim); docker-compose.yml picks the binary with `command`.
# Needs BuildKit (`RUN --mount=type=cache`): the default builder since Docker 23 and in Compose v2;
# with docker-compose 1.x run `DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1 docker-compose build`.
# Build stage: the Rust toolchain; TLS is rustls on ring, so no OpenSSL and no cmake are needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/fetcher target/release/transformer target/release/writer \
       target/release/orderflow target/release/jst-sim target/release/target-sim /out/

# Runtime: distroless (glibc + CA certificates, no shell), running as the non-root user 65532.
# Healthchecks use `orderflow probe URL` since there is no curl.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER nonroot:nonroot
ENV LOG_FORMAT=json
CMD ["orderflow", "--help"]
