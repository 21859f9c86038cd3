//! The `spray` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    spray::cli::run(spray::config_file::parse()).await
}
