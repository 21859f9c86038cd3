//! The service: the contract's operations, given a clock, a token source and a store.
//!
//! Inputs arrive here already parsed into domain types; the HTTP layer only translates.

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::{StdRng, SysRng};

use crate::clock::Clock;
use crate::config::Policy;
use crate::domain::rules::check_lookup;
use crate::domain::rules::window_open;
use crate::domain::{
    Amount, LookupRefusal, LookupScope, ReceiveRefusal, RoomId, SplitMode, SprayRecord, SprayState, Token,
    TokenSource, UserId, split,
};
use crate::gate::{GateSnapshot, GateVerdict, RedisGate, SprayKeys};
use crate::store::{
    Claim, ClaimOutcome, IdempotencySlot, IdempotencyWrite, NewSpray, SlotClaim, SprayKey, Store, StoreError,
    StoredAnswer,
};
use crate::telemetry::{self, time_store};

/// How many fresh tokens to try before giving up on a crowded room or sprayer. With
/// 238,328 tokens, a room would need well over 100,000 live sprays before eight draws in
/// a row all collide with noticeable probability.
pub const TOKEN_ATTEMPTS: usize = 8;

/// A validated request to spray money.
#[derive(Debug, Clone)]
pub struct SprayCommand {
    pub owner: UserId,
    pub room: RoomId,
    pub amount: Amount,
    pub recipient_count: u32,
    pub mode: SplitMode,
}

/// The answer to a successful spray.
#[derive(Debug, Clone)]
pub struct CreatedSpray {
    pub token: Token,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub receive_until: chrono::DateTime<chrono::Utc>,
    pub lookup_until: chrono::DateTime<chrono::Utc>,
}

/// Renders the answer to a spray, to be kept with it for idempotent retries. The token is
/// only known once drawn, so the answer is rendered for each attempt.
pub type RenderSpray<'a> = &'a (dyn Fn(&CreatedSpray) -> StoredAnswer + Send + Sync);

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
}

pub struct SprayService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    tokens: Arc<dyn TokenSource>,
    policy: Policy,
    /// The Redis gate in front of the claim, when Redis is configured.
    gate: Option<Arc<RedisGate>>,
}

