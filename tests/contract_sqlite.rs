//! The contract suite on the embedded SQLite store.
//! The backend is chosen by this file's name; see `tests/common/mod.rs`.

mod common;
mod contract;
