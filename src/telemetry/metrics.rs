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

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::{Amount, SplitMode};

/// Every problem `code` an answer can carry (the contract's table, plus `NOT_FOUND`,
/// `METHOD_NOT_ALLOWED` and `INTERNAL`): `spray_rejections_total` starts with each at 0,
/// so that an alert on a code sees 0 and not "no data". A unit test below keeps the list
/// equal to `ApiError`'s codes.
pub const PROBLEM_CODES: &[&str] = &[
    "INVALID_REQUEST",
    "INVALID_USER",
    "INVALID_GATEWAY",
    "OWN_SPRAY",
    "NOT_OWNER",
    "SPRAY_NOT_FOUND",
    "ALREADY_RECEIVED",
    "SPRAY_EXHAUSTED",
    "RECEIVE_EXPIRED",
    "LOOKUP_EXPIRED",
    "PAYLOAD_TOO_LARGE",
    "UNSUPPORTED_MEDIA_TYPE",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "UNAVAILABLE",
    "INTERNAL",
    "IDEMPOTENCY_KEY_REUSED",
    "IDEMPOTENCY_IN_PROGRESS",
];

/// The Redis gate's events (`spray_gate_events_total{event}`).
pub const GATE_EVENTS: &[&str] = &["hit", "miss", "rebuild", "takeover", "fallback", "remembered"];

/// Every store call `store/guarded.rs` times (`spray_store_duration_seconds{operation}`);
/// a unit test below reads that file so that the two cannot drift apart.
pub const STORE_OPERATIONS: &[&str] = &[
    "migrate",
    "ping",
    "insert_spray",
    "claim_share",
    "find_spray",
    "count",
    "claim_snapshot",
    "claim_slot",
    "share_of",
    "slot_holder",
    "unsettled_sprays",
    "settle_spray",
    "purge_sprays",
    "begin_idempotent",
    "finish_idempotent",
    "release_idempotent",
    "purge_idempotency",
];

/// The outcomes of a store call or of a sweeper pass.
const OUTCOMES: [&str; 2] = ["ok", "error"];

/// The sweepers (`spray_sweeper_*{sweeper}`): settlement, the purge of old sprays, the
/// purge of old idempotency keys.
pub const SWEEPERS: &[&str] = &["settle", "purge", "idempotency"];

/// The API routes, by method, with every status the contract lets each answer: the
/// request series that exist before the first request. Other routes and statuses
/// (`unmatched`, the operations endpoints) appear when first answered.
const API_ANSWERS: &[(&str, &str, &[u16])] = &[
    (
        "POST",
        "/api/v1/spray",
        &[201, 400, 401, 409, 413, 415, 422, 500, 503],
    ),
    (
        "POST",
        "/api/v1/receive",
        &[200, 400, 401, 403, 404, 409, 410, 413, 415, 422, 500, 503],
    ),
    (
        "GET",
        "/api/v1/spray/{token}",
        &[200, 400, 401, 403, 404, 410, 500, 503],
    ),
];

/// Upper bounds of the latency buckets, in seconds: from 1 ms (a cached SQLite read) to
/// 10 s (the default request timeout).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The writes one group commit held (see `store/batch.rs` and `store/slot_batch.rs`), and
/// its buckets: powers of two up to the largest batch.
const BATCH_METRIC: &str = "spray_store_batch_writes";
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// How often histogram samples are folded into their buckets when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The series every API request and store call records into, held once the recorder is
/// installed. Found by its labels at each call, a series costs its labels' `String`s and a
/// lookup in the recorder's registry: five lookups and about seven small allocations a
/// request (its counter and duration, the in-flight gauge up and down, its store call),
/// about 3% of a receive's CPU on SQLite by `perf` (BENCHMARKS.md, 2026-12-07), and a
/// refusal's counter one lookup more. Any other series (an operations route, a status the
/// contract does not list) is still found by its labels.
struct Series {
    /// By [`API_ANSWERS`]' order, each route's statuses' request counter and duration.
    api: Vec<Vec<(Counter, Histogram)>>,
    in_flight: Gauge,
    /// By [`STORE_OPERATIONS`]' order, the duration of an `ok` and of an `error` call.
    store: Vec<[Histogram; 2]>,
    /// By [`PROBLEM_CODES`]' order: a hot spray's losers are each one `SPRAY_EXHAUSTED`.
    rejections: Vec<Counter>,
}

static SERIES: OnceLock<Series> = OnceLock::new();

impl Series {
    fn api(&self, method: &str, route: &str, status: u16) -> Option<&(Counter, Histogram)> {
        let at = API_ANSWERS
            .iter()
            .position(|(m, r, _)| *m == method && *r == route)?;
        let (_, _, statuses) = API_ANSWERS[at];
        let status = statuses.iter().position(|s| *s == status)?;
        self.api.get(at)?.get(status)
    }

