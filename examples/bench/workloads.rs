//! The workloads, each a [`Workload`]: what its n-th request is and how its answer is
//! judged. Every user id comes from one counter per run, so no two requests of a run
//! share a sprayer or a receiver unless the workload means them to.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http::{Call, Http};
use crate::load::{Answer, Pending, Workload};

/// Fresh user ids, never reused within a run (across workloads and rounds).
pub struct Ids(AtomicI64);

impl Ids {
    pub fn new() -> Self {
        Ids(AtomicI64::new(1_000))
    }

    pub fn next(&self) -> i64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// `count` consecutive fresh ids; the first.
    pub fn block(&self, count: u64) -> i64 {
        self.0
            .fetch_add(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed)
    }
}

/// Creates one spray; its token.
pub async fn create_spray(
    http: &mut Http,
    base: &str,
    owner: i64,
    room: &str,
    amount: u64,
    shares: u64,
) -> Option<String> {
    let owner = owner.to_string();
    let call = Call::post(
        "/api/v1/spray".into(),
        vec![("x-user-id", &owner), ("x-room-id", room)],
        &json!({"amount": amount, "recipient_count": shares}),
    );
    let (status, body) = http.send(base, call).await?;
    if status != 201 {
        return None;
    }
    let body: Value = serde_json::from_slice(&body).ok()?;
    body["token"].as_str().map(str::to_owned)
}

async fn receive(http: &mut Http, base: &str, user: i64, room: &str, token: &str) -> (Answer, u64) {
    let user = user.to_string();
    let call = Call::post(
        "/api/v1/receive".into(),
        vec![("x-user-id", &user), ("x-room-id", room)],
        &json!({"token": token}),
    );
    match http.send(base, call).await {
        Some((200, body)) => {
            let amount = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["received_amount"].as_u64());
            match amount {
                Some(amount) => (Answer::Ok, amount),
                None => (Answer::Error, 0),
            }
        }
        Some((409, _)) => (Answer::Expected, 0),
        _ => (Answer::Error, 0),
    }
}

/// A lookup of `token` by its sprayer `owner` in `room`: 200 or an error.
async fn lookup(http: &mut Http, base: &str, owner: i64, room: &str, token: &str) -> Answer {
    let owner = owner.to_string();
    let call = Call::get(
        format!("/api/v1/spray/{token}"),
        vec![("x-user-id", &owner), ("x-room-id", room)],
    );
    match http.send(base, call).await {
        Some((200, _)) => Answer::Ok,
        _ => Answer::Error,
    }
}

/// `GET /healthz`: the HTTP floor of the same server.
pub struct Healthz {
    pub base: String,
}

impl Workload for Healthz {
    fn servers(&self) -> Vec<String> {
        vec![self.base.clone()]
    }

    fn request(self: Arc<Self>, http: &mut Http, _n: u64) -> Pending<'_> {
        Box::pin(async move {
            let answer = http
                .send(&self.base, Call::get("/healthz".into(), Vec::new()))
                .await;
            Some(match answer {
                Some((200, _)) => Answer::Ok,
                _ => Answer::Error,
            })
        })
    }
}

/// Sprays of 5 shares, each by a fresh sprayer in a fresh room.
pub struct Create {
    pub base: String,
    pub ids: Arc<Ids>,
}

impl Workload for Create {
    fn servers(&self) -> Vec<String> {
        vec![self.base.clone()]
    }

    fn request(self: Arc<Self>, http: &mut Http, _n: u64) -> Pending<'_> {
        Box::pin(async move {
            let owner = self.ids.next();
            let room = format!("c{owner}");
            let token = create_spray(http, &self.base, owner, &room, 5_000, 5).await;
            // A token is three characters: anything else is a wrong answer.
            Some(match token {
                Some(token) if token.len() == 3 => Answer::Ok,
                _ => Answer::Error,
            })
        })
    }
}

/// The sprayer looks up one spray (5 shares, all received) again and again.
pub struct Lookup {
    pub base: String,
    pub owner: i64,
    pub room: String,
    pub token: String,
}

impl Lookup {
    /// Creates the spray and has five users receive it.
    pub async fn prepare(base: &str, ids: &Ids) -> Option<Lookup> {
        let mut http = Http::new();
        let owner = ids.next();
        let room = format!("l{owner}");
        let token = create_spray(&mut http, base, owner, &room, 5_000, 5).await?;
        for _ in 0..5 {
            let (answer, _) = receive(&mut http, base, ids.next(), &room, &token).await;
            if answer != Answer::Ok {
                return None;
            }
        }
        Some(Lookup {
            base: base.to_owned(),
            owner,
            room,
            token,
        })
    }
}

