//! The `spray` commands: serve (the default), migrate, audit, config, healthcheck. Their
//! exit statuses are listed once, in `config::EXIT_STATUS` (shown by `--help`).

use std::process::ExitCode;

use crate::audit;
use crate::config::{AuditFormat, Cli, Command, Settings};
use crate::healthcheck::{self, Target};
use crate::startup::{Application, open_store, shutdown_signal};
use crate::telemetry::{self, Traces};

pub async fn run(cli: Cli) -> ExitCode {
    let settings = cli.settings;
    let command = cli.command.unwrap_or(Command::Serve);
    // Checked alike for every command, before any store is opened or created.
    if let Err(problem) = settings.validate() {
        match (&settings.config, first_flag(&problem)) {
            // The setting may come from the file, where it is written as a key.
            (Some(file), Some(flag)) => eprintln!(
                "invalid settings: {problem} (in {}: `{}`)",
                file.display(),
                flag.trim_start_matches("--").replace('-', "_")
            ),
            _ => eprintln!("invalid settings: {problem}"),
        }
        return ExitCode::from(2);
    }
    // Only the server exports spans; the other commands serve no request.
    let traces = match (&command, settings.otlp_traces_url()) {
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
            print!("{}", settings.to_toml());
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
        Command::Audit { format, json } => {
            let json = json || format == AuditFormat::Json;
            audit_command(&settings, json).await
        }
        Command::Healthcheck { url, timeout } => {
            let target = match url.as_deref().map(Target::from_url) {
                None => Target::from_listen(&settings.listen),
                Some(Ok(target)) => target,
                Some(Err(problem)) => {
                    eprintln!("{problem}");
                    return ExitCode::from(2);
                }
            };
            match healthcheck::probe(&target, timeout).await {
                Ok(200) => ExitCode::SUCCESS,
                Ok(status) => {
                    eprintln!(
                        "not ready: GET {}{} answered {status}",
                        target.authority, target.path
                    );
                    ExitCode::FAILURE
                }
                Err(problem) => {
                    eprintln!("not ready: {problem}");
                    ExitCode::FAILURE
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

/// `spray audit`: 0 clean, 1 a violation, 2 could not audit. With `json`, stdout carries
/// one JSON object in every case (`{"clean": false, "error": ...}` when it could not
/// audit), so a monitor reads one format.
async fn audit_command(settings: &Settings, json: bool) -> ExitCode {
    let could_not = |problem: String| {
        eprintln!("spray audit: {problem}");
        if json {
            println!("{}", serde_json::json!({"clean": false, "error": problem}));
        }
        ExitCode::from(2)
    };
    let store = match audit::open_existing(&settings.database_url, settings.database_max_connections).await {
        Ok(store) => store,
        Err(e) => return could_not(e.to_string()),
    };
    let report = audit::run(store.as_ref()).await;
    store.close().await;
    let report = match report {
        Ok(report) => report,
        Err(e) => return could_not(format!("the audit could not run: {e}")),
    };
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The first `--flag` a message names.
fn first_flag(message: &str) -> Option<&str> {
    let start = message.find("--")?;
    let rest = &message[start..];
    let end = rest[2..]
        .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
        .map_or(rest.len(), |i| i + 2);
    Some(&rest[..end]).filter(|flag| flag.len() > 2)
}
