//! The mixed load: sprays of 1 to 1,000 shares in several rooms, each by a sprayer of its
//! own (so that the checker can tell which request made which spray), and receives by
//! users that are each used once per spray, except for retries. Some requests carry an
//! `Idempotency-Key` and are retried with it; some clients give up after a few
//! milliseconds (their own time-out, or the request future dropped). Bounded by a stop
//! flag, a deadline and a request count; traffic to 127.0.0.1 only.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use super::history::{Call, Endpoint, History, Outcome, Record, send};

/// A patient client's time-out: longer than the servers' request time-out, so that a
/// patient client always gets the server's own answer.
pub const PATIENT: Duration = Duration::from_secs(15);
/// Attempts of a request retried under its `Idempotency-Key` (about 30 s of back-off in
/// all: past the longest a key may stay blocked, so that a key blocked longer is seen).
const KEYED_ATTEMPTS: u32 = 13;
/// Live sprays the receivers are spread over.
const POOL: usize = 12;
/// A pause before trying another instance after a refused connection (one being restarted).
const REFUSED_PAUSE: Duration = Duration::from_millis(50);
/// Attempts of a receive retried without a key.
const UNKEYED_ATTEMPTS: u32 = 3;

/// The instances' current base URLs (an instance restarted after kill -9 may have moved).
#[derive(Default)]
pub struct Targets {
    bases: RwLock<Vec<String>>,
}

impl Targets {
    pub fn new(bases: Vec<String>) -> Targets {
        Targets {
            bases: RwLock::new(bases),
        }
    }

    pub fn set(&self, instance: usize, base: String) {
        self.bases.write().expect("targets lock")[instance] = base;
    }

    pub fn get(&self, instance: usize) -> String {
        self.bases.read().expect("targets lock")[instance].clone()
    }

    pub fn len(&self) -> usize {
        self.bases.read().expect("targets lock").len()
    }
}

/// Fresh user ids: sprayers, receivers and probes come from disjoint ranges and are
/// never reused, so every user id means one request (and its retries).
pub struct Ids {
    sprayer: AtomicI64,
    receiver: AtomicI64,
}

impl Default for Ids {
    fn default() -> Ids {
        Ids {
            sprayer: AtomicI64::new(1_000_000),
            receiver: AtomicI64::new(100_000_000),
        }
    }
}

impl Ids {
    pub fn sprayer(&self) -> i64 {
        self.sprayer.fetch_add(1, Ordering::Relaxed)
    }

