//! The checker: what the history and the database, read directly, must show after a run
//! under faults. Each check returns the violations it found, each message naming the
//! spray, the user and the times, so that a failure says exactly what went wrong.
//!
//! Times in messages are seconds since the start of the run.

use std::collections::HashMap;

use super::history::{Endpoint, Outcome, Record, seconds};

/// The claim lease: a share handed to a claim that died goes back within it.
/// The default being introduced with `--claim-lease` (not passed: not on this branch).
pub const CLAIM_LEASE_MS: i64 = 5_000;
/// The idempotency lease: a key whose request ended without an answer is free again
/// within it. The default being introduced with `--idempotency-lease` (not passed).
pub const IDEMPOTENCY_LEASE_MS: i64 = 10_000;
/// The instances' `--request-timeout` (passed explicitly): no handler runs longer, so no
/// request starts a claim later than this after it began.
pub const REQUEST_TIMEOUT_MS: i64 = 10_000;
/// For the clocks of two processes read at slightly different moments, the millisecond
/// rounding of stored times, and a request waiting to be accepted by a busy server.
pub const SLACK_MS: i64 = 1_000;

#[derive(Clone, Debug)]
pub struct SprayRow {
    pub id: i64,
    pub room: String,
    pub token: String,
    pub owner: i64,
    pub total: i64,
    pub count: i64,
    pub settled_at: Option<i64>,
    pub refunded: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct ShareRow {
    pub spray_id: i64,
    pub slot: i64,
    pub amount: i64,
    pub receiver: Option<i64>,
    pub received_at: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct LedgerRow {
    pub spray_id: i64,
    pub kind: String,
    pub user: i64,
    pub amount: i64,
}

/// The database, read once after the run.
pub struct Store {
    pub sprays: Vec<SprayRow>,
    pub shares: Vec<ShareRow>,
    pub ledger: Vec<LedgerRow>,
    /// Idempotency rows still pending (no answer kept) at the end.
    pub pending_keys: i64,
}

type SprayTuple = (i64, String, String, i64, i64, i64, Option<i64>, Option<i64>);
type ShareTuple = (i64, i64, i64, Option<i64>, Option<i64>);
type LedgerTuple = (i64, String, i64, i64);

const SPRAYS_SQL: &str = "SELECT id, room_id, token, owner_id, total_amount, recipient_count, settled_at, refunded_amount FROM sprays";
const SHARES_SQL: &str = "SELECT spray_id, slot, amount, receiver_id, received_at FROM shares";
const LEDGER_SQL: &str = "SELECT spray_id, kind, user_id, amount FROM ledger";
const PENDING_SQL: &str = "SELECT COUNT(*) FROM idempotency WHERE status_code IS NULL AND effect IS NULL";

/// The same reads on either backend (the pools are of different types).
macro_rules! read_store {
    ($pool:expr) => {{
        let pool = $pool;
        let sprays: Vec<SprayTuple> = sqlx::query_as(SPRAYS_SQL).fetch_all(pool).await?;
        let shares: Vec<ShareTuple> = sqlx::query_as(SHARES_SQL).fetch_all(pool).await?;
        let ledger: Vec<LedgerTuple> = sqlx::query_as(LEDGER_SQL).fetch_all(pool).await?;
        let pending_keys: i64 = sqlx::query_scalar(PENDING_SQL).fetch_one(pool).await?;
        Store::from_tuples(sprays, shares, ledger, pending_keys)
    }};
}

impl Store {
    fn from_tuples(
        sprays: Vec<SprayTuple>,
        shares: Vec<ShareTuple>,
        ledger: Vec<LedgerTuple>,
        pending_keys: i64,
    ) -> Store {
        Store {
            sprays: sprays
                .into_iter()
                .map(
                    |(id, room, token, owner, total, count, settled_at, refunded)| SprayRow {
                        id,
                        room,
                        token,
                        owner,
                        total,
                        count,
                        settled_at,
                        refunded,
                    },
                )
                .collect(),
            shares: shares
                .into_iter()
                .map(|(spray_id, slot, amount, receiver, received_at)| ShareRow {
                    spray_id,
                    slot,
                    amount,
                    receiver,
                    received_at,
                })
                .collect(),
            ledger: ledger
                .into_iter()
                .map(|(spray_id, kind, user, amount)| LedgerRow {
                    spray_id,
                    kind,
                    user,
                    amount,
                })
                .collect(),
            pending_keys,
        }
    }

    pub async fn read_mysql(url: &str) -> Result<Store, sqlx::Error> {
        let pool = sqlx::MySqlPool::connect(url).await?;
        let store = read_store!(&pool);
        pool.close().await;
        Ok(store)
    }

    pub async fn read_sqlite(url: &str) -> Result<Store, sqlx::Error> {
        let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=ro")).await?;
        let store = read_store!(&pool);
        pool.close().await;
        Ok(store)
    }
}

/// The result of one check.
pub struct Check {
    pub name: &'static str,
    pub violations: Vec<String>,
    /// Figures worth reporting whether or not it passed.
    pub figures: String,
}

/// The history and the store, indexed for the checks.
struct Index<'a> {
    origin: i64,
    records: &'a [Record],
    store: &'a Store,
    spray_at: HashMap<(&'a str, &'a str), &'a SprayRow>,
    shares_of: HashMap<i64, Vec<&'a ShareRow>>,
    share_of_user: HashMap<(i64, i64), &'a ShareRow>,
    /// Receive requests by (spray id, user).
    receives: HashMap<(i64, i64), Vec<&'a Record>>,
    /// Receive requests by spray id.
    receives_of: HashMap<i64, Vec<&'a Record>>,
    /// Spray requests by sprayer.
    sprays_by: HashMap<i64, Vec<&'a Record>>,
    /// Requests by (user, endpoint, key).
    keyed: HashMap<(i64, Endpoint, &'a str), Vec<&'a Record>>,
    /// A user with two shares of one spray, found while indexing.
    duplicates: Vec<String>,
}

impl<'a> Index<'a> {
    fn new(records: &'a [Record], store: &'a Store, origin: i64) -> Index<'a> {
        let mut spray_at: HashMap<(&str, &str), &SprayRow> = HashMap::new();
        for spray in &store.sprays {
            // All sprays of a run are live, so (room, token) names one; keep the newest.
            let entry = spray_at
                .entry((spray.room.as_str(), spray.token.as_str()))
                .or_insert(spray);
            if spray.id > entry.id {
                *entry = spray;
            }
        }
        let mut shares_of: HashMap<i64, Vec<&ShareRow>> = HashMap::new();
        let mut share_of_user = HashMap::new();
        let mut duplicates = Vec::new();
        for share in &store.shares {
            shares_of.entry(share.spray_id).or_default().push(share);
            if let Some(user) = share.receiver
                && let Some(other) = share_of_user.insert((share.spray_id, user), share)
            {
                duplicates.push(format!(
                    "user {user} holds two shares of spray {}: slots {} and {}",
                    share.spray_id, other.slot, share.slot
                ));
            }
        }
        let mut index = Index {
            origin,
            records,
            store,
            spray_at,
            shares_of,
            share_of_user,
            receives: HashMap::new(),
            receives_of: HashMap::new(),
            sprays_by: HashMap::new(),
            keyed: HashMap::new(),
            duplicates,
        };
        for record in records {
            match record.endpoint {
                Endpoint::Receive => {
                    if let Some(spray) = index.spray_of(record) {
                        index
                            .receives
                            .entry((spray.id, record.user))
                            .or_default()
                            .push(record);
                        index.receives_of.entry(spray.id).or_default().push(record);
                    }
                }
                Endpoint::Spray => index.sprays_by.entry(record.user).or_default().push(record),
            }
            if let Some(key) = record.key.as_deref() {
                index
                    .keyed
                    .entry((record.user, record.endpoint, key))
                    .or_default()
                    .push(record);
            }
        }
        index
    }

    fn spray_of(&self, record: &Record) -> Option<&'a SprayRow> {
        let token = record.token.as_deref()?;
        self.spray_at.get(&(record.room.as_str(), token)).copied()
    }

