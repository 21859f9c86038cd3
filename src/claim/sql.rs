//! The claim without Redis: SQL finds a free share and records it in one transaction.
//!
//! Before that, a spray this instance has seen taken for good answers its newcomers and
//! its sprayer from memory (`exhausted.rs`), as on the gate's path: without Redis there
//! are no holds, so a spray SQL calls exhausted has every share recorded, and none can
//! be freed again before its window closes. The crowd that arrives after the last share
//! costs no write (on SQLite, no turn of the one writer) and no read.

use std::sync::Arc;

use async_trait::async_trait;

use super::exhausted::ExhaustedSprays;
use super::{ClaimPath, RedisStatus};
use crate::domain::ReceiveRefusal;
use crate::gate::ExhaustedSpray;
use crate::store::{Claim, ClaimOutcome, NewSpray, PendingKey, Store, StoreError};
use crate::telemetry;

pub struct SqlClaim {
    store: Arc<dyn Store>,
    /// The sprays seen taken for good, answered without the store until their window
    /// closes.
    exhausted: ExhaustedSprays,
}

impl SqlClaim {
    pub fn new(store: Arc<dyn Store>) -> SqlClaim {
        SqlClaim {
            store,
            exhausted: ExhaustedSprays::default(),
        }
    }

    /// SQL refused a claim as exhausted: read the spray once (from the read pool) and
    /// remember it if every share is recorded. Best effort: if the read fails, the next
    /// newcomer is refused by SQL and tries again.
    async fn remember_exhausted(&self, claim: &Claim, shares: u32) {
        let Some(loading) = self
            .exhausted
            .start_loading(&claim.room, &claim.token, shares, claim.now)
        else {
            return;
        };
        if let Ok(snapshot) = self.store.claim_snapshot(&claim.room, &claim.token).await {
            // A share still free (the refusal and the read were not of the same moment, or
            // the read is of another spray) is nothing to remember.
            let spray = snapshot
                .filter(|s| s.free_slots.is_empty() && s.recipient_count == shares)
                .map(|s| ExhaustedSpray {
                    owner: s.owner,
                    receive_until: s.receive_until,
                    shares: s.recipient_count,
                    receivers: s.receivers.into_iter().map(|(user, _)| user).collect(),
                });
            loading.remember(spray, claim.now);
        }
    }
}

#[async_trait]
impl ClaimPath for SqlClaim {
    async fn claim(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        if let Some(refusal) = self
            .exhausted
            .refusal(&claim.room, &claim.token, claim.user, claim.now)
        {
            telemetry::record_claim_remembered();
            return Ok(ClaimOutcome::Refused(refusal));
        }
        let outcome = self.store.claim_share(claim, idempotency).await?;
        if let ClaimOutcome::Refused(ReceiveRefusal::Exhausted { shares }) = outcome {
            self.remember_exhausted(claim, shares).await;
        }
        Ok(outcome)
    }

    async fn sprayed(&self, _spray_id: i64, _spray: &NewSpray) {}

    async fn redis_status(&self) -> RedisStatus {
        RedisStatus::Disabled
    }
}
