//! The contract suite on MySQL/MariaDB with the Redis gate on a Redis Cluster of three masters started by the tests.
//! The backend is chosen by this file's name; see `tests/common/mod.rs`.

mod common;
mod contract;
mod gate;
// MySQL only: see the file's doc.
#[path = "contract/mysql_cancellation.rs"]
mod mysql_cancellation;