    fn store(&self, operation: &str, ok: bool) -> Option<&Histogram> {
        let at = STORE_OPERATIONS.iter().position(|o| *o == operation)?;
        self.store
            .get(at)
            .map(|[ok_calls, failed]| if ok { ok_calls } else { failed })
    }

    fn rejections(&self, code: &str) -> Option<&Counter> {
        self.rejections
            .get(PROBLEM_CODES.iter().position(|c| *c == code)?)
    }
}

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
                    register_at_zero();
                    process_collector().describe();
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

/// Every metric in the Prometheus text format, the process metrics read just now.
pub fn render() -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    process_collector().collect();
    handle.render()
}

/// The process metrics (CPU seconds, resident and virtual memory, open and maximum file
/// descriptors, threads, start time), named as Prometheus' own process collector names
/// them (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), so that the
/// usual dashboards and alerts work unchanged. Read from `/proc` at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Registers every series whose label values are known in advance, at 0, so that the
/// first scrape already shows them: a rate or an alert over a series that does not exist
/// yet sees "no data" rather than 0, and cannot tell a quiet instance from a broken one.
fn register_at_zero() {
    let api = API_ANSWERS
        .iter()
        .map(|(method, route, statuses)| {
            statuses
                .iter()
                .map(|status| {
                    let labels = [
                        ("method", (*method).to_owned()),
                        ("route", (*route).to_owned()),
                        ("status", status.to_string()),
                    ];
                    let requests = counter!("http_requests_total", &labels);
                    requests.increment(0);
                    // Registered without a sample: rendered with every bucket at 0.
                    (requests, histogram!("http_request_duration_seconds", &labels))
                })
                .collect()
        })
        .collect();
    counter!("http_requests_shed_total").increment(0);
    counter!("http_request_timeouts_total").increment(0);
    for mode in [SplitMode::Even, SplitMode::Random] {
        counter!("spray_sprays_created_total", "mode" => mode_label(mode)).increment(0);
    }
    counter!("spray_claims_total").increment(0);
    let rejections = PROBLEM_CODES
        .iter()
        .map(|code| {
            let rejections = counter!("spray_rejections_total", "code" => *code);
            rejections.increment(0);
            rejections
        })
        .collect();
    counter!("spray_refunds_total").increment(0);
    counter!("spray_refunded_amount_total").increment(0);
    for event in GATE_EVENTS {
        counter!("spray_gate_events_total", "event" => *event).increment(0);
    }
    counter!("spray_claims_remembered_total").increment(0);
    gauge!("spray_gate_remembered_sprays").set(0.0);
    gauge!("spray_gate_remembered_receivers").set(0.0);
    gauge!("spray_store_calls_admitted").increment(0.0);
    counter!("spray_store_shed_total").increment(0);
    let store = STORE_OPERATIONS
        .iter()
        .map(|operation| {
            OUTCOMES.map(|outcome| {
                histogram!("spray_store_duration_seconds", "operation" => *operation, "outcome" => outcome)
            })
        })
        .collect();
    let _ = histogram!(BATCH_METRIC);
    for sweeper in SWEEPERS {
        for outcome in OUTCOMES {
            counter!("spray_sweeper_passes_total", "sweeper" => *sweeper, "outcome" => outcome).increment(0);
        }
        // 0 = never: the first pass runs as soon as the service starts.
        gauge!("spray_sweeper_last_success_timestamp_seconds", "sweeper" => *sweeper).set(0.0);
    }
    gauge!("spray_settlement_overdue_sprays").set(0.0);
    let in_flight = gauge!("http_requests_in_flight");
    in_flight.increment(0.0);
    let _ = SERIES.set(Series {
        api,
        in_flight,
        store,
        rejections,
    });
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
        "Redis gate events: hit, miss, rebuild (key reloaded from SQL), takeover (a hold past the claim lease handed to another claim), fallback (SQL-only claim), remembered (a claim on a spray taken for good, answered from the instance's memory without Redis)."
    );
    describe_counter!(
        "spray_claims_remembered_total",
        "Claims on a spray taken for good, answered from the instance's memory of it: no store call, no Redis call."
    );
    describe_gauge!(
        "spray_gate_remembered_sprays",
        "Sprays taken for good this instance remembers, to answer their late claims without the store or Redis, with or without the gate (at most 10,000; entries being read or too large count too)."
    );
    describe_gauge!(
        "spray_gate_remembered_receivers",
        "Receivers of the sprays taken for good this instance remembers (at most 1,000,000, 8 bytes each)."
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
    describe_counter!(
        "spray_sweeper_passes_total",
        "Passes of each sweeper (settle, purge, idempotency), by outcome (ok or error)."
    );
    describe_gauge!(
        "spray_sweeper_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of each sweeper's last pass that succeeded on this instance; 0 before the first."
    );
    describe_gauge!(
        "spray_settlement_overdue_sprays",
        "Sprays whose receive window closed more than two sweep intervals and a minute ago and that are still not settled, counted at the start of each sweep (at most one batch, 200)."
    );
    describe_gauge!(
        "spray_dependency_up",
        "1 when the dependency (sql; redis when configured) answered a ping at this scrape, else 0."
    );
    describe_gauge!(
        "spray_build_info",
        "Always 1; the version label says which build runs."
    );
}

