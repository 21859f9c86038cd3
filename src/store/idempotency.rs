//! The store's side of idempotent retries: the types its idempotency methods speak.
//!
//! The life of a key (see the `idempotency` table in the migrations):
//! 1. [`Store::begin_idempotent`](super::Store::begin_idempotent) inserts a pending row in
//!    its own short transaction, or says what the existing row means: replay its answer,
//!    the key was used for another request, or the first request is still running. A
//!    pending row untouched for longer than the lease (`--idempotency-lease`) was
//!    abandoned (its request ended without an answer, or its process died) and is taken
//!    over under a fresh lease.
//! 2. The effect's own transaction (`insert_spray`, `claim_share`, `claim_slot`) records
//!    on the row what the effect did, typed ([`Effect`]), so the effect and what a retry
//!    is answered from commit together or not at all. The HTTP layer renders the effect
//!    into the answer, the first time and on every replay alike.
//! 3. An answer without effect (4xx) is stored by
//!    [`Store::finish_idempotent`](super::Store::finish_idempotent); a 5xx, or a request
//!    that never finished, releases the row so a retry runs afresh.
//!
//! Every write after the first is conditional on the row still being pending under the
//! writer's lease: a request whose row was taken over can no longer record anything.

use chrono::{DateTime, Utc};

use super::CreatedSpray;
use super::StoreError;
use super::convert::{millis, time_from};
use crate::domain::{Amount, Endpoint, Fingerprint, IdempotencyKey, Token, UserId};

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
    /// The same request was answered before: answer it again from what was kept.
    Replay(Kept),
    /// The key was used for a different request.
    KeyReused,
    /// The same request is still running.
    InProgress,
}

/// What a request under an idempotency key did, as kept with its key: enough to answer
/// a retry the same way, rendered by the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A spray was created.
    Sprayed(CreatedSpray),
    /// A share of this amount was received.
    Received(Amount),
}

/// What a replayed request is answered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The effect the first request had.
    Effect(Effect),
    /// The answer without effect (a 4xx) the first request was given, byte for byte.
    Answer(StoredAnswer),
}

/// An effect as stored in the `effect` column: JSON with times in milliseconds.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredEffect {
    Sprayed {
        token: String,
        created_at: i64,
        receive_until: i64,
        lookup_until: i64,
    },
    Received(u64),
}

impl Effect {
    /// The `effect` column's text.
    pub(super) fn to_column(&self) -> Result<String, StoreError> {
        let stored = match self {
            Effect::Sprayed(spray) => StoredEffect::Sprayed {
                token: spray.token.as_str().to_owned(),
                created_at: millis(spray.created_at),
                receive_until: millis(spray.receive_until),
                lookup_until: millis(spray.lookup_until),
            },
            Effect::Received(amount) => StoredEffect::Received(amount.units()),
        };
        serde_json::to_string(&stored).map_err(|e| StoreError::Other(e.to_string()))
    }

    fn from_column(text: &str) -> Result<Effect, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("idempotency row: bad effect ({what})"));
        let stored: StoredEffect = serde_json::from_str(text).map_err(|e| corrupt(&e.to_string()))?;
        Ok(match stored {
            StoredEffect::Sprayed {
                token,
                created_at,
                receive_until,
                lookup_until,
            } => Effect::Sprayed(CreatedSpray {
                token: Token::parse(&token).ok_or_else(|| corrupt("token"))?,
                created_at: time_from(created_at)?,
                receive_until: time_from(receive_until)?,
                lookup_until: time_from(lookup_until)?,
            }),
            StoredEffect::Received(units) => Effect::Received(Amount::new(units)),
        })
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
    pub effect: Option<String>,
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
        if let Some(effect) = self.effect {
            return Ok(Judgement::Answer(Begin::Replay(Kept::Effect(
                Effect::from_column(&effect)?,
            ))));
        }
        match (self.status_code, self.content_type, self.body) {
            (Some(status), Some(content_type), Some(body)) => {
                let status = u16::try_from(status).map_err(|_| corrupt("status"))?;
                Ok(Judgement::Answer(Begin::Replay(Kept::Answer(StoredAnswer {
                    status,
                    content_type,
                    location: self.location,
                    body,
                }))))
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

/// A row is pending (its request has neither an effect nor an answer yet) and held under
/// the lease bound last (portable SQL, the end of every conditional write).
macro_rules! pending_under_lease {
    () => {
        "user_id = ? AND endpoint = ? AND idem_key = ? AND status_code IS NULL AND effect IS NULL AND lease = ?"
    };
}

/// Completes a pending row with an answer without effect (portable SQL).
pub(super) const COMPLETE_SQL: &str = concat!(
    "UPDATE idempotency SET status_code = ?, content_type = ?, location = ?, body = ?, touched_at = ? WHERE ",
    pending_under_lease!()
);

/// Records on a pending row what its effect did, inside the effect's transaction
/// (portable SQL).
pub(super) const RECORD_EFFECT_SQL: &str = concat!(
    "UPDATE idempotency SET effect = ?, touched_at = ? WHERE ",
    pending_under_lease!()
);

/// Inserts a pending row (portable SQL).
pub(super) const INSERT_PENDING_SQL: &str = "INSERT INTO idempotency
     (user_id, endpoint, idem_key, fingerprint, lease, created_at, touched_at)
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// Selects a row by its key (portable SQL).
pub(super) const SELECT_ROW_SQL: &str =
    "SELECT fingerprint, lease, touched_at, status_code, content_type, location, body, effect
     FROM idempotency WHERE user_id = ? AND endpoint = ? AND idem_key = ?";

/// Takes over an abandoned pending row still held under the old lease (portable SQL).
pub(super) const TAKE_OVER_SQL: &str = concat!(
    "UPDATE idempotency SET lease = ?, touched_at = ? WHERE ",
    pending_under_lease!()
);

/// Releases a row still pending under the lease (portable SQL).
pub(super) const RELEASE_SQL: &str = concat!("DELETE FROM idempotency WHERE ", pending_under_lease!());

/// The error an effect fails with when its row was taken over meanwhile: the effect is
/// rolled back and the client told to retry, and the retry meets the new holder's answer.
pub(super) fn lease_lost() -> StoreError {
    StoreError::Unavailable("the idempotency key was taken over by a retry of the same request".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_effect_reads_back_as_it_was_written_and_garbage_is_corruption() {
        let at = DateTime::from_timestamp_millis(1_708_508_000_123).unwrap();
        let effects = [
            Effect::Received(Amount::new(u64::MAX)),
            Effect::Sprayed(CreatedSpray {
                token: Token::parse("aZ9").unwrap(),
                created_at: at,
                receive_until: at + chrono::TimeDelta::minutes(10),
                lookup_until: at + chrono::TimeDelta::days(7),
            }),
        ];
        for effect in effects {
            let column = effect.to_column().unwrap();
            assert!(column.len() <= 512, "fits the column: {column}");
            assert_eq!(Effect::from_column(&column).unwrap(), effect);
        }
        for garbage in [
            "",
            "{}",
            r#"{"received":-1}"#,
            r#"{"sprayed":{"token":"toolong","created_at":0,"receive_until":0,"lookup_until":0}}"#,
        ] {
            assert!(
                matches!(Effect::from_column(garbage), Err(StoreError::Corrupt(_))),
                "{garbage}"
            );
        }
    }
}
