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
# The image's settings are a config file, not ENV: an ENV would outrank a config file an
# operator mounts (environment > file), silently. So the documented precedence holds in
# the container as anywhere: flags > environment (SPRAY_*) > this file > defaults. Mount
# your own file over /etc/spray/spray.toml, or set SPRAY_* variables, to change them.
COPY <<'EOF' /etc/spray/spray.toml
# spray in the container (see spray.toml.example for every setting).
listen = "0.0.0.0:8080"
database_url = "sqlite:///data/spray.db"
log_format = "json"
EOF
USER 65532:65532
VOLUME ["/data"]
EXPOSE 8080
# No shell or curl in distroless: the binary probes its own GET /readyz (exit 0 when
# ready, 1 otherwise). It reads the listen address from the same file and environment;
# an unspecified address (0.0.0.0) is asked on loopback.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/spray", "healthcheck", "--config", "/etc/spray/spray.toml"]
ENTRYPOINT ["/usr/local/bin/spray"]
CMD ["serve", "--config", "/etc/spray/spray.toml"]
