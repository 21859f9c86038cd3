#!/usr/bin/env bash
# The overload benchmark (see BENCHMARKS.md): builds the release binary and the load
# generator, then offers three times the measured capacity to one `spray serve` on SQLite.
# Any arguments are passed to `spray serve` (e.g. --max-concurrent-requests 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin spray --example overload
exec target/release/examples/overload "$@"
