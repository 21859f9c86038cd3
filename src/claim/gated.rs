//! The claim with the Redis gate in front (`docs/design.md` section 2).
//!
//! 1. Ask the gate (one atomic script, with the claims on the same spray waiting at the
//!    same time: `gathered.rs`): it answers the refusals it can prove (own spray,
//!    window closed, no share left or held) or hands out a slot no other claim holds.
//! 2. Keys missing (Redis restarted, flushed, evicted): rebuild them from SQL, ask again.
//! 3. "Already received" from the gate is confirmed by one SQL read before it is answered.
//! 4. SQL records the slot with a point update; the gate is told (confirm), or gets the
//!    slot back when SQL could not record it, or forgets it when SQL says it is taken.
//! 5. Whenever Redis cannot answer, or its view proves stale, the claim takes the
//!    SQL-only path, which decides on its own.
//!
//! Before all that, a spray this instance has seen taken for good answers its newcomers
//! and its sprayer from memory (`exhausted.rs`): the crowd that arrives after the last
//! share costs no Redis call.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::TimeDelta;

use super::confirmations::Confirmations;
use super::exhausted::ExhaustedSprays;
use super::gathered::GatheredClaims;
use super::{ClaimPath, RedisStatus};
use crate::domain::ReceiveRefusal;
use crate::domain::rules::window_open;
use crate::gate::{GateKeys, GateVerdict, RedisGate};
use crate::store::{Claim, ClaimOutcome, ClaimSnapshot, NewSpray, PendingKey, SlotClaim, Store, StoreError};
use crate::telemetry;

pub struct GatedClaim {
    store: Arc<dyn Store>,
    gate: Arc<RedisGate>,
    /// The claims waiting on the gate, asked many at a time per spray. A slot handed out
    /// may stay unrecorded for the claim lease before another claim takes it over.
    claims: GatheredClaims,
    /// The holds recorded in SQL, confirmed to the gate many at a time.
    confirmations: Confirmations,
    /// The sprays seen taken for good, answered without Redis until their window closes.
    exhausted: ExhaustedSprays,
}

impl GatedClaim {
    pub fn new(store: Arc<dyn Store>, gate: RedisGate, lease: TimeDelta) -> GatedClaim {
        let gate = Arc::new(gate);
        GatedClaim {
            store,
            claims: GatheredClaims::start(gate.clone(), lease),
            confirmations: Confirmations::start(gate.clone()),
            gate,
            exhausted: ExhaustedSprays::default(),
        }
    }

    /// The gate said the spray is taken for good: read it from Redis once and remember
    /// it. Best effort: if that fails, the next newcomer asks the gate again.
    async fn remember_exhausted(&self, keys: &GateKeys, claim: &Claim, spray_id: i64, shares: u32) {
        let Some(loading) = self
            .exhausted
            .start_loading(&claim.room, &claim.token, shares, claim.now)
        else {
            return;
        };
        if let Ok(spray) = self.gate.exhausted_spray(keys, spray_id).await {
            loading.remember(spray, claim.now);
        }
    }

    /// The SQL-only claim, when the gate cannot help.
    async fn sql_claim(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        telemetry::record_gate_fallback();
        self.store.claim_share(claim, idempotency).await
    }

    /// Records in SQL the slot the gate handed out, and tells the gate what became of it.
    async fn record_slot(
        &self,
        keys: &GateKeys,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        let recorded = self.store.claim_slot(claim, spray_id, slot, idempotency).await;
        match recorded {
            Ok(SlotClaim::Received(amount)) => {
                // If this is lost (Redis down), the hold is taken over after its lease and
                // SQL refuses the taker, who then falls back to SQL: slower, still exact.
                self.confirmations.confirm(keys, claim.user, slot).await;
                Ok(ClaimOutcome::Received(amount))
            }
            Ok(SlotClaim::Taken) => {
                // The gate's view was stale (rebuilt from an older read, a claim went
                // through SQL alone, or a late holder recorded a slot taken over): drop our
                // hold, list the share's holder (whom the gate may not know: their later
                // claims must be "already received", not "exhausted"), and let SQL find a
                // free share. If SQL cannot say who holds it, the hold stays: it is taken
                // over after the claim lease and that claim asks again (a spray with a hold
                // is never remembered as taken for good, see `exhausted.rs`).
                if let Ok(holder) = self.store.slot_holder(spray_id, slot).await {
                    let _ = self.gate.forget(keys, claim.user, slot, holder).await;
                }
                self.sql_claim(claim, idempotency).await
            }
            Ok(SlotClaim::AlreadyReceived) => {
                // The user got a share through SQL alone; this slot is still free, and the
                // user stays listed as a receiver.
                let _ = self.gate.release_to_others(keys, claim.user, slot).await;
                Ok(ClaimOutcome::Refused(ReceiveRefusal::AlreadyReceived))
            }
            Ok(SlotClaim::Closed) => Ok(ClaimOutcome::Refused(ReceiveRefusal::Expired)),
            Err(error) => {
                // SQL did not record it: give the slot back, answer 503, let them retry.
                let _ = self.gate.release(keys, claim.user, slot).await;
                Err(error)
            }
        }
    }
}

