//! One gate call of many claims (`claim/gathered.rs`) must leave Redis exactly as the same
//! claims sent one call each, one after another, and answer each the same: the `CLAIM`
//! script does for a whole call what each claim would repeat, and this is what keeps that
//! honest. Checked on random calls (repeated users, the owner, times before and past the
//! lease and the window, keys lost before the call), on one Redis and on a Redis Cluster.

use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use spray::domain::{RoomId, Token};
use spray::gate::{GateKeys, GateVerdict};
use spray::store::ClaimSnapshot;

use super::{gate, lease, user};
use crate::common::{RawRedis, TestApp};

const OWNER: i64 = 1;
/// Users 2 to 4 claim; 5 and 6 may have received before the call.
const USERS: i64 = 6;

/// One random case: the spray's shares, how many of them users 5 and 6 received before
/// (listed in the keys), which key (if any) was lost, and the claims of the call: a user
/// and one of [`times`]'s moments.
#[derive(Debug, Clone)]
struct Case {
    shares: i64,
    received: i64,
    lost_key: Option<usize>,
    claims: Vec<(i64, usize)>,
}

fn cases() -> impl Strategy<Value = Case> {
    (1..=4i64, 0..=2i64, prop::option::weighted(0.15, 0..4usize)).prop_flat_map(
        |(shares, received, lost_key)| {
            let received = received.min(shares);
            let claims = prop::collection::vec((OWNER..=USERS, 0..6usize), 1..=10);
            claims.prop_map(move |claims| Case {
                shares,
                received,
                lost_key,
                claims,
            })
        },
    )
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

/// Everything the four keys hold, and whether each lives with a time to live (`1`), is
/// gone (`-2`) or lives forever (`-1`, never right).
async fn dump(
    redis: &mut RawRedis,
    keys: &GateKeys,
) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>, Vec<i64>) {
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
    let mut lives = Vec::new();
    for key in keys.all() {
        let ttl: i64 = redis.query(redis::cmd("PTTL").arg(key)).await;
        lives.push(if ttl > 0 { 1 } else { ttl });
    }
    (meta, free, receivers, holds, lives)
}

/// Loads the same spray into `keys`, as a rebuild from SQL would.
async fn load(app: &TestApp, keys: &GateKeys, case: &Case, now: DateTime<Utc>, receive_until: DateTime<Utc>) {
    let snapshot = ClaimSnapshot {
        spray_id: 77,
        owner: user(OWNER),
        receive_until,
        lookup_until: receive_until + TimeDelta::days(7),
        recipient_count: u32::try_from(case.shares).unwrap(),
        free_slots: (case.received..case.shares).collect(),
        receivers: (0..case.received).map(|slot| (user(5 + slot), slot)).collect(),
    };
    gate(app).rebuild(keys, &snapshot, now).await.unwrap();
    if let Some(lost) = case.lost_key {
        let mut redis = RawRedis::connect(app.backend).await;
        let _: i64 = redis.query(redis::cmd("DEL").arg(keys.all()[lost])).await;
    }
}

async fn check(app: &TestApp, case: Case, run: usize) -> Result<(), TestCaseError> {
    let (gate, lease, now) = (gate(app), lease(app), app.now());
    let receive_until = now + TimeDelta::minutes(10);
    let at = times(now, lease, receive_until);
    let token = Token::parse("Ab1").unwrap();
    let keys_of = |side: &str| {
        let room = RoomId::parse(&format!("calls-{run}-{side}")).unwrap();
        GateKeys::new(&app.settings.redis_key_prefix, &room, &token)
    };
    let (together, alone) = (keys_of("together"), keys_of("alone"));
    load(app, &together, &case, now, receive_until).await;
    load(app, &alone, &case, now, receive_until).await;

    let claims: Vec<_> = case
        .claims
        .iter()
        .map(|&(id, moment)| (user(id), at[moment]))
        .collect();
    let in_one_call: Vec<GateVerdict> = gate
        .claim_many(&together, &claims, lease)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut one_by_one = Vec::new();
    for &(id, moment) in &claims {
        one_by_one.push(gate.claim(&alone, id, moment, lease).await.unwrap());
    }
    prop_assert_eq!(in_one_call, one_by_one);

    let mut redis = RawRedis::connect(app.backend).await;
    prop_assert_eq!(dump(&mut redis, &together).await, dump(&mut redis, &alone).await);
    for keys in [&together, &alone] {
        let _: i64 = redis.query(redis::cmd("DEL").arg(&keys.all()[..])).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_many_claims_decides_and_writes_as_calls_one_after_another() {
    let app = TestApp::new().await;
    let runs = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    // proptest drives the cases synchronously; each case's Redis calls run on the runtime.
    tokio::task::block_in_place(|| {
        let config = Config {
            cases: 128,
            failure_persistence: None,
            ..Config::default()
        };
        TestRunner::new(config)
            .run(&cases(), |case| {
                let run = runs.fetch_add(1, Ordering::Relaxed);
                handle.block_on(check(&app, case, run))
            })
            .unwrap();
    });
}
