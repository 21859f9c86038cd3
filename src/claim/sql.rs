//! The claim without Redis: SQL finds a free share and records it in one transaction.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ClaimPath, RedisStatus};
use crate::store::{Claim, ClaimOutcome, NewSpray, PendingKey, Store, StoreError};

pub struct SqlClaim {
    store: Arc<dyn Store>,
}

impl SqlClaim {
    pub fn new(store: Arc<dyn Store>) -> SqlClaim {
        SqlClaim { store }
    }
}

#[async_trait]
impl ClaimPath for SqlClaim {
    async fn claim(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        self.store.claim_share(claim, idempotency).await
    }

    async fn sprayed(&self, _spray_id: i64, _spray: &NewSpray) {}

    async fn redis_status(&self) -> RedisStatus {
        RedisStatus::Disabled
    }
}
