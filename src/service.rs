//! The service: the contract's operations, given the outside world's inputs (a clock, a
//! token source, the split's random source), a store and a claim path.
//!
//! Inputs arrive here already parsed into domain types; the HTTP layer only translates.

use std::sync::Arc;

use tracing::Instrument;

use crate::claim::ClaimPath;
use crate::clock::Clock;
use crate::domain::rules::check_lookup;
use crate::domain::{
    Amount, LookupRefusal, LookupScope, Policy, ReceiveRefusal, RoomId, SplitMode, SplitRandomness,
    SprayCommand, SprayRecord, SprayState, Token, TokenSource, UserId, split_evenly, split_randomly,
};
use crate::store::{Claim, ClaimOutcome, NewSpray, PendingKey, SprayLookup, Store, StoreError};

/// How many fresh tokens to try before giving up on a crowded room or sprayer. With
/// 238,328 tokens, a room would need well over 100,000 live sprays before eight draws in
/// a row all collide with noticeable probability.
pub const TOKEN_ATTEMPTS: usize = 8;

/// What the service takes from the outside world, injected so that tests control it:
/// production uses the system clock and the OS CSPRNG for tokens and splits.
#[derive(Clone)]
pub struct Sources {
    pub clock: Arc<dyn Clock>,
    pub tokens: Arc<dyn TokenSource>,
    pub randomness: Arc<dyn SplitRandomness>,
}

impl Sources {
    pub fn system() -> Sources {
        Sources {
            clock: Arc::new(crate::clock::SystemClock),
            tokens: Arc::new(crate::domain::OsTokens),
            randomness: Arc::new(crate::domain::OsRandomness),
        }
    }
}

/// The answer to a successful spray (what the store records as its effect).
pub use crate::store::CreatedSpray;

/// Everything that can go wrong in the service, before it becomes problem+json.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("receive refused: {0:?}")]
    Receive(ReceiveRefusal),
    #[error("lookup refused: {0:?}")]
    Lookup(LookupRefusal),
    /// Every token drawn was taken, or the random source failed.
    #[error("no free token: {0}")]
    NoToken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task that ran an effect to its end failed (a bug: it panicked).
    #[error("an effect's task failed: {0}")]
    Task(String),
}

pub struct SprayService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    tokens: Arc<dyn TokenSource>,
    randomness: Arc<dyn SplitRandomness>,
    policy: Policy,
    /// How a receive gets its share: SQL alone, or the Redis gate in front of it.
    claims: Arc<dyn ClaimPath>,
}

impl SprayService {
    pub fn new(store: Arc<dyn Store>, sources: Sources, policy: Policy, claims: Arc<dyn ClaimPath>) -> Self {
        SprayService {
            store,
            clock: sources.clock,
            tokens: sources.tokens,
            randomness: sources.randomness,
            policy,
            claims,
        }
    }

