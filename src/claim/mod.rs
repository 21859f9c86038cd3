//! The claim path: how a receive gets a share (`docs/design.md` section 2).
//!
//! Two shapes, chosen once at start-up ([`for_settings`]): SQL alone ([`SqlClaim`]), or
//! the Redis gate in front of SQL ([`GatedClaim`]). The service calls [`ClaimPath`] and
//! knows nothing of Redis.
//!
//! A claim is never cancelled halfway: the service runs it in a task of its own, so a
//! client that goes away, or a request time-out, cannot stop it between the gate
//! handing out a slot and SQL recording it (or the gate getting the slot back).

mod confirmations;
mod exhausted;
mod gated;
mod gathered;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::TimeDelta;

pub use gated::GatedClaim;
pub use sql::SqlClaim;

use crate::store::{Claim, ClaimOutcome, NewSpray, PendingKey, StoreError};

/// Whether Redis answers, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisStatus {
    /// No Redis is configured.
    Disabled,
    Up,
    Down,
}

impl RedisStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisStatus::Disabled => "disabled",
            RedisStatus::Up => "up",
            RedisStatus::Down => "down",
        }
    }
}

/// One way of giving a member a share.
#[async_trait]
pub trait ClaimPath: Send + Sync + 'static {
    /// Applies the receive rules and, if they allow it, records one share for the
    /// claimant (and, with `idempotency`, the kept answer) in one SQL transaction.
    async fn claim(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError>;

    /// A new spray was written under `spray_id`: get ready for its claims. Best effort.
    async fn sprayed(&self, spray_id: i64, spray: &NewSpray);

    /// Whether the accelerator in front of SQL answers, if there is one.
    async fn redis_status(&self) -> RedisStatus;
}

/// The claim path for these settings: the gate when a Redis URL is given.
pub fn for_settings(
    store: Arc<dyn crate::store::Store>,
    redis_url: Option<&str>,
    redis_ca_pem: Option<Vec<u8>>,
    redis_key_prefix: &str,
    lease: TimeDelta,
) -> Result<Arc<dyn ClaimPath>, crate::gate::GateUnavailable> {
    Ok(match redis_url {
        None => Arc::new(SqlClaim::new(store)),
        Some(url) => {
            // Does not connect yet: claims take the SQL path until Redis answers.
            let gate = crate::gate::RedisGate::with_ca(url, redis_key_prefix, redis_ca_pem)?;
            Arc::new(GatedClaim::new(store, gate, lease))
        }
    })
}
