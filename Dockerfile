# Two images from one build, picked with `--target`:
#   product (the default, the last stage): fetcher, transformer, writer and orderflow (the operator
#           CLI); no simulator and no lab. docker-compose.yml runs the stages from it.
#   sims:   the same plus jst-sim, target-sim and orderflow-lab (`docker build --target sims .`);
#           docker-compose.yml runs its default source and target (the simulators) from it.
# Needs BuildKit (`RUN --mount=type=cache`): the default builder since Docker 23 and in Compose v2;
# with docker-compose 1.x run `DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1 docker-compose build`.
# Build stage: the Rust toolchain; TLS is rustls on ring, so no OpenSSL and no cmake are needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out/product /out/sims \
 && cp target/release/fetcher target/release/transformer target/release/writer target/release/orderflow \
       /out/product/ \
 && cp target/release/jst-sim target/release/target-sim target/release/orderflow-lab /out/sims/

# Runtime: distroless (glibc + CA certificates, no shell), running as the non-root user 65532.
# Healthchecks use `orderflow probe URL` since there is no curl.
FROM gcr.io/distroless/cc-debian12:nonroot AS product
COPY --from=build /out/product/ /usr/local/bin/
USER nonroot:nonroot
ENV LOG_FORMAT=json
CMD ["orderflow", "--help"]

# The simulators and the lab on top of the production image (orderflow stays for the healthchecks).
FROM product AS sims
COPY --from=build /out/sims/ /usr/local/bin/

# The default target (`docker build .`, compose's `build: .`): the production image.
FROM product