    fn at(&self, ms: i64) -> f64 {
        seconds(ms - self.origin)
    }

    fn describe(&self, record: &Record) -> String {
        record.describe(self.origin)
    }

    fn name(spray: &SprayRow) -> String {
        format!(
            "spray {}/{} (id {}, {} shares)",
            spray.room, spray.token, spray.id, spray.count
        )
    }
}

/// When an instance was killed with -9: (instance, time of the kill).
pub type Kills = [(usize, i64)];

/// The last moment a request may have been running on its server: its answer, or without
/// one, its request time-out, or the kill of its instance if that came first (the kill is
/// taken a little late, by SLACK_MS, to be sure the process was gone). The server's
/// request time-out starts when it reads the request, which is after the client's start.
fn ran_until(r: &Record, kills: &Kills) -> i64 {
    if let Outcome::Answered { .. } = r.outcome {
        return r.end;
    }
    let timeout = r.start + REQUEST_TIMEOUT_MS + SLACK_MS;
    kills
        .iter()
        .filter(|(instance, at)| *instance == r.instance && *at >= r.start)
        .map(|(_, at)| at + SLACK_MS)
        .fold(timeout, i64::min)
}

pub fn check_all(records: &[Record], store: &Store, origin: i64, kills: &Kills) -> Vec<Check> {
    let index = Index::new(records, store, origin);
    vec![
        acknowledged_receipts_are_recorded(&index),
        acknowledged_sprays_are_recorded(&index),
        shares_and_ledger_balance(&index),
        failed_requests_changed_nothing(&index),
        already_received_only_to_recipients(&index),
        exhausted_only_within_the_claim_lease(&index, kills),
        keys_blocked_only_within_their_lease(&index, kills),
    ]
}

