//! The Redis gate's tests, on every backend with Redis (`contract_mysql_redis` and
//! `contract_mysql_redis_cluster`). `outage.rs` stops a Redis of its own, so only the
//! single-Redis binary includes it.

mod claims;
mod leases;
