//! The store: the single source of truth for money.
//!
//! Every rule that protects money is enforced here, inside one SQL transaction per
//! operation and backed by constraints (see `docs/design.md` section 1), so it
//! holds however many service instances run in front of the database. One module per
//! backend, each with its own migrations; [`open`] picks the backend by URL scheme.

mod batch;
mod batch_tx;
mod claim_batch;
mod commit;
mod convert;
mod error;
mod guarded;
mod idempotency;
mod lookup_batch;
mod multi_row;
pub mod mysql;
mod portable;
mod queue;
mod slot_batch;
mod spray_batch;
pub mod sqlite;
mod sqlite_reads;
mod sqlite_writes;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use error::StoreError;
pub use guarded::GuardedStore;
pub use idempotency::{Begin, Effect, IdempotentRequest, Kept, PendingKey, StoredAnswer};

use crate::domain::{Amount, ReceiveRefusal, RoomId, SplitMode, SprayRecord, Token, UserId};

/// A spray about to be written: its shares are already drawn, in order of receipt.
#[derive(Debug, Clone)]
pub struct NewSpray {
    pub token: Token,
    pub room: RoomId,
    pub owner: UserId,
    pub mode: SplitMode,
    pub total_amount: Amount,
    pub shares: Vec<Amount>,
    pub created_at: DateTime<Utc>,
    pub receive_until: DateTime<Utc>,
    pub lookup_until: DateTime<Utc>,
}

impl NewSpray {
    /// What writing this spray did, as its sprayer is answered.
    pub fn created(&self) -> CreatedSpray {
        CreatedSpray {
            token: self.token.clone(),
            created_at: self.created_at,
            receive_until: self.receive_until,
            lookup_until: self.lookup_until,
        }
    }
}

/// A spray written: its token and its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSpray {
    pub token: Token,
    pub created_at: DateTime<Utc>,
    pub receive_until: DateTime<Utc>,
    pub lookup_until: DateTime<Utc>,
}

/// What SQL knows about a live spray's shares: enough for a claim path to rebuild its
/// own view of the spray (the Redis gate's keys) from the source of truth.
#[derive(Debug, Clone)]
pub struct ClaimSnapshot {
    pub spray_id: i64,
    pub owner: UserId,
    pub receive_until: DateTime<Utc>,
    pub lookup_until: DateTime<Utc>,
    pub recipient_count: u32,
    /// Unclaimed slots, in the order they are handed out.
    pub free_slots: Vec<i64>,
    /// Who received which slot.
    pub receivers: Vec<(UserId, i64)>,
}

/// A member of `room` asks for a share of the spray `token` at `now`.
#[derive(Debug, Clone)]
pub struct Claim {
    pub room: RoomId,
    pub token: Token,
    pub user: UserId,
    pub now: DateTime<Utc>,
}

/// The answer to a claim: a share, or the rule that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    Received(Amount),
    Refused(ReceiveRefusal),
}

/// How a spray is looked up: by the room it was sprayed in, or among the caller's own.
#[derive(Debug, Clone)]
pub enum SprayLookup {
    Room(RoomId, Token),
    Owner(UserId, Token),
}

