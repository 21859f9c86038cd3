//! Observability: logs and spans ([`init`]), traces ([`trace`]) and Prometheus metrics
//! ([`metrics`]).
//!
//! Logs: human-readable lines by default, JSON with `--log-format json`, filtered by
//! `RUST_LOG` (default `info`). Each request runs inside one span (see
//! `http::middleware`), so every line logged while serving it carries its method, route,
//! request id, trace id, user and token. With `--otlp-endpoint`, the same spans are also
//! exported to an OpenTelemetry collector.

pub mod metrics;
pub mod trace;

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

pub use self::metrics::{
    record_claim, record_claim_remembered, record_gate_fallback, record_gate_hit, record_gate_miss,
    record_gate_rebuild, record_gate_remembered, record_gate_takeover, record_pool_use, record_refund,
    record_rejection, record_remembered, record_spray_created, time_store,
};
pub use self::trace::Traces;

/// The filter when `RUST_LOG` is not set: our own lines at info, sqlx's only when they
/// are warnings (it logs every statement at info).
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber: logs to stderr, and the spans to `traces` when they
/// are exported. A second call (tests) is a no-op.
pub fn init(format: LogFormat, traces: &Traces) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a person at a terminal, not in a file or a log collector.
    let ansi = std::io::stderr().is_terminal();
    let _ = subscriber(format, filter, std::io::stderr, ansi, traces).try_init();
}

/// The subscriber [`init`] installs, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
    traces: &Traces,
) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(traces.layer())
        .with(log_layer(format, writer, ansi))
}

fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => layer.boxed(),
        // One object per line, with the request span's fields (request id, trace id, route,
        // user, token) beside the event's own, so a log pipeline can filter on them.
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}