impl Workload for Lookup {
    fn servers(&self) -> Vec<String> {
        vec![self.base.clone()]
    }

    fn request(self: Arc<Self>, http: &mut Http, _n: u64) -> Pending<'_> {
        Box::pin(async move { Some(lookup(http, &self.base, self.owner, &self.room, &self.token).await) })
    }
}

/// Distinct users receive one spray: the hot spray (many more users than shares: mostly
/// losers) and the winners run (as many users as shares: all winners).
pub struct Race {
    pub base: String,
    pub room: String,
    pub token: String,
    pub amount: u64,
    /// How many users come, each once.
    pub users: u64,
    first_user: i64,
    paid: AtomicU64,
    /// When each winner's answer came, for the rate over the first and the last shares.
    won_at: Mutex<Vec<Instant>>,
    /// When the first and the last loser's answer came, and how many losers.
    lost: Mutex<(Option<Instant>, Option<Instant>, u64)>,
}

impl Race {
    pub async fn prepare(base: &str, ids: &Ids, shares: u64, users: u64) -> Option<Race> {
        let owner = ids.next();
        let room = format!("h{owner}");
        let amount = shares * 20;
        let token = create_spray(&mut Http::new(), base, owner, &room, amount, shares).await?;
        Some(Race {
            base: base.to_owned(),
            room,
            token,
            amount,
            users,
            first_user: ids.block(users),
            paid: AtomicU64::new(0),
            won_at: Mutex::new(Vec::with_capacity(usize::try_from(shares).unwrap_or(0))),
            lost: Mutex::new((None, None, 0)),
        })
    }

    pub fn paid(&self) -> u64 {
        self.paid.load(Ordering::Relaxed)
    }

    /// Losers answered per second once they began: from the first loser's answer to the
    /// last's (the spray is then exhausted, so this is the rate of the refusal path alone).
    pub fn losers_per_second(&self) -> Option<f64> {
        let (first, last, count) = *self.lost.lock().expect("not poisoned");
        match (first, last) {
            (Some(first), Some(last)) if last > first => Some(crate::load::rate(count, last - first)),
            _ => None,
        }
    }

    /// When each winner's answer came, in order.
    pub fn won_at(&self) -> Vec<Instant> {
        let mut all = self.won_at.lock().expect("not poisoned").clone();
        all.sort();
        all
    }
}

impl Workload for Race {
    fn servers(&self) -> Vec<String> {
        vec![self.base.clone()]
    }

    fn request(self: Arc<Self>, http: &mut Http, n: u64) -> Pending<'_> {
        Box::pin(async move {
            if n >= self.users {
                return None;
            }
            let user = self.first_user + i64::try_from(n).unwrap_or(i64::MAX);
            let (answer, amount) = receive(http, &self.base, user, &self.room, &self.token).await;
            if answer == Answer::Ok {
                self.paid.fetch_add(amount, Ordering::Relaxed);
                self.won_at.lock().expect("not poisoned").push(Instant::now());
            }
            if answer == Answer::Expected {
                let now = Instant::now();
                let mut lost = self.lost.lock().expect("not poisoned");
                lost.0.get_or_insert(now);
                lost.1 = Some(now);
                lost.2 += 1;
            }
            Some(answer)
        })
    }
}

/// A spray of the mixed workload and what its receivers were paid.
struct MixedSpray {
    base: usize,
    owner: i64,
    room: String,
    token: String,
    amount: u64,
    shares: u64,
    receivers: u64,
    paid: AtomicU64,
    winners: AtomicU64,
    /// Receivers answered so far, and whether any of them got an error.
    answered: AtomicU64,
    failed: AtomicU64,
}

enum Task {
    Receive(Arc<MixedSpray>, i64),
    Lookup(Arc<MixedSpray>),
}

