# syntax=docker/dockerfile:1
#
# spray in a small image: build with the Rust toolchain, run on distroless as a
# non-root user. Not built by CI (no Docker engine there); see README, "Operations".
#
#   docker build -t spray .
#   docker run --rm -p 8080:8080 -v spray-data:/data spray
#
# The binary embeds its migrations and the Swagger UI, and links only glibc and
# libgcc, so the runtime image needs nothing else.

# The toolchain the crate declares (rust-version in Cargo.toml), on the same Debian
# release as the runtime image, so the binary finds the glibc it was linked against.
FROM rust:1.94-slim-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates and the build between image builds; the binary is
# copied out because the target cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin spray \
 && install -D target/release/spray /out/spray \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/spray /usr/local/bin/spray
# The SQLite file's folder, writable by the non-root user (uid 65532). Mount a volume
# here for the embedded store; with MySQL it stays empty.
COPY --from=builder --chown=65532:65532 /out/data /data
ENV SPRAY_LISTEN=0.0.0.0:8080 \
    SPRAY_DATABASE_URL=sqlite:///data/spray.db \
    SPRAY_LOG_FORMAT=json
USER 65532:65532
VOLUME ["/data"]
EXPOSE 8080
# No shell or curl in distroless: probe GET /healthz (liveness) and GET /readyz
# (readiness) from the orchestrator instead of a HEALTHCHECK.
ENTRYPOINT ["/usr/local/bin/spray"]
CMD ["serve"]
