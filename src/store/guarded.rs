//! What wraps every store call, once, instead of at each call site: its time in the
//! metrics (`spray_store_duration_seconds` by operation), and admission for the calls that
//! begin a request's work.
//!
//! Admission is how overload is refused fast. The store does a bounded amount of work at
//! a time (one SQLite writer; a MySQL pool of a few connections); requests past that only
//! queue, and a queue that grows makes every accepted request slow, then time out. So at
//! most `limit` request-path calls run or wait at once per instance; one more is refused
//! at once with `Unavailable` (503 with `Retry-After`) before it has done anything. Calls
//! that finish work already admitted (keeping or releasing an idempotency answer), health
//! checks, the audit and the sweepers are never refused. Claims the Redis gate answers
//! alone never reach the store, so a hot spray's losers are not limited by this.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ClaimSnapshot;
use super::{
    Begin, Claim, ClaimOutcome, IdempotentRequest, NewSpray, PendingKey, PoolUse, SettleOutcome, SlotClaim,
    SprayLookup, Store, StoreError, StoredAnswer,
};
use crate::domain::{Amount, RoomId, SprayRecord, Token, UserId};
use crate::telemetry::metrics::{StoreCallAdmitted, record_store_shed, time_store};

/// A store with its calls timed and its request-path calls admitted (see the module doc).
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    permits: Arc<Semaphore>,
}

impl GuardedStore {
    /// Wraps `inner`, admitting at most `limit` request-path calls at once.
    pub fn new(inner: Arc<dyn Store>, limit: usize) -> GuardedStore {
        GuardedStore {
            inner,
            permits: Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// A permit for one request-path call, held until the call ends, or 503 at once.
    fn admit(&self) -> Result<(OwnedSemaphorePermit, StoreCallAdmitted), StoreError> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok((permit, StoreCallAdmitted::start())),
            Err(_) => {
                record_store_shed();
                Err(StoreError::Unavailable(
                    "the store is at capacity (--store-concurrency)".into(),
                ))
            }
        }
    }
}

#[async_trait]
impl Store for GuardedStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        time_store("migrate", self.inner.migrate()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        time_store("ping", self.inner.ping()).await
    }

    async fn insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&PendingKey>,
    ) -> Result<i64, StoreError> {
        let _admitted = self.admit()?;
        time_store("insert_spray", self.inner.insert_spray(spray, idempotency)).await
    }

    async fn claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        let _admitted = self.admit()?;
        time_store("claim_share", self.inner.claim_share(claim, idempotency)).await
    }

    async fn find_spray(&self, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
        let _admitted = self.admit()?;
        time_store("find_spray", self.inner.find_spray(key)).await
    }

    async fn count(&self, sql: &'static str) -> Result<i64, StoreError> {
        time_store("count", self.inner.count(sql)).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    fn pool_use(&self) -> PoolUse {
        self.inner.pool_use()
    }

    async fn claim_snapshot(
        &self,
        room: &RoomId,
        token: &Token,
    ) -> Result<Option<ClaimSnapshot>, StoreError> {
        let _admitted = self.admit()?;
        time_store("claim_snapshot", self.inner.claim_snapshot(room, token)).await
    }

    async fn claim_slot(
        &self,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&PendingKey>,
    ) -> Result<SlotClaim, StoreError> {
        let _admitted = self.admit()?;
        time_store(
            "claim_slot",
            self.inner.claim_slot(claim, spray_id, slot, idempotency),
        )
        .await
    }

    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError> {
        let _admitted = self.admit()?;
        time_store("share_of", self.inner.share_of(spray_id, user)).await
    }

    async fn slot_holder(&self, spray_id: i64, slot: i64) -> Result<Option<UserId>, StoreError> {
        let _admitted = self.admit()?;
        time_store("slot_holder", self.inner.slot_holder(spray_id, slot)).await
    }

    async fn unsettled_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<Vec<i64>, StoreError> {
        time_store("unsettled_sprays", self.inner.unsettled_sprays(closed_by, limit)).await
    }

    async fn settle_spray(&self, spray_id: i64, now: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        time_store("settle_spray", self.inner.settle_spray(spray_id, now)).await
    }

    async fn purge_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        time_store("purge_sprays", self.inner.purge_sprays(closed_by, limit)).await
    }

    async fn begin_idempotent(&self, request: &IdempotentRequest) -> Result<Begin, StoreError> {
        let _admitted = self.admit()?;
        time_store("begin_idempotent", self.inner.begin_idempotent(request)).await
    }

    async fn finish_idempotent(
        &self,
        pending: &PendingKey,
        answer: &StoredAnswer,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        time_store(
            "finish_idempotent",
            self.inner.finish_idempotent(pending, answer, now),
        )
        .await
    }

    async fn release_idempotent(&self, pending: &PendingKey) -> Result<(), StoreError> {
        time_store("release_idempotent", self.inner.release_idempotent(pending)).await
    }

    async fn purge_idempotency(&self, touched_before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        time_store(
            "purge_idempotency",
            self.inner.purge_idempotency(touched_before, limit),
        )
        .await
    }
}
