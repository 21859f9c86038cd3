//! The `spray` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: 10-16% less of the server's CPU per answer, for
/// about 10 MiB more RSS per instance that it keeps for reuse (measured side by side in
/// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    spray::cli::run(spray::config_file::parse()).await
}