fn acknowledged_receipts_are_recorded(index: &Index) -> Check {
    let mut violations = Vec::new();
    let mut acknowledged = 0;
    for record in index
        .records
        .iter()
        .filter(|r| r.endpoint == Endpoint::Receive && r.status() == Some(200))
    {
        acknowledged += 1;
        let amount = record.amount.and_then(|a| i64::try_from(a).ok());
        let Some(spray) = index.spray_of(record) else {
            violations.push(format!(
                "{}: no such spray in the database",
                index.describe(record)
            ));
            continue;
        };
        match index.share_of_user.get(&(spray.id, record.user)) {
            None => violations.push(format!(
                "{}: acknowledged receipt of {amount:?} is not in the database ({})",
                index.describe(record),
                Index::name(spray)
            )),
            Some(share) if Some(share.amount) != amount => violations.push(format!(
                "{}: acknowledged {amount:?} but the database has {} (slot {})",
                index.describe(record),
                share.amount,
                share.slot
            )),
            Some(_) => {}
        }
    }
    Check {
        name: "every acknowledged receipt (200) is recorded with its amount",
        violations,
        figures: format!("{acknowledged} receipts acknowledged"),
    }
}

fn acknowledged_sprays_are_recorded(index: &Index) -> Check {
    let mut violations = Vec::new();
    let mut acknowledged = 0;
    for record in index
        .records
        .iter()
        .filter(|r| r.endpoint == Endpoint::Spray && r.status() == Some(201))
    {
        acknowledged += 1;
        let (amount, count) = record.asked.expect("a spray record has its request");
        let Some(spray) = index.spray_of(record) else {
            violations.push(format!(
                "{}: the acknowledged spray is not in the database",
                index.describe(record)
            ));
            continue;
        };
        let rows = index.shares_of.get(&spray.id).map_or(0, Vec::len);
        let asked = (record.user, i64::try_from(amount).ok(), i64::try_from(count).ok());
        let stored = (spray.owner, Some(spray.total), Some(spray.count));
        if asked != stored || usize::try_from(spray.count).ok() != Some(rows) {
            violations.push(format!(
                "{}: asked (owner, amount, count) {asked:?}, the database has {stored:?} with {rows} share rows",
                index.describe(record)
            ));
        }
    }
    Check {
        name: "every acknowledged spray (201) is recorded with its amount and count",
        violations,
        figures: format!("{acknowledged} sprays acknowledged"),
    }
}