impl SprayService {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        tokens: Arc<dyn TokenSource>,
        policy: Policy,
    ) -> Self {
        SprayService {
            store,
            clock,
            tokens,
            policy,
            gate: None,
        }
    }

    /// Puts the Redis gate in front of the claim.
    pub fn with_gate(mut self, gate: Arc<RedisGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn gate(&self) -> Option<&Arc<RedisGate>> {
        self.gate.as_ref()
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
        idempotency: Option<(&IdempotencySlot, RenderSpray<'_>)>,
    ) -> Result<CreatedSpray, ServiceError> {
        if command.amount.units() < 1 || command.amount > self.policy.max_amount {
            return Err(ServiceError::Invalid(format!(
                "amount must be between 1 and {}",
                self.policy.max_amount
            )));
        }
        if command.recipient_count < 1 || command.recipient_count > self.policy.max_recipients {
            return Err(ServiceError::Invalid(format!(
                "recipient_count must be between 1 and {}",
                self.policy.max_recipients
            )));
        }
        // One OS-seeded CSPRNG per spray: one system call, then fast draws.
        let mut rng = StdRng::try_from_rng(&mut SysRng).map_err(|e| ServiceError::NoToken(e.to_string()))?;
        let shares =
            split(command.mode, command.amount, command.recipient_count, &mut rng).map_err(|_| {
                ServiceError::Invalid(format!(
                    "amount ({}) must be at least recipient_count ({}), so that every share is at least 1",
                    command.amount, command.recipient_count
                ))
            })?;

        let created_at = self.clock.now();
        let overflow = || ServiceError::Invalid("the clock is out of range".into());
        let receive_until = created_at
            .checked_add_signed(self.policy.receive_window)
            .ok_or_else(overflow)?;
        let lookup_until = created_at
            .checked_add_signed(self.policy.lookup_window)
            .ok_or_else(overflow)?;
        for _ in 0..TOKEN_ATTEMPTS {
            let token = self
                .tokens
                .draw()
                .map_err(|e| ServiceError::NoToken(e.to_string()))?;
            let spray = NewSpray {
                token: token.clone(),
                room: command.room.clone(),
                owner: command.owner,
                mode: command.mode,
                total_amount: command.amount,
                shares: shares.clone(),
                created_at,
                receive_until,
                lookup_until,
            };
            let created = CreatedSpray {
                token,
                created_at,
                receive_until,
                lookup_until,
            };
            let inserted = match idempotency {
                None => time_store("insert_spray", self.store.insert_spray(&spray, None)).await,
                Some((slot, render)) => {
                    let answer = render(&created);
                    let keep = move |_| answer.clone();
                    let write = IdempotencyWrite { slot, render: &keep };
                    time_store("insert_spray", self.store.insert_spray(&spray, Some(&write))).await
                }
            };
            match inserted {
                Ok(spray_id) => {
                    self.prime_gate(spray_id, &spray).await;
                    return Ok(created);
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

    /// Gives the caller one share of the spray `token` in `room`. With `idempotency`, the
    /// answer is kept in the same transaction as the claim.
    pub async fn receive(
        &self,
        user: UserId,
        room: RoomId,
        token: Token,
        idempotency: Option<&IdempotencyWrite<'_>>,
    ) -> Result<Amount, ServiceError> {
        let claim = Claim {
            room,
            token,
            user,
            now: self.clock.now(),
        };
        let outcome = match &self.gate {
            Some(gate) => self.claim_through_gate(gate, &claim, idempotency).await?,
            None => time_store("claim_share", self.store.claim_share(&claim, idempotency)).await?,
        };
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
            Some(room) => (SprayKey::Room(room, token), LookupScope::Room),
            None => (SprayKey::Owner(caller, token), LookupScope::OwnSprays),
        };
        let record = time_store("find_spray", self.store.find_spray(&key))
            .await?
            .ok_or(ServiceError::Lookup(LookupRefusal::NotFound))?;
        let now = self.clock.now();
        check_lookup(scope, record.owner, record.lookup_until, caller, now).map_err(ServiceError::Lookup)?;
        let state = record
            .state_at(now)
            .map_err(|e| ServiceError::Store(StoreError::Corrupt(e.to_string())))?;
        Ok((record, state))
    }

    /// Loads a new spray into the gate, so the first receivers do not all rebuild it. The
    /// keys come from what was just written (every share free, nobody received), so no
    /// read of it is needed. Best effort: if Redis is down, the first claim rebuilds it.
    async fn prime_gate(&self, spray_id: i64, spray: &NewSpray) {
        let Some(gate) = &self.gate else { return };
        let Ok(recipient_count) = u32::try_from(spray.shares.len()) else {
            return;
        };
        let snapshot = GateSnapshot {
            spray_id,
            owner: spray.owner,
            receive_until: spray.receive_until,
            lookup_until: spray.lookup_until,
            recipient_count,
            free_slots: (0..i64::from(recipient_count)).collect(),
            receivers: Vec::new(),
        };
        let keys = gate.keys(&spray.room, &spray.token);
        let _ = gate.rebuild(&keys, &snapshot, spray.created_at).await;
    }

    /// The claim with the Redis gate in front (`../shared/DESIGN.md` section 2). Redis
    /// answers the refusals it can prove and hands out a slot; SQL records the slot with a
    /// point update. Whenever Redis cannot answer, or its view proves stale, the claim
    /// takes the SQL-only path, which decides on its own.
    async fn claim_through_gate(
        &self,
        gate: &RedisGate,
        claim: &Claim,
        idempotency: Option<&IdempotencyWrite<'_>>,
    ) -> Result<ClaimOutcome, StoreError> {
        let keys = gate.keys(&claim.room, &claim.token);
        // One rebuild per request at most: if the keys vanish again at once (Redis being
        // flushed over and over), SQL alone answers.
        for _ in 0..2 {
            let Ok(verdict) = gate.claim(&keys, claim.user, claim.now).await else {
                return self.sql_claim(claim, idempotency).await;
            };
            let refused = |refusal| {
                telemetry::record_gate_hit();
                Ok(ClaimOutcome::Refused(refusal))
            };
            match verdict {
                GateVerdict::Missing => {
                    telemetry::record_gate_miss();
                    let Some(snapshot) = self.store.gate_snapshot(&claim.room, &claim.token).await? else {
                        return Ok(ClaimOutcome::Refused(ReceiveRefusal::NotFound));
                    };
                    // A closed spray is not worth loading: SQL answers its few late callers.
                    if !window_open(claim.now, snapshot.receive_until)
                        || gate.rebuild(&keys, &snapshot, claim.now).await.is_err()
                    {
                        return self.sql_claim(claim, idempotency).await;
                    }
                    telemetry::record_gate_rebuild();
                }
                GateVerdict::OwnSpray { .. } => return refused(ReceiveRefusal::OwnSpray),
                GateVerdict::Expired { .. } => return refused(ReceiveRefusal::Expired),
                GateVerdict::Exhausted { shares, .. } => {
                    return refused(ReceiveRefusal::Exhausted { shares });
                }
                GateVerdict::AlreadyHeld { spray_id, slot } => {
                    // Only SQL can say someone received: confirm before refusing.
                    if self.store.share_of(spray_id, claim.user).await?.is_some() {
                        return refused(ReceiveRefusal::AlreadyReceived);
                    }
                    // The gate handed this user a slot that SQL never recorded (a crash
                    // between the two steps): this retry completes that claim.
                    return self
                        .record_slot(gate, &keys, claim, spray_id, slot, idempotency)
                        .await;
                }
                GateVerdict::Slot { spray_id, slot } => {
                    telemetry::record_gate_hit();
                    return self
                        .record_slot(gate, &keys, claim, spray_id, slot, idempotency)
                        .await;
                }
            }
        }
        self.sql_claim(claim, idempotency).await
    }

    /// The SQL-only claim, when the gate cannot help.
    async fn sql_claim(
        &self,
        claim: &Claim,
        idempotency: Option<&IdempotencyWrite<'_>>,
    ) -> Result<ClaimOutcome, StoreError> {
        telemetry::record_gate_fallback();
        time_store("claim_share", self.store.claim_share(claim, idempotency)).await
    }

    /// Records in SQL the slot the gate handed out, and repairs the gate when SQL disagrees.
    async fn record_slot(
        &self,
        gate: &RedisGate,
        keys: &SprayKeys,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&IdempotencyWrite<'_>>,
    ) -> Result<ClaimOutcome, StoreError> {
        match time_store(
            "claim_slot",
            self.store.claim_slot(claim, spray_id, slot, idempotency),
        )
        .await
        {
            Ok(SlotClaim::Received(amount)) => Ok(ClaimOutcome::Received(amount)),
            Ok(SlotClaim::Taken) => {
                // The gate's view was stale (rebuilt from an older read, or a claim went
                // through SQL alone): drop our hold and let SQL find a free share.
                let _ = gate.forget(keys, claim.user, slot).await;
                self.sql_claim(claim, idempotency).await
            }
            Ok(SlotClaim::AlreadyReceived) => {
                // The user got a share through SQL alone; this slot is still free.
                let _ = gate.release(keys, claim.user, slot).await;
                Ok(ClaimOutcome::Refused(ReceiveRefusal::AlreadyReceived))
            }
            Ok(SlotClaim::Closed) => Ok(ClaimOutcome::Refused(ReceiveRefusal::Expired)),
            Err(error) => {
                // SQL could not record it: give the slot back, answer 503, let them retry.
                let _ = gate.release(keys, claim.user, slot).await;
                Err(error)
            }
        }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}
