//! The hot spray of the issue: a 300-share spray that many members race for at once,
//! across all instances, when one instance (or MariaDB) is killed with -9; then more members arriving
//! one by one for 18 s, so that any share left held for a request that died is seen by
//! members who come after the claim lease (and are told the truth or not). The next fault
//! waits for them: a Redis fault would rebuild the gate from SQL and free those shares.
//!
//! Every request goes into the history; the checker judges them like the load's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinSet;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::history::{Call, Endpoint, Record, send};
use super::inject::Probe;
use super::load::{PATIENT, Targets, backoff};

/// A room of its own, apart from the load's and the probes'.
pub const HOT_ROOM: &str = "HOT";
const HOT_SHARES: u64 = 300;
const HOT_AMOUNT: u64 = 300_000;
/// Members racing at once when the instance is killed.
const RACERS: u64 = 200;
/// Attempts of a keyed racer (about 30 s of back-off in all: longer than the lease after
/// the kill, so that a key still blocked then is seen).
const KEYED_ATTEMPTS: u32 = 13;
/// The kill comes once this many racers have been answered, so that many are in flight.
const ANSWERED_BEFORE_KILL: usize = 30;
const WAIT_FOR_RACE: Duration = Duration::from_secs(3);
/// Members arriving one by one after the kill, over `LATE_SPAN`: more than the shares
/// left, so that the last are refused, long after any valid hold has lapsed.
const LATE: u64 = 300;
const LATE_SPAN: Duration = Duration::from_secs(18);

/// A race under way on a hot spray.
pub struct Race {
    token: String,
    /// The racers, with the retries of the keyed ones.
    pub racers: JoinSet<()>,
    /// The late members, once the fault is over.
    pub late: JoinSet<()>,
}

/// Sprays the hot spray and starts the race; returns once enough racers are answered
/// that the rest are mid-claim. `None` if the spray could not be made.
pub async fn start(probe: &Probe, targets: &Arc<Targets>) -> Option<Race> {
    let base = targets.get(0);
    let sprayed = send(
        &probe.client,
        &probe.history,
        Call {
            endpoint: Endpoint::Spray,
            instance: 0,
            base: &base,
            user: probe.ids.sprayer(),
            room: HOT_ROOM,
            key: None,
            body: json!({"amount": HOT_AMOUNT, "recipient_count": HOT_SHARES}),
            timeout: PATIENT,
            drop_after: None,
        },
    )
    .await;
    let token = sprayed.token.clone().filter(|_| sprayed.status() == Some(201))?;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for n in 0..RACERS {
        let (probe, targets, answered) = (probe.clone(), targets.clone(), answered.clone());
        let token = token.clone();
        let instance = usize::try_from(n).expect("a small number") % targets.len();
        // A third of the racers carry a key and retry under it when they get no answer,
        // a 5xx or "in progress": the retries of those cut off by the fault show whether
        // their keys are free again within the lease.
        let keyed = n % 3 == 0;
        tasks.spawn(async move {
            let user = probe.ids.receiver();
            let key = keyed.then(|| format!("hot-{user}"));
            let mut rng = StdRng::seed_from_u64(n);
            for attempt in 0..KEYED_ATTEMPTS {
                let record = receive(&probe, &targets, instance, &token, user, key.as_deref()).await;
                if attempt == 0 {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                let again = record.is_unknown()
                    || record.status().is_some_and(|s| s >= 500)
                    || record.is_code("IDEMPOTENCY_IN_PROGRESS");
                if key.is_none() || !again {
                    break;
                }
                backoff(&mut rng, attempt).await;
            }
        });
    }
    let began = Instant::now();
    while answered.load(Ordering::Relaxed) < ANSWERED_BEFORE_KILL && began.elapsed() < WAIT_FOR_RACE {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(Race {
        token,
        racers: tasks,
        late: JoinSet::new(),
    })
}

impl Race {
    /// After the fault: the late members, one by one, round the instances.
    pub fn late_members(&mut self, probe: &Probe, targets: &Arc<Targets>) {
        let (probe, targets, token) = (probe.clone(), targets.clone(), self.token.clone());
        let pause = LATE_SPAN / u32::try_from(LATE).expect("a small number");
        self.late.spawn(async move {
            // At a steady pace, whatever the answers' latency.
            let mut members = JoinSet::new();
            for n in 0..LATE {
                let instance = usize::try_from(n).expect("a small number") % targets.len();
                let (probe, targets, token) = (probe.clone(), targets.clone(), token.clone());
                members.spawn(async move {
                    let user = probe.ids.receiver();
                    receive(&probe, &targets, instance, &token, user, None).await;
                });
                tokio::time::sleep(pause).await;
            }
            while let Some(joined) = members.join_next().await {
                joined.expect("a late member");
            }
        });
    }
}

/// A patient member: the clients that give up are the load's; here the only requests
/// that die are those on the killed instance, so the lease is all that may excuse a
/// refusal once they are gone.
async fn receive(
    probe: &Probe,
    targets: &Targets,
    instance: usize,
    token: &str,
    user: i64,
    key: Option<&str>,
) -> Record {
    let base = targets.get(instance);
    send(
        &probe.client,
        &probe.history,
        Call {
            endpoint: Endpoint::Receive,
            instance,
            base: &base,
            user,
            room: HOT_ROOM,
            key,
            body: json!({"token": token}),
            timeout: PATIENT,
            drop_after: None,
        },
    )
    .await
}
