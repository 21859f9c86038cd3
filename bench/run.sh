#!/usr/bin/env bash
# The whole benchmark (see BENCHMARKS.md): builds the release binary and the load
# generator, then runs every workload on SQLite, MySQL and MySQL + Redis beside the
# machine's limits, and writes BENCHMARKS.md's generated part and bench/figures/*.svg.
#   bench/run.sh            full: medians of 3 rounds (about 15 minutes)
#   bench/run.sh --quick    one round of shortened workloads (1-2 minutes), to check it works
#   bench/run.sh --soak     full, then the mixed workload for 10 minutes, sampling RSS
#                           (with --quick, for one minute)
#   bench/run.sh [--quick] --probe STORE WORKLOAD   one workload on one store (sqlite, mysql,
#                           gated; healthz, create, lookup, hot, winners; and gated mixed: 3
#                           instances on MySQL + Redis) at its peak, then paced at half of it (or
#                           at SPRAY_PROBE_RATE per second), printed only: for profiling
#   bench/run.sh --probe limits all   the machine's limits alone, printed only
# Needs MariaDB on 127.0.0.1:3306 (root, no password), Redis on 127.0.0.1:6379 and
# mariadb-slap (the MariaDB client package).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mariadb-slap >/dev/null || { echo "mariadb-slap is missing (apt-get install mariadb-client)" >&2; exit 2; }
cargo build --release --locked --bin spray --example bench
exec target/release/examples/bench "$@"
