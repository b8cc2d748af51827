# Multi-stage build of the `strata` binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin strata

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/strata /usr/local/bin/strata
COPY config /etc/strata
WORKDIR /etc/strata
# Strata writes no files: run as nobody (the Kubernetes manifests do too).
USER 65534:65534
EXPOSE 50051 9090 6566
ENTRYPOINT ["strata"]
CMD ["serve", "-c", "/etc/strata/strata.toml", "-c", "/etc/strata/docker.toml"]
