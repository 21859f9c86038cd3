//! The `spray` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    spray::cli::run(spray::config::Cli::parse()).await
}
