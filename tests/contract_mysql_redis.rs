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
#[path = "contract/concurrency.rs"]
mod concurrency;
#[path = "gate/gate.rs"]
mod gate;
#[path = "gate/outage.rs"]
mod outage;