/// One answered HTTP request.
pub fn record_request(method: &'static str, route: &str, status: u16, elapsed: Duration) {
    if let Some((requests, duration)) = SERIES.get().and_then(|series| series.api(method, route, status)) {
        requests.increment(1);
        duration.record(elapsed);
        return;
    }
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
        in_flight(|gauge| gauge.increment(1.0));
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight(|gauge| gauge.decrement(1.0));
    }
}

fn in_flight(change: impl FnOnce(&Gauge)) {
    match SERIES.get() {
        Some(series) => change(&series.in_flight),
        None => change(&gauge!("http_requests_in_flight")),
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
    counter!("spray_sprays_created_total", "mode" => mode_label(mode)).increment(1);
}

fn mode_label(mode: SplitMode) -> &'static str {
    match mode {
        SplitMode::Even => "even",
        SplitMode::Random => "random",
    }
}

/// A share was received.
pub fn record_claim() {
    counter!("spray_claims_total").increment(1);
}

/// A request was answered with the problem `code` (a stable code of the contract).
pub fn record_rejection(code: &'static str) {
    match SERIES.get().and_then(|series| series.rejections(code)) {
        Some(rejections) => rejections.increment(1),
        None => counter!("spray_rejections_total", "code" => code).increment(1),
    }
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

/// A claim on a spray taken for good, answered from the instance's memory of it.
pub fn record_gate_remembered() {
    counter!("spray_gate_events_total", "event" => "remembered").increment(1);
}

/// A claim on a spray taken for good, answered from the instance's memory of it, on
/// either claim path (the gate's also counts it as a gate event).
pub fn record_claim_remembered() {
    counter!("spray_claims_remembered_total").increment(1);
}

/// What the instance's memory of sprays taken for good holds now (`claim/exhausted.rs`):
/// its sprays (those being read or too large included) and their receivers.
pub fn record_remembered(sprays: usize, receivers: usize) {
    gauge!("spray_gate_remembered_sprays").set(u32::try_from(sprays).unwrap_or(u32::MAX));
    gauge!("spray_gate_remembered_receivers").set(u32::try_from(receivers).unwrap_or(u32::MAX));
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

/// One pass of a sweeper ended; `now` is the service clock's time of its end.
pub fn record_sweep(sweeper: &'static str, ok: bool, now: chrono::DateTime<chrono::Utc>) {
    let outcome = if ok { "ok" } else { "error" };
    counter!("spray_sweeper_passes_total", "sweeper" => sweeper, "outcome" => outcome).increment(1);
    if ok {
        // u32 seconds last until 2106; a time before 1970 (a broken clock) shows as 0.
        let whole = u32::try_from(now.timestamp()).unwrap_or(0);
        let seconds = f64::from(whole) + f64::from(now.timestamp_subsec_millis()) / 1000.0;
        gauge!("spray_sweeper_last_success_timestamp_seconds", "sweeper" => sweeper).set(seconds);
    }
}

/// How many sprays the settlement is late with (see `jobs::sweep`).
pub fn record_settlement_overdue(sprays: usize) {
    gauge!("spray_settlement_overdue_sprays").set(u32::try_from(sprays).unwrap_or(u32::MAX));
}

/// What the SQL store and the Redis gate answered at this scrape. Redis has a series only
/// when it is configured, so that an instance without Redis never looks like one whose
/// Redis is down.
pub fn record_dependencies(sql_up: bool, redis: crate::claim::RedisStatus) {
    use crate::claim::RedisStatus;
    let up = |up: bool| if up { 1.0 } else { 0.0 };
    gauge!("spray_dependency_up", "dependency" => "sql").set(up(sql_up));
    match redis {
        RedisStatus::Disabled => {}
        RedisStatus::Up => gauge!("spray_dependency_up", "dependency" => "redis").set(1.0),
        RedisStatus::Down => gauge!("spray_dependency_up", "dependency" => "redis").set(0.0),
    }
}

/// Runs one store call and records how long it took under `operation`.
pub async fn time_store<T, E>(
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = Instant::now();
    let result = call.await;
    let elapsed = start.elapsed();
    match SERIES
        .get()
        .and_then(|series| series.store(operation, result.is_ok()))
    {
        Some(duration) => duration.record(elapsed),
        None => {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            histogram!("spray_store_duration_seconds", "operation" => operation, "outcome" => outcome)
                .record(elapsed);
        }
    }
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
    histogram!(BATCH_METRIC).record(f64::from(u32::try_from(writes).unwrap_or(u32::MAX)));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::http::error::ApiError;

    /// The value of the first rendered sample of `name` whose labels include every one of
    /// `labels` (0 when there is none).
    fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
        text.lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
            .find(|rest| labels.iter().all(|label| rest.contains(label)))
            .and_then(|rest| rest.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The held series are the ones the labels name: a store call's outcome, a route's
    /// status, a refusal's code each land in their own series (the ops tests read the
    /// common ones; these are the rarer ones, which no other test records).
    #[tokio::test]
    async fn the_held_series_are_the_ones_their_labels_name() {
        assert!(install().is_some());
        let failed = ["operation=\"migrate\"", "outcome=\"error\""];
        let unavailable = [
            "method=\"GET\"",
            "route=\"/api/v1/spray/{token}\"",
            "status=\"503\"",
        ];
        let before = render();
        let _ = time_store("migrate", async { Err::<(), ()>(()) }).await;
        record_request("GET", "/api/v1/spray/{token}", 503, Duration::from_millis(1));
        record_rejection("IDEMPOTENCY_IN_PROGRESS");
        let after = render();
        let count = "spray_store_duration_seconds_count";
        assert_eq!(
            sample(&after, count, &failed),
            sample(&before, count, &failed) + 1.0
        );
        let requests = "http_requests_total";
        assert_eq!(
            sample(&after, requests, &unavailable),
            sample(&before, requests, &unavailable) + 1.0
        );
        let code = ["code=\"IDEMPOTENCY_IN_PROGRESS\""];
        let rejections = "spray_rejections_total";
        assert_eq!(
            sample(&after, rejections, &code),
            sample(&before, rejections, &code) + 1.0
        );
    }

    /// One value of every `ApiError` variant. The match makes this fail to compile when a
    /// variant is added, so that its code cannot be left out of `PROBLEM_CODES`.
    fn every_api_error() -> Vec<ApiError> {
        let all = vec![
            ApiError::InvalidRequest(String::new()),
            ApiError::InvalidUser,
            ApiError::InvalidGateway,
            ApiError::OwnSpray,
            ApiError::NotOwner,
            ApiError::SprayNotFound,
            ApiError::AlreadyReceived,
            ApiError::SprayExhausted { shares: 1 },
            ApiError::ReceiveExpired,
            ApiError::LookupExpired,
            ApiError::PayloadTooLarge,
            ApiError::UnsupportedMediaType,
            ApiError::RouteNotFound,
            ApiError::MethodNotAllowed,
            ApiError::Unavailable("down"),
            ApiError::Internal,
            ApiError::IdempotencyKeyReused,
            ApiError::IdempotencyInProgress,
        ];
        for error in &all {
            match error {
                ApiError::InvalidRequest(_)
                | ApiError::InvalidUser
                | ApiError::InvalidGateway
                | ApiError::OwnSpray
                | ApiError::NotOwner
                | ApiError::SprayNotFound
                | ApiError::AlreadyReceived
                | ApiError::SprayExhausted { .. }
                | ApiError::ReceiveExpired
                | ApiError::LookupExpired
                | ApiError::PayloadTooLarge
                | ApiError::UnsupportedMediaType
                | ApiError::RouteNotFound
                | ApiError::MethodNotAllowed
                | ApiError::Unavailable(_)
                | ApiError::Internal
                | ApiError::IdempotencyKeyReused
                | ApiError::IdempotencyInProgress => {}
            }
        }
        all
    }

    #[test]
    fn the_rejection_counter_starts_with_every_problem_code_and_no_other() {
        let answered: BTreeSet<&str> = every_api_error().iter().map(|e| e.parts().1).collect();
        let listed: BTreeSet<&str> = PROBLEM_CODES.iter().copied().collect();
        assert_eq!(listed, answered);
        assert_eq!(listed.len(), PROBLEM_CODES.len(), "a code is listed twice");
    }

    #[test]
    fn the_store_histogram_starts_with_every_operation_the_guarded_store_times() {
        let source = include_str!("../store/guarded.rs");
        // Each call is `time_store(` then the operation's name in quotes, on the same
        // line or the next (rustfmt breaks long calls).
        let timed: BTreeSet<&str> = source
            .split("time_store(")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
            .collect();
        let listed: BTreeSet<&str> = STORE_OPERATIONS.iter().copied().collect();
        assert_eq!(listed, timed);
    }
}
