//! One gate call of many claims (`claim/gathered.rs`) must leave Redis exactly as the same
//! claims sent one call each, one after another, and answer each the same: the `CLAIM`
//! script does for a whole call what each claim would repeat, and this is what keeps that
//! honest. Checked on random calls (repeated users, the owner, holds left by earlier
//! claims, times before and past the lease and the window, keys lost before the call), on
//! one Redis and on a Redis Cluster.

use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use spray::domain::{RoomId, Token};
use spray::gate::{GateKeys, GateVerdict, RedisGate};
use spray::store::ClaimSnapshot;
use tokio::sync::Mutex;

use super::{gate, lease, user};
use crate::common::{RawRedis, TestApp};

const OWNER: i64 = 1;
/// Any of users 1 (the owner) to 6 may claim; 5 and 6 may have received before.
const USERS: i64 = 6;
/// How much longer than the meta hash another key may live: a script's run, at most.
const SCRIPT_RUN_MS: i64 = 100;

/// One random case: the spray's shares, how many of them users 5 and 6 received before
/// (listed in the keys), the claims made one at a time before the call (they leave holds
/// for it to find and take over), which key (if any) was lost then, and the call's
/// claims. A claim is a user and one of [`times`]'s moments.
#[derive(Debug, Clone)]
struct Case {
    shares: i64,
    received: i64,
    before: Vec<(i64, usize)>,
    lost_key: Option<usize>,
    claims: Vec<(i64, usize)>,
}

/// A moment of [`times`], the early ones most often: the last one drops the keys, and
/// after it every claim of the call is "missing".
fn moment() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..2usize, 6 => 2..4usize, 2 => Just(4usize), 1 => Just(5usize)]
}

fn cases() -> impl Strategy<Value = Case> {
    let before = prop::collection::vec((2..=USERS, 0..2usize), 0..=4);
    let claims = prop::collection::vec((OWNER..=USERS, moment()), 1..=10);
    (
        1..=4i64,
        0..=2i64,
        before,
        prop::option::weighted(0.15, 0..4usize),
        claims,
    )
        .prop_map(|(shares, received, before, lost_key, claims)| Case {
            shares,
            received: received.min(shares),
            before,
            lost_key,
            claims,
        })
}

/// The moments a claim may be made at: now, a moment later, past one lease and past
/// two, the window's close, and long after it (past the keys' trust).
fn times(now: DateTime<Utc>, lease: TimeDelta, receive_until: DateTime<Utc>) -> [DateTime<Utc>; 6] {
    let ms = TimeDelta::milliseconds;
    [
        now,
        now + ms(1),
        now + lease + ms(1),
        now + lease * 2 + ms(2),
        receive_until,
        receive_until + TimeDelta::days(1),
    ]
}

/// What the test shares between its cases: one gate and one raw connection, so that a
/// Redis Cluster is not connected to anew for every case.
struct Shared {
    gate: RedisGate,
    redis: Mutex<RawRedis>,
    lease: TimeDelta,
}