fn shares_and_ledger_balance(index: &Index) -> Check {
    let mut violations = index.duplicates.clone();
    let mut by_spray: HashMap<i64, Vec<&LedgerRow>> = HashMap::new();
    for entry in &index.store.ledger {
        by_spray.entry(entry.spray_id).or_default().push(entry);
    }
    let mut refunds = 0;
    for spray in &index.store.sprays {
        let name = Index::name(spray);
        let shares = index
            .shares_of
            .get(&spray.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let sum: i64 = shares.iter().map(|s| s.amount).sum();
        if usize::try_from(spray.count).ok() != Some(shares.len()) || sum != spray.total {
            violations.push(format!(
                "{name}: {} share rows summing to {sum}, expected {} summing to {}",
                shares.len(),
                spray.count,
                spray.total
            ));
        }
        for share in shares {
            if share.receiver.is_some() != share.received_at.is_some() {
                violations.push(format!(
                    "{name}: slot {} has receiver {:?} but received_at {:?}",
                    share.slot, share.receiver, share.received_at
                ));
            }
        }
        let received: Vec<&&ShareRow> = shares.iter().filter(|s| s.receiver.is_some()).collect();
        let received_sum: i64 = received.iter().map(|s| s.amount).sum();
        let entries = by_spray.remove(&spray.id).unwrap_or_default();
        let of_kind = |kind: &str| {
            entries
                .iter()
                .filter(|e| e.kind == kind)
                .copied()
                .collect::<Vec<_>>()
        };
        let debits = of_kind("DEBIT");
        if debits.len() != 1 || debits[0].user != spray.owner || debits[0].amount != spray.total {
            violations.push(format!(
                "{name}: ledger debits {:?}, expected one DEBIT of {} from owner {}",
                debits.iter().map(|d| (d.user, d.amount)).collect::<Vec<_>>(),
                spray.total,
                spray.owner
            ));
        }
        let credits: HashMap<i64, i64> = of_kind("CREDIT").iter().map(|c| (c.user, c.amount)).collect();
        if credits.len() != received.len() || of_kind("CREDIT").len() != received.len() {
            violations.push(format!(
                "{name}: {} CREDIT entries for {} received shares",
                of_kind("CREDIT").len(),
                received.len()
            ));
        }
        for share in &received {
            let user = share.receiver.expect("a received share has a receiver");
            if credits.get(&user) != Some(&share.amount) {
                violations.push(format!(
                    "{name}: user {user} received {} (slot {}) but is credited {:?}",
                    share.amount,
                    share.slot,
                    credits.get(&user)
                ));
            }
        }
        let refund: i64 = of_kind("REFUND").iter().map(|r| r.amount).sum();
        match (spray.settled_at, spray.refunded) {
            (Some(_), Some(refunded)) => {
                refunds += 1;
                if refunded != spray.total - received_sum || refund != refunded {
                    violations.push(format!(
                        "{name}: settled with refunded_amount {refunded} and REFUND entries of {refund}, but {} of {} was not received",
                        spray.total - received_sum,
                        spray.total
                    ));
                }
            }
            (None, None) if refund == 0 => {}
            other => violations.push(format!(
                "{name}: settlement {other:?} with REFUND entries of {refund}"
            )),
        }
    }
    for (spray_id, entries) in by_spray {
        violations.push(format!(
            "{} ledger entries for spray id {spray_id}, which does not exist",
            entries.len()
        ));
    }
    Check {
        name: "no share twice; shares sum to each spray; ledger debit = credits + refund",
        violations,
        figures: format!(
            "{} sprays, {} shares ({} received), {} ledger entries, {refunds} settled",
            index.store.sprays.len(),
            index.store.shares.len(),
            index.store.shares.iter().filter(|s| s.receiver.is_some()).count(),
            index.store.ledger.len()
        ),
    }
}

/// A change in the database must come from a request that succeeded, or one whose
/// outcome the client never learned (it gave up, or the connection broke). A share or a
/// spray whose every request was answered otherwise (a 5xx above all) is a request that
/// was told "nothing happened" although something did. Each receiver is a fresh user per
/// spray and each spray request a fresh sprayer, so the requests of one change are
/// exactly those of its user.
fn failed_requests_changed_nothing(index: &Index) -> Check {
    let mut violations = Vec::new();
    let mut after_5xx = 0;
    let mut judge = |what: String, requests: &[&Record], success: u16| {
        let acted = requests
            .iter()
            .any(|r| r.status() == Some(success) || r.is_unknown());
        if acted {
            return;
        }
        if requests.iter().any(|r| r.status().is_some_and(|s| s >= 500)) {
            after_5xx += 1;
        }
        let told: Vec<String> = requests.iter().map(|r| index.describe(r)).collect();
        if told.is_empty() {
            violations.push(format!("{what}, but nobody asked for it"));
        } else {
            violations.push(format!(
                "{what}, but every request for it was answered without success: {}",
                told.join("; ")
            ));
        }
    };
    let sprays: HashMap<i64, &SprayRow> = index.store.sprays.iter().map(|s| (s.id, s)).collect();
    for share in &index.store.shares {
        let (Some(user), Some(at)) = (share.receiver, share.received_at) else {
            continue;
        };
        let requests = index
            .receives
            .get(&(share.spray_id, user))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let spray = sprays.get(&share.spray_id).copied();
        let name = spray.map_or_else(|| format!("spray id {}", share.spray_id), Index::name);
        judge(
            format!(
                "user {user} holds slot {} ({}) of {name}, received at {:.3}s",
                share.slot,
                share.amount,
                index.at(at)
            ),
            requests,
            200,
        );
    }
    let mut count_by_owner: HashMap<i64, usize> = HashMap::new();
    for spray in &index.store.sprays {
        *count_by_owner.entry(spray.owner).or_default() += 1;
        let requests = index
            .sprays_by
            .get(&spray.owner)
            .map(Vec::as_slice)
            .unwrap_or_default();
        judge(format!("{} exists", Index::name(spray)), requests, 201);
    }
    for (owner, count) in count_by_owner {
        if count > 1 {
            violations.push(format!(
                "sprayer {owner} asked for one spray (retries under one key) but has {count}"
            ));
        }
    }
    Check {
        name: "every 5xx (and every refusal) changed nothing",
        violations,
        figures: format!("{after_5xx} changes made by requests answered 5xx"),
    }
}

fn already_received_only_to_recipients(index: &Index) -> Check {
    let mut violations = Vec::new();
    for record in index.records.iter().filter(|r| r.is_code("ALREADY_RECEIVED")) {
        if let Some(spray) = index.spray_of(record)
            && !index.share_of_user.contains_key(&(spray.id, record.user))
        {
            violations.push(format!(
                "{}: but the user has no share of {}",
                index.describe(record),
                Index::name(spray)
            ));
        }
    }
    Check {
        name: "ALREADY_RECEIVED only to a recipient",
        violations,
        figures: String::new(),
    }
}

/// `SPRAY_EXHAUSTED` must be true within the claim lease: when the server decided, at
/// some moment `d` between the request's start `s` and its answer `e`, every share was
/// either received or held by a claim younger than `CLAIM_LEASE`.
///
/// From the outside we bound both from above, so that the check never accuses falsely:
/// - received: shares whose `received_at` (the claim's start, taken before the gate hands
///   out a slot) is at most `e + SLACK`. Any share received by `d` is among them (and so
///   is one still being recorded at `d` by a claim that started before it).
/// - held: every receive of this spray that may have held a slot at `d` under a lease not
///   yet expired. A hold starts inside its request (at or after the request's start, at or
///   before its answer; if there was no answer, no later than the server's request
///   time-out, or the kill of its instance) and lasts at most `CLAIM_LEASE`. Requests answered 200 are not counted (the
///   share they got is counted as received, and they held nothing before their
///   `received_at`), nor refusals that never hold a slot (`SPRAY_EXHAUSTED`, not found,
///   own spray, expired, idempotency refusals and replays). Everything else is counted:
///   5xx, `ALREADY_RECEIVED`, and requests without an answer (clients that gave up,
///   instances killed).
///
/// A violation is an answer for which received + held < shares: at every possible moment
/// of the decision some share was neither received nor validly held. The reported bug
/// (a crash leaving ~100 holds on a 300-share spray, then members told SPRAY_EXHAUSTED
/// while the shares stayed free) shows up as soon as the dead requests are older than
/// the lease after the kill (about 6 s), or, for clients that gave up, older than their
/// request time-out plus the lease (about 17 s): nothing can account for those shares
/// any more.
fn exhausted_only_within_the_claim_lease(index: &Index, kills: &Kills) -> Check {
    let mut violations = Vec::new();
    let mut sprays_hit: HashMap<i64, i64> = HashMap::new();
    let mut wrong_on: HashMap<i64, usize> = HashMap::new();
    let mut checked = 0;
    let received_at: HashMap<i64, Vec<i64>> = index
        .shares_of
        .iter()
        .map(|(id, shares)| {
            let mut times: Vec<i64> = shares.iter().filter_map(|s| s.received_at).collect();
            times.sort_unstable();
            (*id, times)
        })
        .collect();
    let holders: HashMap<i64, Vec<(i64, i64)>> = index
        .receives_of
        .iter()
        .map(|(id, records)| {
            let spans = records
                .iter()
                .filter(|r| !r.replayed())
                .filter_map(|r| match &r.outcome {
                    Outcome::Unknown { .. } => Some((r.start, ran_until(r, kills))),
                    Outcome::Answered { status, code, .. }
                        if *status >= 500 || code.as_deref() == Some("ALREADY_RECEIVED") =>
                    {
                        Some((r.start, r.end))
                    }
                    _ => None,
                })
                .collect();
            (*id, spans)
        })
        .collect();
    for record in index.records.iter().filter(|r| r.is_code("SPRAY_EXHAUSTED")) {
        let Some(spray) = index.spray_of(record) else {
            continue;
        };
        checked += 1;
        // A replayed refusal was decided by the first request under its key.
        let start = if record.replayed() {
            record
                .key
                .as_deref()
                .and_then(|key| index.keyed.get(&(record.user, Endpoint::Receive, key)))
                .and_then(|group| group.iter().map(|r| r.start).min())
                .unwrap_or(record.start)
        } else {
            record.start
        };
        let end = record.end;
        let times = received_at.get(&spray.id).map(Vec::as_slice).unwrap_or_default();
        let received = times.partition_point(|t| *t <= end + SLACK_MS);
        let held = holders
            .get(&spray.id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|(from, until)| *from <= end + SLACK_MS && until + CLAIM_LEASE_MS + SLACK_MS >= start)
            .count();
        let accounted = i64::try_from(received + held).expect("a small count");
        if accounted < spray.count {
            let missing = spray.count - accounted;
            *wrong_on.entry(spray.id).or_insert(0) += 1;
            let worst = sprays_hit.entry(spray.id).or_insert(0);
            *worst = (*worst).max(missing);
            let never = i64::try_from(times.len()).map_or(0, |n| spray.count - n);
            violations.push(format!(
                "{}: but of {} only {received} were received by then and at most {held} could be held by claims younger than the {}s lease, so {missing} were free ({never} never received by the end)",
                index.describe(record),
                Index::name(spray),
                CLAIM_LEASE_MS / 1000
            ));
        }
    }
    let worst = sprays_hit.values().copied().max().unwrap_or(0);
    // Not a violation on its own (the last refusal may have come while those shares were
    // validly held), but the mark of stranded holds: sprays that refused members as
    // exhausted and still had shares nobody ever received.
    let mut refused_sprays: Vec<&SprayRow> = index
        .records
        .iter()
        .filter(|r| r.is_code("SPRAY_EXHAUSTED"))
        .filter_map(|r| index.spray_of(r))
        .collect();
    refused_sprays.sort_unstable_by_key(|s| s.id);
    refused_sprays.dedup_by_key(|s| s.id);
    let never_received =
        |s: &SprayRow| s.count - i64::try_from(received_at.get(&s.id).map_or(0, Vec::len)).unwrap_or(0);
    let stranded: Vec<i64> = refused_sprays
        .iter()
        .map(|s| never_received(s))
        .filter(|free| *free > 0)
        .collect();
    refused_sprays.sort_by_key(|s| std::cmp::Reverse(never_received(s)));
    let exhausted_on = |id: i64| {
        index
            .receives_of
            .get(&id)
            .map_or(0, |rs| rs.iter().filter(|r| r.is_code("SPRAY_EXHAUSTED")).count())
    };
    let worst_sprays: Vec<String> = refused_sprays
        .iter()
        .take(5)
        .filter(|s| never_received(s) > 0)
        .map(|s| {
            format!(
                "{}: {} never received, {} SPRAY_EXHAUSTED answers, {} wrong",
                Index::name(s),
                never_received(s),
                exhausted_on(s.id),
                wrong_on.get(&s.id).copied().unwrap_or(0)
            )
        })
        .collect();
    Check {
        name: "every SPRAY_EXHAUSTED was true within the claim lease",
        figures: format!(
            "{checked} SPRAY_EXHAUSTED answers checked, {} wrong, on {} sprays; at most {worst} shares free at a wrong answer; {} of {} sprays that answered SPRAY_EXHAUSTED kept {} shares never received (at most {} on one)",
            violations.len(),
            sprays_hit.len(),
            stranded.len(),
            refused_sprays.len(),
            stranded.iter().sum::<i64>(),
            stranded.iter().max().copied().unwrap_or(0)
        ) + &worst_sprays
            .iter()
            .map(|w| format!("\n          {w}"))
            .collect::<String>(),
        violations,
    }
}

/// `IDEMPOTENCY_IN_PROGRESS` at an answer between `s` and `e` is only allowed while
/// another request under the same (user, endpoint, key) may still hold the key: one that
/// started no later than `e + SLACK` and was still running at `s`, or had stopped
/// running less than `IDEMPOTENCY_LEASE` (+ slack) before `s`. "Running" ends with its
/// answer; without an answer, at its server's request time-out or the kill of its
/// instance (see `ran_until`). The lease is counted from the end rather than the start
/// of the blocking request, so that no implementation that stamps its pending row late
/// (after waiting for a frozen database, say) is accused: the contract promises "a
/// request that ended without an answer blocks its key for at most a short lease".
/// Replays and other in-progress refusals hold nothing.
fn keys_blocked_only_within_their_lease(index: &Index, kills: &Kills) -> Check {
    let mut violations = Vec::new();
    let mut worst = 0;
    let mut checked = 0;
    for record in index
        .records
        .iter()
        .filter(|r| r.is_code("IDEMPOTENCY_IN_PROGRESS"))
    {
        let Some(key) = record.key.as_deref() else {
            continue;
        };
        checked += 1;
        let group = index
            .keyed
            .get(&(record.user, record.endpoint, key))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let blockers: Vec<&&Record> = group
            .iter()
            .filter(|r| !std::ptr::eq(**r, record))
            .filter(|r| {
                r.outcome != Outcome::NotSent && !r.replayed() && !r.is_code("IDEMPOTENCY_IN_PROGRESS")
            })
            .filter(|r| r.start <= record.end + SLACK_MS)
            .collect();
        let allowed = blockers
            .iter()
            .any(|r| ran_until(r, kills) + IDEMPOTENCY_LEASE_MS + SLACK_MS >= record.start);
        if !allowed {
            let latest = blockers.iter().max_by_key(|r| ran_until(r, kills));
            let age = latest.map_or(0, |r| record.start - ran_until(r, kills));
            worst = worst.max(age);
            let before = latest.map_or_else(|| "no earlier request".to_owned(), |r| index.describe(r));
            violations.push(format!(
                "{}: the key was still blocked {:.3}s after the last request under it stopped running at the latest (lease {}s): {before}",
                index.describe(record),
                seconds(age),
                IDEMPOTENCY_LEASE_MS / 1000
            ));
        }
    }
    Check {
        name: "no Idempotency-Key blocked beyond its lease",
        figures: format!(
            "{checked} IDEMPOTENCY_IN_PROGRESS answers checked, {} beyond the lease, the longest {:.3}s after the blocking request stopped running",
            violations.len(),
            seconds(worst)
        ),
        violations,
    }
}

/// The checker on small made-up histories: it must accuse what the contract forbids and
/// nothing it allows.
mod tests {
    use super::*;

    const ROOM: &str = "R";
    const TOKEN: &str = "abc";
    const SPRAY: i64 = 1;
    const OWNER: i64 = 1_000_000;

    fn receive(user: i64, start: i64, end: i64, outcome: Outcome) -> Record {
        let amount = matches!(outcome, Outcome::Answered { status: 200, .. }).then_some(10);
        Record {
            endpoint: Endpoint::Receive,
            instance: 0,
            user,
            room: ROOM.to_owned(),
            token: Some(TOKEN.to_owned()),
            key: None,
            asked: None,
            start,
            end,
            outcome,
            amount,
        }
    }

    /// The request that made the spray of `store`.
    fn sprayed(shares: u64) -> Record {
        Record {
            endpoint: Endpoint::Spray,
            instance: 0,
            user: OWNER,
            room: ROOM.to_owned(),
            token: Some(TOKEN.to_owned()),
            key: None,
            asked: Some((shares * 10, shares)),
            start: 0,
            end: 0,
            outcome: answered(201, None),
            amount: None,
        }
    }

    fn answered(status: u16, code: Option<&str>) -> Outcome {
        Outcome::Answered {
            status,
            code: code.map(str::to_owned),
            replayed: false,
        }
    }

    fn exhausted() -> Outcome {
        answered(409, Some("SPRAY_EXHAUSTED"))
    }

    /// A spray of `shares` shares of 10, with `receipts` (user, received_at) recorded.
    fn store(shares: i64, receipts: &[(i64, i64)]) -> Store {
        let share_rows = (0..shares)
            .map(|slot| {
                let receipt = usize::try_from(slot).ok().and_then(|i| receipts.get(i));
                ShareRow {
                    spray_id: SPRAY,
                    slot,
                    amount: 10,
                    receiver: receipt.map(|r| r.0),
                    received_at: receipt.map(|r| r.1),
                }
            })
            .collect();
        let mut ledger = vec![LedgerRow {
            spray_id: SPRAY,
            kind: "DEBIT".to_owned(),
            user: OWNER,
            amount: shares * 10,
        }];
        ledger.extend(receipts.iter().map(|(user, _)| LedgerRow {
            spray_id: SPRAY,
            kind: "CREDIT".to_owned(),
            user: *user,
            amount: 10,
        }));
        Store {
            sprays: vec![SprayRow {
                id: SPRAY,
                room: ROOM.to_owned(),
                token: TOKEN.to_owned(),
                owner: OWNER,
                total: shares * 10,
                count: shares,
                settled_at: None,
                refunded: None,
            }],
            shares: share_rows,
            ledger,
            pending_keys: 0,
        }
    }

    fn violations(records: &[Record], store: &Store, kills: &Kills, name: &str) -> Vec<String> {
        check_all(records, store, 0, kills)
            .into_iter()
            .find(|c| c.name == name)
            .expect("a check of that name")
            .violations
    }

    const EXHAUSTED_CHECK: &str = "every SPRAY_EXHAUSTED was true within the claim lease";

    /// Two shares: user 2 received one; user 3's claim died with instance 0 at 1 s.
    fn one_received_one_held_by_a_killed_claim(refused_at: i64) -> (Vec<Record>, Store) {
        let records = vec![
            receive(2, 0, 100, answered(200, None)),
            receive(3, 900, 1_000, Outcome::Unknown { gave_up: false }),
            receive(4, refused_at, refused_at + 10, exhausted()),
        ];
        (records, store(2, &[(2, 50)]))
    }

    #[test]
    fn a_refusal_while_a_dead_claim_is_within_its_lease_is_allowed() {
        let (records, store) = one_received_one_held_by_a_killed_claim(5_000);
        assert!(violations(&records, &store, &[(0, 1_000)], EXHAUSTED_CHECK).is_empty());
    }

    #[test]
    fn a_refusal_once_a_dead_claim_outlived_its_lease_is_a_violation() {
        let (records, store) = one_received_one_held_by_a_killed_claim(8_500);
        let found = violations(&records, &store, &[(0, 1_000)], EXHAUSTED_CHECK);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("user 4") && found[0].contains("1 were free"),
            "{found:?}"
        );
    }

    #[test]
    fn a_claim_whose_client_gave_up_may_hold_until_the_request_timeout_and_lease() {
        let records = vec![
            receive(2, 0, 100, answered(200, None)),
            receive(3, 900, 930, Outcome::Unknown { gave_up: true }),
            receive(4, 15_000, 15_010, exhausted()),
            receive(5, 19_000, 19_010, exhausted()),
        ];
        let found = violations(&records, &store(2, &[(2, 50)]), &[], EXHAUSTED_CHECK);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("user 5"), "{found:?}");
    }

    #[test]
    fn a_refusal_when_every_share_was_received_is_allowed() {
        let records = vec![
            receive(2, 0, 100, answered(200, None)),
            receive(3, 0, 100, answered(200, None)),
            receive(4, 60_000, 60_010, exhausted()),
        ];
        let store = store(2, &[(2, 50), (3, 60)]);
        assert!(violations(&records, &store, &[], EXHAUSTED_CHECK).is_empty());
    }

    const CHANGED_CHECK: &str = "every 5xx (and every refusal) changed nothing";

    #[test]
    fn a_receipt_recorded_for_a_request_answered_503_is_a_violation() {
        let records = vec![sprayed(2), receive(2, 0, 100, answered(503, Some("UNAVAILABLE")))];
        let found = violations(&records, &store(2, &[(2, 50)]), &[], CHANGED_CHECK);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("user 2") && found[0].contains("503"),
            "{found:?}"
        );
    }

    #[test]
    fn a_receipt_of_a_503_then_a_successful_retry_is_allowed() {
        let records = vec![
            sprayed(2),
            receive(2, 0, 100, answered(503, Some("UNAVAILABLE"))),
            receive(2, 500, 600, answered(200, None)),
        ];
        assert!(violations(&records, &store(2, &[(2, 550)]), &[], CHANGED_CHECK).is_empty());
    }

    const KEY_CHECK: &str = "no Idempotency-Key blocked beyond its lease";

    fn keyed(mut record: Record) -> Record {
        record.key = Some("k".to_owned());
        record
    }

    #[test]
    fn a_key_in_progress_within_its_lease_is_allowed_and_beyond_it_is_not() {
        let in_progress = || answered(409, Some("IDEMPOTENCY_IN_PROGRESS"));
        let records = vec![
            keyed(receive(2, 0, 100, answered(503, Some("UNAVAILABLE")))),
            keyed(receive(2, 10_000, 10_010, in_progress())),
            keyed(receive(2, 12_000, 12_010, in_progress())),
        ];
        let found = violations(&records, &store(2, &[]), &[], KEY_CHECK);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("[12.000s"), "{found:?}");
    }
}