/// A backend of the store. Each method is one transaction (or one consistent read).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the pending schema migrations. Safe to run from several processes at once.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Writes the spray, its shares and the sprayer's DEBIT in one transaction, and
    /// returns the new spray's id. `StoreError::TokenTaken` when a live spray of the room or of the sprayer holds the
    /// token; nothing is written then. With `idempotency`, the same transaction records the
    /// spray on that pending row ([`Effect::Sprayed`]).
    async fn insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&PendingKey>,
    ) -> Result<i64, StoreError>;

    /// Applies the receive rules and, if they allow it, gives the caller one free share
    /// and records the CREDIT, all in one transaction. A settled spray counts as closed
    /// (rule 4), whatever `claim.now` says. With `idempotency`, a claim that takes a share
    /// records it on that pending row in the same transaction ([`Effect::Received`]); a
    /// refused claim leaves the row to the caller.
    async fn claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError>;

    /// The newest spray under this key, with its receipts in order of receipt.
    async fn find_spray(&self, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError>;

    /// Runs one read-only audit query that counts rows breaking an invariant.
    async fn count(&self, sql: &'static str) -> Result<i64, StoreError>;

    /// Closes the connections, waiting for those in use to be returned.
    async fn close(&self);

    /// The connection pool now: which backend, its open connections and the idle ones
    /// among them (for the `spray_store_pool_connections` gauge, read at each scrape).
    fn pool_use(&self) -> PoolUse;

    // The Redis gate's SQL side (see `crate::gate`).

    /// What the gate needs to rebuild a spray's keys: the newest spray with this token in
    /// the room, its free slots in order and its receivers.
    async fn claim_snapshot(&self, room: &RoomId, token: &Token)
    -> Result<Option<ClaimSnapshot>, StoreError>;

    /// Records that `claim.user` received the share in `slot`, if that share is still
    /// free, the window is still open at `claim.now` and the spray is not settled: one
    /// point update and the CREDIT (and, with `idempotency`, the kept effect), in one
    /// transaction.
    async fn claim_slot(
        &self,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&PendingKey>,
    ) -> Result<SlotClaim, StoreError>;

    /// The share `user` holds in the spray, if any (one indexed read).
    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError>;

    /// Who holds share `slot` of the spray, if anyone (one read by primary key): the gate
    /// asks when it finds a slot it handed out already taken.
    async fn slot_holder(&self, spray_id: i64, slot: i64) -> Result<Option<UserId>, StoreError>;

    // The life of a spray after its window: settlement, retention, idempotency.

    /// Up to `limit` ids of unsettled sprays whose receive window closed by `closed_by`,
    /// the longest closed first.
    async fn unsettled_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<Vec<i64>, StoreError>;

    /// Settles the spray `spray_id` at `now` in one transaction: marks it settled and, if
    /// shares are left, writes one REFUND of their sum to the sprayer. A conditional
    /// update that only one caller can win, however many race; a spray whose window is
    /// still open at `now` is left alone. No claim can take a share once this commits.
    async fn settle_spray(&self, spray_id: i64, now: DateTime<Utc>) -> Result<SettleOutcome, StoreError>;

    /// Deletes up to `limit` settled sprays whose lookup window closed by `closed_by`, with
    /// their shares; the ledger is kept. Returns how many were deleted.
    async fn purge_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;

    /// Begins a request under an `Idempotency-Key`; see [`Begin`].
    async fn begin_idempotent(&self, request: &IdempotentRequest) -> Result<Begin, StoreError>;

    /// Keeps `answer` (one without effect, such as a 4xx) for the pending row `slot` holds,
    /// at `now`. `false` when the row is no longer pending under this lease.
    async fn finish_idempotent(
        &self,
        pending: &PendingKey,
        answer: &StoredAnswer,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Deletes the row `slot` holds if it is still pending under its lease, so that a
    /// retry runs afresh (after a 5xx, or a request that was cancelled).
    async fn release_idempotent(&self, pending: &PendingKey) -> Result<(), StoreError>;

    /// Deletes up to `limit` idempotency rows untouched since before `touched_before`.
    async fn purge_idempotency(&self, touched_before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
}

/// A connection pool's use at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    pub backend: &'static str,
    pub open: u32,
    pub idle: u32,
}

/// What settling one spray did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Settled now, with a REFUND of this remainder to the sprayer.
    Refunded(Amount),
    /// Settled now: every share had been received, nothing to refund.
    Completed,
    /// Someone else settled it first.
    AlreadySettled,
    /// Its receive window is still open at the given time.
    StillOpen,
    /// It no longer exists (purged).
    Gone,
}

/// The outcome of a point update of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotClaim {
    Received(Amount),
    /// Someone else holds that share in SQL: the gate's view was stale.
    Taken,
    /// The user already holds another share of this spray.
    AlreadyReceived,
    /// The receive window closed (or the spray was settled) before the claim could be
    /// recorded.
    Closed,
}

/// Opens the store named by `url`: `sqlite://…` for the embedded store, `mysql://…`
/// for MySQL or MariaDB with at most `max_connections` connections (SQLite has one
/// writer and a few readers, whatever this says).
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("mysql:") {
        Ok(Arc::new(mysql::MySqlStore::connect(url, max_connections).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL scheme in {}; use sqlite:// or mysql://",
            crate::config::redact_url(url)
        )))
    }
}
