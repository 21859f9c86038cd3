//! The contract suite on the MySQL/MariaDB store, without Redis.
//! The backend is chosen by this file's name; see `tests/common/mod.rs`.

mod common;
mod contract;
// MySQL only: see the file's doc.
#[path = "contract/mysql_cancellation.rs"]
mod mysql_cancellation;
// MySQL only: network faults between the service and MariaDB.
#[path = "contract/mysql_commit_outcome.rs"]
mod mysql_commit_outcome;
