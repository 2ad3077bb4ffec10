# One image with every orderflow binary (fetcher, transformer, writer, orderflow, jst-sim,
# target-sim); docker-compose.yml picks the binary with `command`.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/fetcher target/release/transformer target/release/writer \
       target/release/orderflow target/release/jst-sim target/release/target-sim /out/

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 orderflow \
 && useradd --system --uid 10001 --gid orderflow --no-create-home --shell /usr/sbin/nologin orderflow
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
ENV LOG_FORMAT=json
# Every service serves /healthz and /readyz on ADMIN_ADDR; `orderflow probe URL` checks one.
CMD ["orderflow", "--help"]
