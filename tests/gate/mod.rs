//! The Redis gate's tests, on every backend with Redis (`contract_mysql_redis` and
//! `contract_mysql_redis_cluster`). `outage.rs` stops a Redis of its own, so only the
//! single-Redis binary includes it.

mod calls;
mod claims;
mod leases;

use chrono::TimeDelta;
use spray::domain::UserId;
use spray::gate::{GateKeys, GateVerdict, RedisGate};

use crate::common::TestApp;

/// A gate of its own on the app's Redis and key prefix, to drive the scripts directly.
fn gate(app: &TestApp) -> RedisGate {
    RedisGate::new(
        app.settings.redis_url.as_deref().unwrap(),
        &app.settings.redis_key_prefix,
    )
    .unwrap()
}

fn lease(app: &TestApp) -> TimeDelta {
    app.settings.claim_lease().unwrap()
}

fn user(id: i64) -> UserId {
    UserId::from_stored(id).unwrap()
}

/// The gate hands `id` a slot, and nothing records it: the claim's instance was killed
/// right after the gate's answer. Returns the spray id and the slot.
async fn dead_claim(app: &TestApp, keys: &GateKeys, id: i64) -> (i64, i64) {
    match gate(app)
        .claim(keys, user(id), app.now(), lease(app))
        .await
        .unwrap()
    {
        GateVerdict::Slot { spray_id, slot, .. } => (spray_id, slot),
        other => panic!("the gate gave no slot: {other:?}"),
    }
}
