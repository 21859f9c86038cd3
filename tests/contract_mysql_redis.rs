//! The contract suite on MySQL/MariaDB with the Redis gate on one Redis server.
//! The backend is chosen by this file's name; see `tests/common/mod.rs`.

mod common;
mod contract;
mod gate;
// MySQL only: see the file's doc.
#[path = "contract/mysql_cancellation.rs"]
mod mysql_cancellation;
// MySQL only: network faults between the service and MariaDB.
#[path = "contract/mysql_commit_outcome.rs"]
mod mysql_commit_outcome;
// Stops and restarts a Redis server of its own.
#[path = "gate/outage.rs"]
mod outage;
