//! The gate's claims, gathered. A hot spray's receivers arrive by the hundred at once, and
//! every one used to be a `CLAIM` call of its own, about 22 µs of Redis's time each under
//! the winners workload (`INFO commandstats`), most of it the script's fourteen calls into
//! Redis. So the claims on one spray waiting at once go to Redis as one call, which
//! decides each of them exactly as a call of its own would have, one after the other, and
//! does once what each call would repeat (see `gate::scripts::CLAIM`): 12 µs a claim,
//! measured the same way, and one round trip from this process instead of a dozen.
//!
//! Nothing waits on purpose for a batch to fill: a lane sends what is waiting as soon as
//! it has a call to spare ([`IN_FLIGHT`]), so under light load a call holds one claim,
//! and under heavy load calls grow by themselves. A spray's claims all go through one
//! lane; other sprays' claims go through other lanes meanwhile.
//!
//! A call that fails fails each claim in it, and each takes the SQL-only path, as it did
//! when the call was its own.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::domain::UserId;
use crate::gate::{CLAIM_AT_ONCE, GateKeys, GateUnavailable, GateVerdict, RedisGate};

/// Lanes, each with its own queue.
const LANES: usize = 4;
/// Calls a lane has in flight at once. One would leave Redis idle for a hot spray while
/// its answer travels back and the next batch is sent; its claims would wait for that.
/// Calls in flight together may reach Redis in either order: claims that arrive together
/// were never ordered (each used to be a call of its own, sent concurrently).
const IN_FLIGHT: usize = 2;
/// Claims waiting per lane; past this, claims wait to queue.
const QUEUE: usize = 4096;

type Verdict = Result<GateVerdict, GateUnavailable>;

/// One claim waiting for its verdict.
struct Pending {
    keys: GateKeys,
    user: UserId,
    now: DateTime<Utc>,
    verdict: oneshot::Sender<Verdict>,
}

/// The queues in front of the tasks that call the gate.
pub(super) struct GatheredClaims {
    lanes: Vec<mpsc::Sender<Pending>>,
    /// Picks a spray's lane.
    hasher: RandomState,
}

impl GatheredClaims {
    /// Starts the lanes' tasks; they end when the `GatheredClaims` is dropped. A hold
    /// older than `lease` is taken over when no slot is free.
    pub(super) fn start(gate: Arc<RedisGate>, lease: TimeDelta) -> GatheredClaims {
        let lanes = (0..LANES)
            .map(|_| {
                let (queue, mut waiting) = mpsc::channel::<Pending>(QUEUE);
                let gate = gate.clone();
                tokio::spawn(async move {
                    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
                    let mut gathered = Vec::with_capacity(CLAIM_AT_ONCE);
                    loop {
                        let Ok(turn) = in_flight.clone().acquire_owned().await else {
                            return;
                        };
                        if waiting.recv_many(&mut gathered, CLAIM_AT_ONCE).await == 0 {
                            return;
                        }
                        // In a task of its own, so that a bug that panics costs the claims of
                        // one call (answered by SQL alone), not the lane.
                        let call = tokio::spawn(claim_gathered(gate.clone(), lease, std::mem::take(&mut gathered)));
                        tokio::spawn(async move {
                            if let Err(failed) = call.await {
                                tracing::error!(error = %failed, "a gathered gate call panicked; its claims took the SQL path");
                            }
                            drop(turn);
                        });
                    }
                });
                queue
            })
            .collect();
        GatheredClaims {
            lanes,
            hasher: RandomState::new(),
        }
    }

    /// The gate's verdict on the user's claim at `now`, decided with the claims on the
    /// same spray waiting at the same time.
    pub(super) async fn claim(&self, keys: &GateKeys, user: UserId, now: DateTime<Utc>) -> Verdict {
        let lanes = u64::try_from(self.lanes.len()).unwrap_or(1);
        let lane = usize::try_from(self.hasher.hash_one(&keys.meta) % lanes).unwrap_or(0);
        let (verdict, answer) = oneshot::channel();
        let pending = Pending {
            keys: keys.clone(),
            user,
            now,
            verdict,
        };
        if self.lanes[lane].send(pending).await.is_err() {
            return Err(GateUnavailable("the gate's claim queue has stopped".into()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(GateUnavailable(
                "the gate's claim queue stopped before answering".into(),
            ))
        })
    }
}

/// One `CLAIM` call per spray, all at once; each claim is told its own verdict.
async fn claim_gathered(gate: Arc<RedisGate>, lease: TimeDelta, gathered: Vec<Pending>) {
    // Each spray's claims in the order they came, under the keys they brought.
    let mut by_spray: HashMap<GateKeys, Vec<Asked>> = HashMap::new();
    for Pending {
        keys,
        user,
        now,
        verdict,
    } in gathered
    {
        by_spray
            .entry(keys)
            .or_default()
            .push(Asked { user, now, verdict });
    }
    let calls = by_spray.into_iter().map(|(keys, claims)| {
        let gate = &gate;
        async move {
            let asked: Vec<(UserId, DateTime<Utc>)> = claims.iter().map(|c| (c.user, c.now)).collect();
            match gate.claim_many(&keys, &asked, lease).await {
                Ok(verdicts) => {
                    for (claim, verdict) in claims.into_iter().zip(verdicts) {
                        let _ = claim.verdict.send(verdict);
                    }
                }
                Err(failed) => {
                    for claim in claims {
                        let _ = claim.verdict.send(Err(GateUnavailable(failed.0.clone())));
                    }
                }
            }
        }
    });
    futures_util::future::join_all(calls).await;
}

/// A claim in its spray's call: a [`Pending`] without the keys its call holds.
struct Asked {
    user: UserId,
    now: DateTime<Utc>,
    verdict: oneshot::Sender<Verdict>,
}
