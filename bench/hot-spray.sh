#!/usr/bin/env bash
# The hot-spray benchmark (see BENCHMARKS.md): builds the release binary and the load
# generator, then runs them against SQLite, MySQL and MySQL + Redis on this machine.
# Needs MariaDB on 127.0.0.1:3306 (root, no password) and Redis on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin spray --example hot_spray
exec target/release/examples/hot_spray
