//! The contract suite every backend runs: one list, included by each
//! `tests/contract_*.rs` binary as `mod contract;`. A binary adds, one line each, what
//! only its backend can show: `mysql_cancellation.rs` and `mysql_commit_outcome.rs` (on
//! MySQL), `tests/gate/` (with Redis), `tests/gate/outage.rs` (with a Redis of the test's
//! own).

mod api_input;
mod api_lookup;
mod api_receive;
mod api_spray;
mod audit_life;
mod concurrency;
mod idempotency;
mod life_races;
mod retention;
mod settlement;
