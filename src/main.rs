//! The `spray` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: 10-16% less of the server's CPU per answer
/// (measured side by side in BENCHMARKS.md). With transparent huge pages off (below), its
/// RSS stays flat through a long run, a few MiB above glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_memory_in_small_pages();
    // What `#[tokio::main]` builds, after the call above: the runtime's threads and their
    // stacks are made with huge pages already off.
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(spray::cli::run(spray::config_file::parse()))
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on the
/// memory it reserves, and the kernel then backs a touched region with a whole 2 MiB
/// page: each instance held about 10 MiB more than with 4 KiB pages, and its RSS rose in
/// steps of such pages through a long run, with no more data held and no CPU saved
/// (measured side by side in BENCHMARKS.md). The prctl applies to the whole process,
/// whatever the host's THP setting (`always` or `madvise`). If the kernel refuses it (one
/// older than 3.15), the process runs as before: nothing depends on it but the RSS.
fn keep_memory_in_small_pages() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}