    pub fn claims(&self) -> &Arc<dyn ClaimPath> {
        &self.claims
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Splits the amount, then writes the spray under a fresh token, retrying a bounded
    /// number of times when the token is taken in the room or by the sprayer. With
    /// `idempotency`, the answer is kept in the same transaction as the spray.
    pub async fn spray(
        &self,
        command: SprayCommand,
        idempotency: Option<PendingKey>,
    ) -> Result<CreatedSpray, ServiceError> {
        let (amount, count) = (command.amount(), command.recipient_count());
        // The split cannot fail: the command was checked against the policy when it was
        // parsed. Only the random source can.
        let shares = match command.mode() {
            // No generator for an even split, which draws nothing: its seed was a
            // `getrandom` system call on every spray of the default mode.
            SplitMode::Even => split_evenly(amount, count.get()),
            SplitMode::Random => {
                let mut rng = self.randomness.generator().map_err(ServiceError::NoToken)?;
                split_randomly(amount, count.get(), &mut rng)
            }
        }
        .map_err(|e| ServiceError::Invalid(e.to_string()))?;

        let created_at = self.clock.now();
        let overflow = || ServiceError::Invalid("the clock is out of range".into());
        let receive_until = created_at
            .checked_add_signed(self.policy.receive_window)
            .ok_or_else(overflow)?;
        let lookup_until = created_at
            .checked_add_signed(self.policy.lookup_window)
            .ok_or_else(overflow)?;
        let draft = SprayDraft {
            room: command.room().clone(),
            owner: command.owner(),
            mode: command.mode(),
            total_amount: amount,
            shares,
            created_at,
            receive_until,
            lookup_until,
        };
        // Once begun, the write runs to its end in a task of its own: a client that goes
        // away cannot cut it between the commit and telling the gate (see `crate::claim`).
        let writer = SprayWriter {
            store: self.store.clone(),
            tokens: self.tokens.clone(),
            claims: self.claims.clone(),
        };
        // In the request's span, so that its lines carry the request and trace ids.
        tokio::spawn(async move { writer.write(draft, idempotency).await }.in_current_span())
            .await
            .map_err(|e| ServiceError::Task(e.to_string()))?
    }

    /// Gives the caller one share of the spray `token` in `room`. With `idempotency`, the
    /// answer is kept in the same transaction as the claim. The claim runs to its end in a
    /// task of its own, whatever becomes of the request (see `crate::claim`).
    pub async fn receive(
        &self,
        user: UserId,
        room: RoomId,
        token: Token,
        idempotency: Option<PendingKey>,
    ) -> Result<Amount, ServiceError> {
        let claim = Claim {
            room,
            token,
            user,
            now: self.clock.now(),
        };
        let claims = self.claims.clone();
        let outcome =
            tokio::spawn(async move { claims.claim(&claim, idempotency.as_ref()).await }.in_current_span())
                .await
                .map_err(|e| ServiceError::Task(e.to_string()))??;
        match outcome {
            ClaimOutcome::Received(amount) => Ok(amount),
            ClaimOutcome::Refused(refusal) => Err(ServiceError::Receive(refusal)),
        }
    }

    /// The sprayer's view of a spray, found by room when one is given, else among the
    /// caller's own sprays.
    pub async fn lookup(
        &self,
        caller: UserId,
        room: Option<RoomId>,
        token: Token,
    ) -> Result<(SprayRecord, SprayState), ServiceError> {
        let (key, scope) = match room {
            Some(room) => (SprayLookup::Room(room, token), LookupScope::Room),
            None => (SprayLookup::Owner(caller, token), LookupScope::OwnSprays),
        };
        let record = self
            .store
            .find_spray(&key)
            .await?
            .ok_or(ServiceError::Lookup(LookupRefusal::NotFound))?;
        let now = self.clock.now();
        check_lookup(scope, record.owner, record.lookup_until, caller, now).map_err(ServiceError::Lookup)?;
        let state = record
            .state_at(now)
            .map_err(|e| ServiceError::Store(StoreError::Corrupt(e.to_string())))?;
        Ok((record, state))
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// A spray whose shares are drawn, waiting for its token.
struct SprayDraft {
    room: RoomId,
    owner: UserId,
    mode: SplitMode,
    total_amount: Amount,
    shares: Vec<Amount>,
    created_at: chrono::DateTime<chrono::Utc>,
    receive_until: chrono::DateTime<chrono::Utc>,
    lookup_until: chrono::DateTime<chrono::Utc>,
}

/// What writing a spray needs, owned, so that it can run in a task of its own.
struct SprayWriter {
    store: Arc<dyn Store>,
    tokens: Arc<dyn TokenSource>,
    claims: Arc<dyn ClaimPath>,
}

impl SprayWriter {
    /// Writes the spray under a fresh token, retrying a bounded number of times when the
    /// token is taken in the room or by the sprayer, then readies the claim path for it.
    async fn write(
        self,
        draft: SprayDraft,
        idempotency: Option<PendingKey>,
    ) -> Result<CreatedSpray, ServiceError> {
        for _ in 0..TOKEN_ATTEMPTS {
            let token = self
                .tokens
                .draw()
                .map_err(|e| ServiceError::NoToken(e.to_string()))?;
            let spray = NewSpray {
                token: token.clone(),
                room: draft.room.clone(),
                owner: draft.owner,
                mode: draft.mode,
                total_amount: draft.total_amount,
                shares: draft.shares.clone(),
                created_at: draft.created_at,
                receive_until: draft.receive_until,
                lookup_until: draft.lookup_until,
            };
            match self.store.insert_spray(&spray, idempotency.as_ref()).await {
                Ok(spray_id) => {
                    self.claims.sprayed(spray_id, &spray).await;
                    return Ok(spray.created());
                }
                Err(StoreError::TokenTaken) => {
                    tracing::debug!("token collision, drawing another");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::NoToken(format!(
            "{TOKEN_ATTEMPTS} tokens in a row were already in use in this room or by this sprayer"
        )))
    }
}