struct Due {
    at: Instant,
    seq: u64,
    task: Task,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A real evening: sprays of 2 to 50 shares in thousands of rooms, each followed by its
/// receivers (a fifth more than shares, so most sprays are taken in full and some users
/// lose) arriving over the next seconds, and two lookups by its sprayer. Requests go to
/// the instances in turn. A connection sends whatever is due, else creates a new spray.
pub struct Mixed {
    bases: Vec<String>,
    ids: Arc<Ids>,
    rooms: u64,
    arrivals: Duration,
    due: Mutex<BinaryHeap<Due>>,
    seq: AtomicU64,
    sprays: Mutex<Vec<Arc<MixedSpray>>>,
}

/// What the mixed run proved about money.
pub struct MixedCheck {
    pub sprays: usize,
    /// Sprays whose every receiver was answered without error: paid exactly their amount
    /// with exactly their shares taken.
    pub settled: usize,
    pub exact: usize,
    /// Sprays paid more than their amount or more shares than they have (must be 0).
    pub overpaid: usize,
}

impl Mixed {
    pub fn new(bases: Vec<String>, ids: Arc<Ids>, rooms: u64, arrivals: Duration) -> Self {
        Mixed {
            bases,
            ids,
            rooms,
            arrivals,
            due: Mutex::new(BinaryHeap::new()),
            seq: AtomicU64::new(0),
            sprays: Mutex::new(Vec::new()),
        }
    }

    fn schedule(&self, at: Instant, task: Task) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.due.lock().expect("not poisoned").push(Due { at, seq, task });
    }

    fn next_due(&self) -> Option<Task> {
        let mut due = self.due.lock().expect("not poisoned");
        if due.peek().is_some_and(|d| d.at <= Instant::now()) {
            due.pop().map(|d| d.task)
        } else {
            None
        }
    }

    async fn spray(&self, http: &mut Http, n: u64) -> Answer {
        let base = usize::try_from(n).unwrap_or(0) % self.bases.len();
        let owner = self.ids.next();
        let room = format!("m{}", rand::random_range(0..self.rooms));
        let shares = rand::random_range(2..=50u64);
        let amount = shares * rand::random_range(100..=1_000u64);
        let Some(token) = create_spray(http, &self.bases[base], owner, &room, amount, shares).await else {
            return Answer::Error;
        };
        let receivers = shares + shares / 5 + 1;
        let spray = Arc::new(MixedSpray {
            base,
            owner,
            room,
            token,
            amount,
            shares,
            receivers,
            paid: AtomicU64::new(0),
            winners: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let now = Instant::now();
        let first = self.ids.block(receivers);
        for i in 0..receivers {
            let at = now + self.arrivals.mul_f64(rand::random::<f64>());
            let user = first + i64::try_from(i).unwrap_or(0);
            self.schedule(at, Task::Receive(spray.clone(), user));
        }
        for _ in 0..2 {
            let at = now + self.arrivals.mul_f64(0.5 + rand::random::<f64>());
            self.schedule(at, Task::Lookup(spray.clone()));
        }
        self.sprays.lock().expect("not poisoned").push(spray);
        Answer::Ok
    }

    pub fn check(&self) -> MixedCheck {
        let sprays = self.sprays.lock().expect("not poisoned");
        let mut check = MixedCheck {
            sprays: sprays.len(),
            settled: 0,
            exact: 0,
            overpaid: 0,
        };
        for spray in sprays.iter() {
            let (paid, winners) = (
                spray.paid.load(Ordering::Relaxed),
                spray.winners.load(Ordering::Relaxed),
            );
            if paid > spray.amount || winners > spray.shares {
                check.overpaid += 1;
            }
            let all_answered = spray.answered.load(Ordering::Relaxed) == spray.receivers;
            if all_answered && spray.failed.load(Ordering::Relaxed) == 0 {
                check.settled += 1;
                if paid == spray.amount && winners == spray.shares {
                    check.exact += 1;
                }
            }
        }
        check
    }
}

impl Workload for Mixed {
    fn servers(&self) -> Vec<String> {
        self.bases.clone()
    }

    fn request(self: Arc<Self>, http: &mut Http, n: u64) -> Pending<'_> {
        Box::pin(async move {
            Some(match self.next_due() {
                Some(Task::Receive(spray, user)) => {
                    let base = &self.bases[usize::try_from(n).unwrap_or(0) % self.bases.len()];
                    let (answer, amount) = receive(http, base, user, &spray.room, &spray.token).await;
                    if answer == Answer::Ok {
                        spray.paid.fetch_add(amount, Ordering::Relaxed);
                        spray.winners.fetch_add(1, Ordering::Relaxed);
                    }
                    if answer == Answer::Error {
                        spray.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    spray.answered.fetch_add(1, Ordering::Relaxed);
                    answer
                }
                Some(Task::Lookup(spray)) => {
                    let base = &self.bases[spray.base];
                    lookup(http, base, spray.owner, &spray.room, &spray.token).await
                }
                None => self.spray(http, n).await,
            })
        })
    }
}
