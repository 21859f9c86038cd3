//! spray: split an amount into shares that members of a chat room claim.
//!
//! A request flows one way: [`http`] (identity, JSON, problem+json) -> [`service`] (the
//! rules, given a [`clock`] and a token source) -> [`store`] (SQL, the source of truth).
//! [`domain`] holds the types and rules, with no I/O.

// Only what the binary, the tests or the examples use is `pub`; anything else is
// `pub(crate)` or narrower, so that the compiler reports what nothing uses.
#![warn(unreachable_pub)]

pub mod audit;
pub mod claim;
pub mod cli;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod domain;
pub mod gate;
pub mod healthcheck;
pub mod http;
pub mod jobs;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