#[async_trait]
impl ClaimPath for GatedClaim {
    async fn claim(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        if let Some(refusal) = self
            .exhausted
            .refusal(&claim.room, &claim.token, claim.user, claim.now)
        {
            telemetry::record_gate_remembered();
            telemetry::record_claim_remembered();
            return Ok(ClaimOutcome::Refused(refusal));
        }
        let keys = self.gate.keys(&claim.room, &claim.token);
        // One rebuild per request at most: if the keys vanish again at once (Redis being
        // flushed over and over), SQL alone answers.
        for _ in 0..2 {
            let Ok(verdict) = self.claims.claim(&keys, claim.user, claim.now).await else {
                return self.sql_claim(claim, idempotency).await;
            };
            let refused = |refusal| {
                telemetry::record_gate_hit();
                Ok(ClaimOutcome::Refused(refusal))
            };
            match verdict {
                GateVerdict::Missing => {
                    telemetry::record_gate_miss();
                    let snapshot = self.store.claim_snapshot(&claim.room, &claim.token).await?;
                    let Some(snapshot) = snapshot else {
                        return Ok(ClaimOutcome::Refused(ReceiveRefusal::NotFound));
                    };
                    // A closed spray is not worth loading: SQL answers its few late callers.
                    if !window_open(claim.now, snapshot.receive_until)
                        || self.gate.rebuild(&keys, &snapshot, claim.now).await.is_err()
                    {
                        return self.sql_claim(claim, idempotency).await;
                    }
                    telemetry::record_gate_rebuild();
                }
                GateVerdict::OwnSpray { .. } => return refused(ReceiveRefusal::OwnSpray),
                GateVerdict::Expired { .. } => return refused(ReceiveRefusal::Expired),
                GateVerdict::Exhausted {
                    spray_id,
                    shares,
                    for_good,
                } => {
                    if for_good {
                        self.remember_exhausted(&keys, claim, spray_id, shares).await;
                    }
                    return refused(ReceiveRefusal::Exhausted { shares });
                }
                GateVerdict::AlreadyHeld { spray_id, slot } => {
                    // Only SQL can say someone received: confirm before refusing.
                    let share = self.store.share_of(spray_id, claim.user).await?;
                    if share.is_some() {
                        return refused(ReceiveRefusal::AlreadyReceived);
                    }
                    // The gate handed this user a slot that SQL never recorded (a crash
                    // between the two steps): this retry completes that claim.
                    return self.record_slot(&keys, claim, spray_id, slot, idempotency).await;
                }
                GateVerdict::Slot {
                    spray_id,
                    slot,
                    taken_over,
                } => {
                    telemetry::record_gate_hit();
                    if taken_over {
                        telemetry::record_gate_takeover();
                    }
                    return self.record_slot(&keys, claim, spray_id, slot, idempotency).await;
                }
            }
        }
        self.sql_claim(claim, idempotency).await
    }

    /// Loads a new spray into the gate, so the first receivers do not all rebuild it. The
    /// keys come from what was just written (every share free, nobody received), so no
    /// read of it is needed. Best effort: if Redis is down, the first claim rebuilds it.
    async fn sprayed(&self, spray_id: i64, spray: &NewSpray) {
        let Ok(recipient_count) = u32::try_from(spray.shares.len()) else {
            return;
        };
        let snapshot = ClaimSnapshot {
            spray_id,
            owner: spray.owner,
            receive_until: spray.receive_until,
            lookup_until: spray.lookup_until,
            recipient_count,
            free_slots: (0..i64::from(recipient_count)).collect(),
            receivers: Vec::new(),
        };
        let keys = self.gate.keys(&spray.room, &spray.token);
        let _ = self.gate.rebuild(&keys, &snapshot, spray.created_at).await;
    }

    async fn redis_status(&self) -> RedisStatus {
        if self.gate.ping().await {
            RedisStatus::Up
        } else {
            RedisStatus::Down
        }
    }
}