    pub fn receiver(&self) -> i64 {
        self.receiver.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct LoadSettings {
    pub workers: usize,
    pub rooms: Vec<String>,
    /// The load stops at this deadline even if nobody sets the stop flag.
    pub deadline: Instant,
    pub max_requests: usize,
    pub seed: u64,
}

/// A spray that members are still asked to receive from.
struct Active {
    room: String,
    token: String,
    /// Distinct receivers still to send: a fifth more than the shares, so that sprays
    /// run out and `SPRAY_EXHAUSTED` is answered, rightly or not.
    receivers_left: u64,
}

pub struct Load {
    pub client: reqwest::Client,
    pub targets: Arc<Targets>,
    pub history: Arc<History>,
    pub ids: Arc<Ids>,
    pub stop: AtomicBool,
    sent: AtomicUsize,
    active: Mutex<Vec<Active>>,
    settings: LoadSettings,
}

impl Load {
    pub fn new(
        client: reqwest::Client,
        targets: Arc<Targets>,
        history: Arc<History>,
        ids: Arc<Ids>,
        settings: LoadSettings,
    ) -> Load {
        Load {
            client,
            targets,
            history,
            ids,
            stop: AtomicBool::new(false),
            sent: AtomicUsize::new(0),
            active: Mutex::new(Vec::new()),
            settings,
        }
    }

    fn done(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || Instant::now() >= self.settings.deadline
            || self.sent.load(Ordering::Relaxed) >= self.settings.max_requests
    }

    /// Runs the workers until the stop flag, the deadline or the request bound.
    pub async fn run(self: Arc<Self>) {
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..self.settings.workers {
            let load = self.clone();
            let seed = self.settings.seed
                ^ u64::try_from(worker)
                    .expect("a small worker number")
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            workers.spawn(async move { load.worker(StdRng::seed_from_u64(seed)).await });
        }
        while let Some(joined) = workers.join_next().await {
            joined.expect("a load worker");
        }
    }

    async fn worker(&self, mut rng: StdRng) {
        while !self.done() {
            let active = self.active.lock().expect("active lock").len();
            // A small pool of live sprays, refilled as they run out: the big ones (most of
            // the pool at any time, since they last longest) are received for tens of
            // seconds, across faults, as the hot sprays of the issue were. A few sprays
            // more are sent anyway, so that sprays too meet every fault.
            if active < POOL || (active < 2 * POOL && rng.random_bool(0.02)) {
                self.spray_flow(&mut rng).await;
            } else {
                self.receive_flow(&mut rng).await;
            }
        }
    }

    /// One request, on a random instance; `impatient` clients give up after 1 to 40 ms.
    async fn call(&self, rng: &mut StdRng, ask: &Ask<'_>, impatient: bool) -> Record {
        let Ask {
            endpoint,
            user,
            room,
            key,
            body,
        } = *ask;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let instance = rng.random_range(0..self.targets.len());
        let base = self.targets.get(instance);
        let patience = Duration::from_millis(rng.random_range(1..=40));
        let (timeout, drop_after) = match (impatient, rng.random_bool(0.5)) {
            (false, _) => (PATIENT, None),
            (true, true) => (patience, None),
            (true, false) => (PATIENT, Some(patience)),
        };
        send(
            &self.client,
            &self.history,
            Call {
                endpoint,
                instance,
                base: &base,
                user,
                room,
                key,
                body: body.clone(),
                timeout,
                drop_after,
            },
        )
        .await
    }

    fn shares(rng: &mut StdRng) -> u64 {
        match rng.random_range(0..100) {
            0..60 => rng.random_range(1..=20),
            60..85 => rng.random_range(21..=200),
            _ => rng.random_range(300..=1000),
        }
    }

    async fn spray_flow(&self, rng: &mut StdRng) {
        let sprayer = self.ids.sprayer();
        let room = self.settings.rooms[rng.random_range(0..self.settings.rooms.len())].clone();
        let count = Load::shares(rng);
        let amount = count * rng.random_range(1..=50) + rng.random_range(0..count);
        let mode = if rng.random_bool(0.5) { "even" } else { "random" };
        let body = json!({"amount": amount, "recipient_count": count, "mode": mode});
        let key = rng.random_bool(0.3).then(|| format!("s-{sprayer}"));
        let impatient = rng.random_bool(0.05);
        let ask = Ask {
            endpoint: Endpoint::Spray,
            user: sprayer,
            room: &room,
            key: key.as_deref(),
            body: &body,
        };
        for attempt in 0..KEYED_ATTEMPTS {
            let record = self.call(rng, &ask, impatient && attempt == 0).await;
            match &record.outcome {
                Outcome::Answered { status: 201, .. } => {
                    let token = record.token.clone().expect("a 201 carries a token");
                    self.active.lock().expect("active lock").push(Active {
                        room: room.clone(),
                        token,
                        receivers_left: count + count / 5 + 1,
                    });
                    return;
                }
                // Nothing reached a server: try again elsewhere.
                Outcome::NotSent => tokio::time::sleep(REFUSED_PAUSE).await,
                // Without a key a retry could spray twice: only keyed sprays retry.
                Outcome::Unknown { .. } if key.is_some() => backoff(rng, attempt).await,
                Outcome::Answered { status, code, .. }
                    if key.is_some()
                        && (*status >= 500 || code.as_deref() == Some("IDEMPOTENCY_IN_PROGRESS")) =>
                {
                    backoff(rng, attempt).await
                }
                _ => return,
            }
            if self.done() {
                return;
            }
        }
    }

    /// Takes one receiver's turn at a random active spray.
    fn pick_spray(&self, rng: &mut StdRng) -> Option<(String, String)> {
        let mut active = self.active.lock().expect("active lock");
        if active.is_empty() {
            return None;
        }
        let index = rng.random_range(0..active.len());
        let spray = &mut active[index];
        let picked = (spray.room.clone(), spray.token.clone());
        spray.receivers_left = spray.receivers_left.saturating_sub(1);
        if spray.receivers_left == 0 {
            active.swap_remove(index);
        }
        Some(picked)
    }

    async fn receive_flow(&self, rng: &mut StdRng) {
        let Some((room, token)) = self.pick_spray(rng) else {
            return;
        };
        let user = self.ids.receiver();
        let body = json!({"token": token});
        let key = rng.random_bool(0.3).then(|| format!("r-{user}"));
        let impatient = rng.random_bool(0.08);
        let attempts = if key.is_some() {
            KEYED_ATTEMPTS
        } else {
            UNKEYED_ATTEMPTS
        };
        let ask = Ask {
            endpoint: Endpoint::Receive,
            user,
            room: &room,
            key: key.as_deref(),
            body: &body,
        };
        for attempt in 0..attempts {
            let record = self.call(rng, &ask, impatient && attempt == 0).await;
            let retry = match &record.outcome {
                Outcome::NotSent => true,
                Outcome::Unknown { .. } => key.is_some() || rng.random_bool(0.5),
                Outcome::Answered { status, code, .. } => {
                    *status >= 500 || (key.is_some() && code.as_deref() == Some("IDEMPOTENCY_IN_PROGRESS"))
                }
            };
            if !retry || self.done() {
                return;
            }
            if record.outcome == Outcome::NotSent {
                tokio::time::sleep(REFUSED_PAUSE).await;
            } else {
                backoff(rng, attempt).await;
            }
        }
    }
}

/// One request of a user, sent again as is when retried.
#[derive(Clone, Copy)]
struct Ask<'a> {
    endpoint: Endpoint,
    user: i64,
    room: &'a str,
    key: Option<&'a str>,
    body: &'a serde_json::Value,
}

/// 250 ms doubling up to 3 s, with jitter.
pub async fn backoff(rng: &mut StdRng, attempt: u32) {
    let base = 250_u64.saturating_mul(1_u64 << attempt.min(4)).min(3_000);
    let jitter = rng.random_range(0..=base / 4);
    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
}
