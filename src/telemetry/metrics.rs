//! Prometheus metrics: what `GET /metrics` shows.
//!
//! One recorder per process, installed on first use and kept in a `OnceLock`: tests build
//! many routers in one process, and a second `install_recorder` would fail.
//!
//! Every label has a small, fixed set of values: the matched route (never the raw path),
//! a known method, a status, a problem code, a store operation. A token, a user id or a
//! room never becomes a label: each would be a new time series.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ::metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::{Amount, SplitMode};

/// Upper bounds of the latency buckets, in seconds: from 1 ms (a cached SQLite read) to
/// 10 s (the default request timeout).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The writes one group commit held (see `store/batch.rs`), and its buckets: powers of two
/// up to the largest batch.
const BATCH_METRIC: &str = "spray_store_batch_writes";
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// How often histogram samples are folded into their buckets when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's recorder, installed on the first call. `None` when another recorder
/// was installed first (then the metric functions below record nothing, harmlessly).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_METRIC.into()), BATCH_BUCKETS))
                .and_then(PrometheusBuilder::install_recorder);
            match installed {
                Ok(handle) => {
                    describe();
                    gauge!("spray_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics disabled: cannot install the Prometheus recorder");
                    None
                }
            }
        })
        .as_ref()
}

/// Every metric in the Prometheus text format.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// Folds histogram samples into buckets now and then, so that memory stays bounded
/// when nobody scrapes. Runs until the runtime stops.
pub async fn upkeep_forever() {
    let Some(handle) = install() else { return };
    let mut every = tokio::time::interval(UPKEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, matched route and status."
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method, matched route and status."
    );
    describe_gauge!("http_requests_in_flight", "HTTP requests being served now.");
    describe_counter!(
        "http_requests_shed_total",
        "API requests refused with 503 because --max-concurrent-requests were already in flight."
    );
    describe_counter!(
        "http_request_timeouts_total",
        "Requests answered with 503 because they ran past --request-timeout."
    );
    describe_counter!("spray_sprays_created_total", "Sprays created, by split mode.");
    describe_counter!("spray_claims_total", "Shares received.");
    describe_counter!(
        "spray_rejections_total",
        "Requests answered with a problem document, by problem code."
    );
    describe_counter!(
        "spray_refunds_total",
        "Sprays settled with a refund to the sprayer."
    );
    describe_counter!(
        "spray_refunded_amount_total",
        "Money refunded to sprayers, in the smallest currency unit."
    );
    describe_counter!(
        "spray_gate_events_total",
        "Redis gate events: hit, miss, rebuild (key reloaded from SQL), takeover (a hold past the claim lease handed to another claim), fallback (SQL-only claim)."
    );
    describe_gauge!(
        "spray_store_calls_admitted",
        "Request-path store calls running or waiting now; at --store-concurrency, more are refused."
    );
    describe_counter!(
        "spray_store_shed_total",
        "Store calls refused at once (503) because --store-concurrency calls were already running."
    );
    describe_histogram!(
        "spray_store_duration_seconds",
        Unit::Seconds,
        "Time spent in one store call, by operation and outcome (ok or error)."
    );
    describe_histogram!(
        BATCH_METRIC,
        Unit::Count,
        "Writes held by one group commit (one transaction, one durable commit)."
    );
    describe_gauge!(
        "spray_store_pool_connections",
        "Database pool connections, by backend and state (idle or in_use)."
    );
    describe_gauge!(
        "spray_build_info",
        "Always 1; the version label says which build runs."
    );
}

/// One answered HTTP request.
pub fn record_request(method: &'static str, route: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    counter!("http_requests_total", &labels).increment(1);
    histogram!("http_request_duration_seconds", &labels).record(elapsed);
}

/// Counts a request in flight until the guard is dropped (also when the request is
/// cancelled because the client went away).
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        gauge!("http_requests_in_flight").increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!("http_requests_in_flight").decrement(1.0);
    }
}

/// An API request refused because the concurrency bound was reached.
pub fn record_shed() {
    counter!("http_requests_shed_total").increment(1);
}

/// A request that ran past the request timeout.
pub fn record_timeout() {
    counter!("http_request_timeouts_total").increment(1);
}

/// A spray was created.
pub fn record_spray_created(mode: SplitMode) {
    let mode = match mode {
        SplitMode::Even => "even",
        SplitMode::Random => "random",
    };
    counter!("spray_sprays_created_total", "mode" => mode).increment(1);
}

/// A share was received.
pub fn record_claim() {
    counter!("spray_claims_total").increment(1);
}

/// A request was answered with the problem `code` (a stable code of the contract).
pub fn record_rejection(code: &'static str) {
    counter!("spray_rejections_total", "code" => code).increment(1);
}

/// A spray's receive window closed with shares left, and `amount` went back to the
/// sprayer. For the settlement sweeper to call once per settled spray.
pub fn record_refund(amount: Amount) {
    counter!("spray_refunds_total").increment(1);
    counter!("spray_refunded_amount_total").increment(amount.units());
}

/// The Redis gate answered a claim from its key.
pub fn record_gate_hit() {
    counter!("spray_gate_events_total", "event" => "hit").increment(1);
}

/// The Redis gate had no key for the spray.
pub fn record_gate_miss() {
    counter!("spray_gate_events_total", "event" => "miss").increment(1);
}

/// The Redis gate's key was rebuilt from SQL.
pub fn record_gate_rebuild() {
    counter!("spray_gate_events_total", "event" => "rebuild").increment(1);
}

/// A request-path store call admitted and not yet finished (`spray_store_calls_admitted`).
pub struct StoreCallAdmitted(());

impl StoreCallAdmitted {
    pub fn start() -> StoreCallAdmitted {
        gauge!("spray_store_calls_admitted").increment(1.0);
        StoreCallAdmitted(())
    }
}

impl Drop for StoreCallAdmitted {
    fn drop(&mut self) {
        gauge!("spray_store_calls_admitted").decrement(1.0);
    }
}

/// A store call was refused at once: --store-concurrency calls were already running.
pub fn record_store_shed() {
    counter!("spray_store_shed_total").increment(1);
}

/// The gate handed out a slot whose earlier hold had outlived the claim lease.
pub fn record_gate_takeover() {
    counter!("spray_gate_events_total", "event" => "takeover").increment(1);
}

/// A claim fell back to the SQL-only path (gate down, slot taken, SQL refused).
pub fn record_gate_fallback() {
    counter!("spray_gate_events_total", "event" => "fallback").increment(1);
}

/// The database pool's size and idle connections, for a backend that can tell.
pub fn record_pool_use(backend: &'static str, size: u32, idle: u32) {
    gauge!("spray_store_pool_connections", "backend" => backend, "state" => "idle").set(idle);
    gauge!("spray_store_pool_connections", "backend" => backend, "state" => "in_use")
        .set(size.saturating_sub(idle));
}

/// Runs one store call and records how long it took under `operation`.
pub async fn time_store<T, E>(
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    histogram!("spray_store_duration_seconds", "operation" => operation, "outcome" => outcome)
        .record(start.elapsed());
    result
}

/// The method as a label: the standard ones by name, anything else as `OTHER`, so that
/// a client cannot invent new series with made-up methods.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// One group commit of `writes` writes (kept or refused) ended.
pub fn record_batch(writes: usize) {
    histogram!(BATCH_METRIC).record(writes as f64);
}
