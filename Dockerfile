# Multi-stage build: compile in the Rust image, run in a slim Debian image as a
# non-root user. Mount your config at /etc/pgveil (pgveil.yaml, TLS files, policies).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/pgveil

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgveil \
    && mkdir -p /var/log/pgveil && chown pgveil /var/log/pgveil
COPY --from=build /src/target/release/pgveil /usr/local/bin/pgveil
COPY config/docker.yaml /etc/pgveil/pgveil.yaml
USER pgveil
EXPOSE 6432
ENTRYPOINT ["pgveil", "run"]
CMD ["--config", "/etc/pgveil/pgveil.yaml"]
