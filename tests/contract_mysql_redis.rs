//! The contract suite on MySQL/MariaDB with the Redis gate on one Redis server.
//! The backend is chosen by this file's name; see `tests/common/mod.rs`.

mod common;

#[path = "contract/api_input.rs"]
mod api_input;
#[path = "contract/api_lookup.rs"]
mod api_lookup;
#[path = "contract/api_receive.rs"]
mod api_receive;
#[path = "contract/api_spray.rs"]
mod api_spray;
#[path = "contract/audit_life.rs"]
mod audit_life;
#[path = "contract/concurrency.rs"]
mod concurrency;
#[path = "gate/gate.rs"]
mod gate;
#[path = "contract/idempotency.rs"]
mod idempotency;
#[path = "gate/leases.rs"]
mod leases;
#[path = "contract/life_races.rs"]
mod life_races;
#[path = "contract/mysql_cancellation.rs"]
mod mysql_cancellation;
// MySQL only: network faults between the service and MariaDB.
#[path = "contract/mysql_commit_outcome.rs"]
mod mysql_commit_outcome;
#[path = "gate/outage.rs"]
mod outage;
#[path = "contract/retention.rs"]
mod retention;
#[path = "contract/settlement.rs"]
mod settlement;
