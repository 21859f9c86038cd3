//! Observability: logs and spans ([`init`]) and Prometheus metrics ([`metrics`]).
//!
//! Logs: human-readable lines by default, JSON with `--log-format json`, filtered by
//! `RUST_LOG` (default `info`). Each request runs inside one span (see
//! `http::middleware`), so every line logged while serving it carries its method, route,
//! request id, user and token.

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub use self::metrics::{
    record_claim, record_gate_fallback, record_gate_hit, record_gate_miss, record_gate_rebuild,
    record_gate_takeover, record_pool_use, record_refund, record_rejection, record_spray_created, time_store,
};

/// The filter when `RUST_LOG` is not set: our own lines at info, sqlx's only when they
/// are warnings (it logs every statement at info).
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in a file or a log collector.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // One object per line, with the request span's fields (request id, route, user,
        // token) beside the event's own, so a log pipeline can filter on them.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
