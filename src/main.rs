//! The `spray` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: measured side by side in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    spray::cli::run(spray::config_file::parse()).await
}
