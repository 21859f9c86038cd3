//! The operations surface: the config file, the operations endpoints, protection from
//! slow and flooding clients, request ids and traces, and the metrics that the files under
//! `deploy/` read, in one test binary (on SQLite: see `tests/common/mod.rs`).
//!
//! Two operations suites keep binaries of their own, because they read state that is one
//! per process: `ops_metrics.rs` (the metrics recorder: other tests' requests would move
//! its counters) and `ops_logging.rs` (the tracing subscriber and its call-site cache).

#[path = "../common/mod.rs"]
mod common;

mod config;
mod deploy_metrics;
mod endpoints;
mod protection;
mod request_ids;
mod traces;
