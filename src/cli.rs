//! The `spray` commands: serve (the default), migrate, audit, config.

use std::process::ExitCode;

use crate::audit;
use crate::config::{Cli, Command, Settings};
use crate::startup::{Application, open_store, shutdown_signal};
use crate::telemetry::{self, Traces};

pub async fn run(cli: Cli) -> ExitCode {
    let settings = cli.settings;
    let command = cli.command.unwrap_or(Command::Serve);
    // Checked alike for every command, before any store is opened or created.
    if let Err(problem) = settings.validate() {
        eprintln!("invalid settings: {problem}");
        return ExitCode::from(2);
    }
    // Only the server exports spans; the other commands serve no request.
    let traces = match (command, settings.otlp_traces_url()) {
        (Command::Serve, Ok(Some(url))) => match Traces::export_to(&url) {
            Ok(traces) => traces,
            Err(problem) => {
                eprintln!("invalid settings: {problem}");
                return ExitCode::from(2);
            }
        },
        _ => Traces::off(),
    };
    telemetry::init(settings.log_format, &traces);
    match command {
        Command::Serve => {
            let served = serve(&settings).await;
            // After the last request has been answered: its span is in the last batch.
            traces.shutdown().await;
            served
        }
        Command::Config => {
            println!("{settings:#?}");
            ExitCode::SUCCESS
        }
        Command::Migrate => match open_store(&settings).await {
            Ok(store) => {
                store.close().await;
                println!("migrations applied");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("migration failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Audit => {
            let store = match open_store(&settings).await {
                Ok(store) => store,
                Err(e) => {
                    eprintln!("cannot open the store: {e}");
                    return ExitCode::from(2);
                }
            };
            let report = audit::run(store.as_ref()).await;
            store.close().await;
            match report {
                Ok(report) => {
                    print!("{}", report.summary());
                    if report.is_clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("audit could not run: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

async fn serve(settings: &Settings) -> ExitCode {
    tracing::info!(?settings, "starting");
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // Histogram samples are folded into buckets now and then, scraped or not.
    tokio::spawn(telemetry::metrics::upkeep_forever());
    match app.local_addr() {
        Ok(address) => tracing::info!(%address, "listening"),
        Err(e) => tracing::warn!(error = %e, "listening on an unknown address"),
    }
    match app.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
