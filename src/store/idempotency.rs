//! The store's side of idempotent retries: the types its idempotency methods speak.
//!
//! The life of a key (see the `idempotency` table in the migrations):
//! 1. [`Store::begin_idempotent`](super::Store::begin_idempotent) inserts a pending row in
//!    its own short transaction, or says what the existing row means: replay its answer,
//!    the key was used for another request, or the first request is still running. A
//!    pending row untouched for longer than the lease (`--idempotency-lease`) was
//!    abandoned (its request ended without an answer, or its process died) and is taken
//!    over under a fresh lease.
//! 2. The effect's own transaction (`insert_spray`, `claim_share`) completes the row with
//!    the answer, so the effect and the answer a retry gets commit together or not at all.
//! 3. An answer without effect (4xx) is stored by
//!    [`Store::finish_idempotent`](super::Store::finish_idempotent); a 5xx, or a request
//!    that never finished, releases the row so a retry runs afresh.
//!
//! Every write after the first is conditional on the row still being pending under the
//! writer's lease: a request whose row was taken over can no longer record anything.

use chrono::{DateTime, Utc};

use super::StoreError;
use super::convert::millis;
use crate::domain::{Amount, Endpoint, Fingerprint, IdempotencyKey, UserId};

/// A request under an `Idempotency-Key`, about to begin.
#[derive(Debug, Clone)]
pub struct IdempotentRequest {
    pub user: UserId,
    pub endpoint: Endpoint,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub now: DateTime<Utc>,
    /// A pending row last touched before this instant was abandoned and may be taken over.
    pub abandoned_before: DateTime<Utc>,
    /// The lease to hold the row under if this request gets to run.
    pub lease: i64,
}

/// A pending idempotency row that this request holds and must complete or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKey {
    pub user: UserId,
    pub endpoint: Endpoint,
    pub key: IdempotencyKey,
    pub lease: i64,
}

/// An answer as kept for replay: status, the headers that belong to it, and the body
/// byte for byte. Only 2xx and 4xx answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: String,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// What [`Store::begin_idempotent`](super::Store::begin_idempotent) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// No answer yet: run the request, holding this pending key.
    Run(PendingKey),
    /// The same request was answered before: give this answer again.
    Replay(StoredAnswer),
    /// The key was used for a different request.
    KeyReused,
    /// The same request is still running.
    InProgress,
}

/// Renders the answer to keep from what the effect moved (the amount of the share a claim
/// took; a spray's answer is known before its transaction and ignores it).
pub type RenderAnswer = std::sync::Arc<dyn Fn(Amount) -> StoredAnswer + Send + Sync>;

/// The idempotency row an effect completes inside its own transaction. The effect is
/// rolled back if the row is no longer pending under this key's lease. Owned, so that an
/// effect can run to its end in a task of its own after its request is gone.
#[derive(Clone)]
pub struct IdempotencyWrite {
    pub pending: PendingKey,
    pub render: RenderAnswer,
}

impl std::fmt::Debug for IdempotencyWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyWrite")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

/// An existing idempotency row, as selected with [`SELECT_ROW_SQL`].
#[derive(Debug, sqlx::FromRow)]
pub(super) struct IdempotencyRow {
    pub fingerprint: Vec<u8>,
    pub lease: i64,
    pub touched_at: i64,
    pub status_code: Option<i64>,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub body: Option<Vec<u8>>,
}

/// What an existing row means for a request under the same key.
#[derive(Debug)]
pub(super) enum Judgement {
    /// Answer at once (replay, key reused, in progress).
    Answer(Begin),
    /// Pending and abandoned: take it over if it is still held under `lease`.
    TakeOver { lease: i64 },
}

impl IdempotencyRow {
    pub(super) fn judge(self, request: &IdempotentRequest) -> Result<Judgement, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("idempotency row: bad {what}"));
        let fingerprint =
            Fingerprint::from_stored(&self.fingerprint).ok_or_else(|| corrupt("fingerprint"))?;
        // A different request under the same key is refused whatever state the row is in.
        if fingerprint != request.fingerprint {
            return Ok(Judgement::Answer(Begin::KeyReused));
        }
        match (self.status_code, self.content_type, self.body) {
            (Some(status), Some(content_type), Some(body)) => {
                let status = u16::try_from(status).map_err(|_| corrupt("status"))?;
                Ok(Judgement::Answer(Begin::Replay(StoredAnswer {
                    status,
                    content_type,
                    location: self.location,
                    body,
                })))
            }
            (None, None, None) if self.touched_at < millis(request.abandoned_before) => {
                Ok(Judgement::TakeOver { lease: self.lease })
            }
            (None, None, None) => Ok(Judgement::Answer(Begin::InProgress)),
            _ => Err(corrupt("answer")),
        }
    }
}

impl IdempotentRequest {
    /// The pending key this request holds once it gets to run.
    pub(super) fn pending(&self) -> PendingKey {
        PendingKey {
            user: self.user,
            endpoint: self.endpoint,
            key: self.key.clone(),
            lease: self.lease,
        }
    }
}

/// The answer's columns as stored: status, content type, location, body.
pub(super) fn answer_columns(answer: &StoredAnswer) -> (i64, &str, Option<&str>, &[u8]) {
    (
        i64::from(answer.status),
        answer.content_type.as_str(),
        answer.location.as_deref(),
        answer.body.as_slice(),
    )
}

/// Completes a pending row with its answer, inside the effect's transaction (portable SQL).
pub(super) const COMPLETE_SQL: &str = "UPDATE idempotency
     SET status_code = ?, content_type = ?, location = ?, body = ?, touched_at = ?
     WHERE user_id = ? AND endpoint = ? AND idem_key = ? AND status_code IS NULL AND lease = ?";

/// Inserts a pending row (portable SQL).
pub(super) const INSERT_PENDING_SQL: &str = "INSERT INTO idempotency
     (user_id, endpoint, idem_key, fingerprint, lease, created_at, touched_at)
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// Selects a row by its key (portable SQL).
pub(super) const SELECT_ROW_SQL: &str =
    "SELECT fingerprint, lease, touched_at, status_code, content_type, location, body
     FROM idempotency WHERE user_id = ? AND endpoint = ? AND idem_key = ?";

/// Takes over an abandoned pending row still held under the old lease (portable SQL).
pub(super) const TAKE_OVER_SQL: &str = "UPDATE idempotency SET lease = ?, touched_at = ?
     WHERE user_id = ? AND endpoint = ? AND idem_key = ? AND status_code IS NULL AND lease = ?";

/// Releases a row still pending under the lease (portable SQL).
pub(super) const RELEASE_SQL: &str = "DELETE FROM idempotency
     WHERE user_id = ? AND endpoint = ? AND idem_key = ? AND status_code IS NULL AND lease = ?";

/// The error an effect fails with when its row was taken over meanwhile: the effect is
/// rolled back and the client told to retry, and the retry meets the new holder's answer.
pub(super) fn lease_lost() -> StoreError {
    StoreError::Unavailable("the idempotency key was taken over by a retry of the same request".into())
}