/// Everything the four keys hold, and whether each lives with a time to live (`1`) or is
/// gone (`-2`). No key may live forever, nor outlive the meta hash, which the scripts
/// give every other key's time to live from.
async fn dump(
    redis: &mut RawRedis,
    keys: &GateKeys,
) -> Result<(Vec<String>, Vec<String>, Vec<String>, Vec<String>, Vec<i64>), TestCaseError> {
    let mut lives = Vec::new();
    // The meta hash first (`all` lists it first): a key read after it has had as long to
    // run down.
    let mut meta_ttl = None;
    for key in keys.all() {
        let ttl: i64 = redis.query(redis::cmd("PTTL").arg(key)).await;
        prop_assert_ne!(ttl, -1, "{} has no time to live", key);
        match meta_ttl {
            None => meta_ttl = Some(ttl),
            // A key whose time to live a script copied from the meta hash's may end a
            // millisecond or two after it (seen: 1 ms): the copy is taken while it runs.
            Some(meta_ttl) if meta_ttl > 0 => {
                prop_assert!(
                    ttl <= meta_ttl + SCRIPT_RUN_MS,
                    "{} outlives the meta hash: {} > {}",
                    key,
                    ttl,
                    meta_ttl
                );
            }
            Some(_) => {}
        }
        lives.push(if ttl > 0 { 1 } else { ttl });
    }
    let mut meta: Vec<String> = redis.query(redis::cmd("HGETALL").arg(&keys.meta)).await;
    let free: Vec<String> = redis
        .query(redis::cmd("LRANGE").arg(&keys.free).arg(0).arg(-1))
        .await;
    let mut receivers: Vec<String> = redis.query(redis::cmd("HGETALL").arg(&keys.receivers)).await;
    let holds: Vec<String> = redis
        .query(
            redis::cmd("ZRANGE")
                .arg(&keys.holds)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await;
    // Hashes come back in no set order: compare them as sorted field/value pairs.
    for hash in [&mut meta, &mut receivers] {
        let mut pairs: Vec<String> = hash.chunks(2).map(|pair| pair.join("=")).collect();
        pairs.sort();
        *hash = pairs;
    }
    Ok((meta, free, receivers, holds, lives))
}

/// Loads the case's spray into `keys` as a rebuild from SQL would, makes the claims
/// before the call one at a time, then loses the key the case loses.
async fn prepare(
    shared: &Shared,
    keys: &GateKeys,
    case: &Case,
    at: &[DateTime<Utc>; 6],
    receive_until: DateTime<Utc>,
) {
    let snapshot = ClaimSnapshot {
        spray_id: 77,
        owner: user(OWNER),
        receive_until,
        lookup_until: receive_until + TimeDelta::days(7),
        recipient_count: u32::try_from(case.shares).unwrap(),
        free_slots: (case.received..case.shares).collect(),
        receivers: (0..case.received).map(|slot| (user(5 + slot), slot)).collect(),
    };
    shared.gate.rebuild(keys, &snapshot, at[0]).await.unwrap();
    for &(id, moment) in &case.before {
        shared
            .gate
            .claim(keys, user(id), at[moment], shared.lease)
            .await
            .unwrap();
    }
    if let Some(lost) = case.lost_key {
        let mut redis = shared.redis.lock().await;
        let _: i64 = redis.query(redis::cmd("DEL").arg(keys.all()[lost])).await;
    }
}

async fn check(
    shared: &Shared,
    prefix: &str,
    now: DateTime<Utc>,
    case: Case,
    run: usize,
) -> Result<(), TestCaseError> {
    let receive_until = now + TimeDelta::minutes(10);
    let at = times(now, shared.lease, receive_until);
    let token = Token::parse("Ab1").unwrap();
    let keys_of = |side: &str| {
        let room = RoomId::parse(&format!("calls-{run}-{side}")).unwrap();
        GateKeys::new(prefix, &room, &token)
    };
    let (together, alone) = (keys_of("together"), keys_of("alone"));
    prepare(shared, &together, &case, &at, receive_until).await;
    prepare(shared, &alone, &case, &at, receive_until).await;

    let claims: Vec<_> = case
        .claims
        .iter()
        .map(|&(id, moment)| (user(id), at[moment]))
        .collect();
    let in_one_call: Vec<GateVerdict> = shared
        .gate
        .claim_many(&together, &claims, shared.lease)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut one_by_one = Vec::new();
    for &(id, moment) in &claims {
        one_by_one.push(shared.gate.claim(&alone, id, moment, shared.lease).await.unwrap());
    }
    prop_assert_eq!(in_one_call, one_by_one);

    let mut redis = shared.redis.lock().await;
    let (after_call, after_calls) = (
        dump(&mut redis, &together).await?,
        dump(&mut redis, &alone).await?,
    );
    prop_assert_eq!(after_call, after_calls);
    for keys in [&together, &alone] {
        let _: i64 = redis.query(redis::cmd("DEL").arg(&keys.all()[..])).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_many_claims_decides_and_writes_as_calls_one_after_another() {
    let app = TestApp::new().await;
    let shared = Shared {
        gate: gate(&app),
        redis: Mutex::new(RawRedis::connect(app.backend).await),
        lease: lease(&app),
    };
    let (prefix, now) = (app.settings.redis_key_prefix.clone(), app.now());
    let runs = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    // proptest drives the cases synchronously; each case's Redis calls run on the runtime.
    tokio::task::block_in_place(|| {
        let config = Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new(config)
            .run(&cases(), |case| {
                let run = runs.fetch_add(1, Ordering::Relaxed);
                handle.block_on(check(&shared, &prefix, now, case, run))
            })
            .unwrap();
    });
}
