//! The claim without Redis: SQL finds a free share and records it in one transaction.
//!
//! Before that, a spray this instance has seen taken for good answers its newcomers and
//! its sprayer from memory (`exhausted.rs`), as on the gate's path. Without Redis there
//! are no holds: a spray is taken for good once a read of committed rows finds every
//! share recorded, and a recorded share is never freed again, so until its window closes
//! the answer to a newcomer cannot change. A refusal alone does not prove it: a batch's
//! refusal stands even when the batch's commit fails and the shares it gave are free
//! again (`store/batch.rs`), so the spray is read after the refusal and remembered only
//! if that read finds no share free. The crowd that arrives after the last share then
//! costs no write (on SQLite, no turn of the one writer) and no read.

use std::sync::Arc;

use async_trait::async_trait;

use super::exhausted::ExhaustedSprays;
use super::{ClaimPath, RedisStatus};
use crate::domain::ReceiveRefusal;
use crate::gate::ExhaustedSpray;
use crate::store::{Claim, ClaimOutcome, ClaimSnapshot, NewSpray, PendingKey, Store, StoreError};
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
            loading.remember(snapshot.and_then(|s| taken_for_good(s, shares)), claim.now);
        }
    }
}

/// What to remember of a spray read after SQL refused a claim on it as exhausted (of
/// `shares` shares): nothing if a share is free (the refusal came from a batch whose
/// commit failed, and that share is free again) or if the read is of another spray.
fn taken_for_good(snapshot: ClaimSnapshot, shares: u32) -> Option<ExhaustedSpray> {
    if !snapshot.free_slots.is_empty() || snapshot.recipient_count != shares {
        return None;
    }
    Some(ExhaustedSpray {
        owner: snapshot.owner,
        receive_until: snapshot.receive_until,
        shares: snapshot.recipient_count,
        receivers: snapshot.receivers.into_iter().map(|(user, _)| user).collect(),
    })
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

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::UserId;

    fn user(id: i64) -> UserId {
        UserId::from_stored(id).expect("a valid user id")
    }

    /// A spray of three shares owned by user 1, with `free` still free and the others
    /// received by users 2, 3, ...
    fn snapshot(free: &[i64]) -> ClaimSnapshot {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        ClaimSnapshot {
            spray_id: 7,
            owner: user(1),
            receive_until: at,
            lookup_until: at,
            recipient_count: 3,
            free_slots: free.to_vec(),
            receivers: (0..3)
                .filter(|slot| !free.contains(slot))
                .map(|slot| (user(slot + 2), slot))
                .collect(),
        }
    }

    #[test]
    fn a_spray_with_every_share_recorded_is_remembered_with_its_receivers() {
        let spray = taken_for_good(snapshot(&[]), 3).expect("taken for good");
        assert_eq!(spray.owner, user(1));
        assert_eq!(spray.shares, 3);
        assert_eq!(spray.receivers, vec![user(2), user(3), user(4)]);
    }

    #[test]
    fn a_share_free_again_is_not_taken_for_good() {
        // The refusal came from a batch whose commit failed: the share it gave is free.
        assert!(taken_for_good(snapshot(&[2]), 3).is_none());
    }

    #[test]
    fn a_read_of_another_spray_is_not_remembered() {
        assert!(taken_for_good(snapshot(&[]), 5).is_none());
    }
}
