//! The Redis gate never decides alone: every way Redis can be wrong or lose its keys
//! still gives exact money. Runs on one Redis and on a Redis Cluster.

use std::collections::HashSet;

use chrono::TimeDelta;
use spray::gate::GateVerdict;

use super::{dead_claim, gate, lease, user};
use crate::common::metrics::counter;
use crate::common::{OWNER, RawRedis, TestApp};

async fn raw(app: &TestApp) -> RawRedis {
    RawRedis::connect(app.backend).await
}

/// Deletes every key the gate holds for the spray `token`, as a Redis flush would.
async fn delete_gate_keys(app: &TestApp, token: &str) {
    let mut redis = raw(app).await;
    for key in app.gate_keys(token).all() {
        let _: i64 = redis.query(redis::cmd("DEL").arg(key)).await;
    }
}

/// `user` receives from `token` through SQL alone, as an instance that could not reach
/// Redis would: the gate does not see it.
async fn claim_through_sql_alone(app: &TestApp, token: &str, user: &str) -> spray::store::ClaimOutcome {
    let claim = spray::store::Claim {
        room: spray::domain::RoomId::parse(crate::common::ROOM).unwrap(),
        token: spray::domain::Token::parse(token).unwrap(),
        user: spray::domain::UserId::parse(user).unwrap(),
        now: app.now(),
    };
    app.store.claim_share(&claim, None).await.unwrap()
}

#[tokio::test]
async fn a_new_spray_is_loaded_into_the_gate() {
    let app = TestApp::new().await;
    let token = app.spray(1000, 7).await;
    let keys = app.gate_keys(&token);
    let mut redis = raw(&app).await;
    let meta = app.gate_keys(&token).meta;
    let exists: i64 = raw(&app).await.query(redis::cmd("EXISTS").arg(meta)).await;
    let free: i64 = redis.query(redis::cmd("LLEN").arg(&keys.free)).await;
    assert_eq!((exists, free), (1, 7));
    app.receive(2, &token).await.assert_status(200);
    let free: i64 = redis.query(redis::cmd("LLEN").arg(&keys.free)).await;
    let holder: Option<String> = redis
        .query(redis::cmd("HGET").arg(&keys.receivers).arg("2"))
        .await;
    assert_eq!((free, holder.as_deref()), (6, Some("0")));
}

#[tokio::test]
async fn refusals_the_gate_can_prove_are_answered_without_sql() {
    let app = TestApp::new().await;
    let token = app.spray(100, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    // With the database gone, the gate still answers what it can prove alone...
    app.store.close().await;
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    // ...but "already received" needs SQL's word, so it is not guessed.
    app.receive(2, &token).await.assert_problem(503, "UNAVAILABLE");
}

#[tokio::test]
async fn losing_the_keys_mid_spray_keeps_exact_sums() {
    let app = TestApp::new().await;
    let token = app.spray(1001, 10).await;
    for user in 2..=6 {
        app.receive(user, &token).await.assert_status(200);
    }
    delete_gate_keys(&app, &token).await;
    // The earlier receivers are still refused, and only the five shares left are given.
    for user in 2..=6 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "ALREADY_RECEIVED");
    }
    let mut winners = 0;
    for user in 7..=20 {
        if app.receive(user, &token).await.status == 200 {
            winners += 1;
        }
    }
    assert_eq!(winners, 5);
    let (paid, users) = app.recipients(&token).await;
    assert_eq!((paid, users.len()), (1001, 10));
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_slot_handed_out_but_never_recorded_is_completed_by_the_retry() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    // The gate hands user 2 a slot, then the instance dies before SQL records it.
    let keys = app.gate_keys(&token);
    let mut redis = raw(&app).await;
    let _: i64 = redis.query(redis::cmd("LPOP").arg(&keys.free)).await;
    let _: i64 = redis
        .query(redis::cmd("HSET").arg(&keys.receivers).arg("2").arg("0"))
        .await;
    // The user is not told "already received": their retry completes the claim.
    let answer = app.receive(2, &token).await;
    answer.assert_status(200);
    assert_eq!(answer.body["received_amount"], 100);
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let (paid, users) = app.recipients(&token).await;
    assert_eq!((paid, users), (100, HashSet::from([2])));
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_stale_gate_falls_back_to_the_sql_claim() {
    let app = TestApp::new().await;
    let token = app.spray(600, 3).await;
    // User 2 receives through SQL alone (an instance that could not reach Redis): the
    // gate still lists slot 0 as free.
    let outcome = claim_through_sql_alone(&app, &token, "2").await;
    assert_eq!(
        outcome,
        spray::store::ClaimOutcome::Received(spray::domain::Amount::new(200))
    );
    // User 3 is handed slot 0 by the gate, finds it taken in SQL and gets another share;
    // the gate now lists slot 0's holder, user 2, as a receiver.
    app.receive(3, &token).await.assert_status(200);
    // So user 2 is told "already received", once SQL confirms it.
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.receive(4, &token).await.assert_status(200);
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    // The gate now lists user 2 as a receiver: their retry is still "already received"
    // (the contract's order), never "exhausted".
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let (paid, users) = app.recipients(&token).await;
    assert_eq!((paid, users), (600, HashSet::from([2, 3, 4])));
    app.assert_audit_clean().await;
}

/// A share received through SQL alone (Redis unreachable from that instance) is found by
/// the gate when it hands that slot to someone else: its holder is then listed as a
/// receiver, so once the spray is exhausted the holder's first claim through the gate is
/// still answered "already received", in the contract's order.
#[tokio::test]
async fn a_share_received_through_sql_alone_is_listed_when_the_gate_finds_it() {
    let app = TestApp::new().await;
    let token = app.spray(600, 3).await;
    let outcome = claim_through_sql_alone(&app, &token, "2").await;
    assert!(matches!(outcome, spray::store::ClaimOutcome::Received(_)));
    // Others take the two shares left; the gate hands out all three slots on the way.
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token).await.assert_status(200);
    for user in 5..=6 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "SPRAY_EXHAUSTED");
    }
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let (paid, users) = app.recipients(&token).await;
    assert_eq!((paid, users), (600, HashSet::from([2, 3, 4])));
    app.assert_audit_clean().await;
}

const GATE_EVENTS: &str = "spray_gate_events_total";

#[tokio::test]
async fn the_gate_reports_hits_misses_and_rebuilds() {
    let app = TestApp::new().await;
    let token = app.spray(100, 2).await;
    let hits = [("event", "hit")];
    let rebuilds = [("event", "rebuild")];
    let (hits_before, rebuilds_before) = (
        counter(&app, GATE_EVENTS, &hits).await,
        counter(&app, GATE_EVENTS, &rebuilds).await,
    );
    app.receive(2, &token).await.assert_status(200);
    assert!(
        counter(&app, GATE_EVENTS, &hits).await > hits_before,
        "a claim through the gate is a hit"
    );
    delete_gate_keys(&app, &token).await;
    app.receive(3, &token).await.assert_status(200);
    assert!(
        counter(&app, GATE_EVENTS, &rebuilds).await > rebuilds_before,
        "lost keys are rebuilt"
    );
}

#[tokio::test]
async fn a_reused_token_is_never_answered_from_the_old_sprays_keys() {
    // Lookup window as short as the receive window: the token is free again while the
    // old spray's keys may still be in Redis.
    let minutes = std::time::Duration::from_secs(600);
    let settings = spray::config::Settings {
        receive_window: minutes,
        lookup_window: minutes,
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    app.tokens.push("AAA");
    app.spray(100, 1).await;
    app.receive(2, "AAA").await.assert_status(200);
    app.advance(chrono::TimeDelta::minutes(10));
    // Another sprayer takes the token; the old sprayer and the old receiver may receive.
    app.tokens.push("AAA");
    app.spray_as(
        5,
        crate::common::ROOM,
        serde_json::json!({"amount": 300, "recipient_count": 3}),
    )
    .await;
    app.receive(OWNER, "AAA").await.assert_status(200);
    app.receive(2, "AAA").await.assert_status(200);
    app.receive(5, "AAA").await.assert_problem(403, "OWN_SPRAY");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_slot_that_sql_could_not_record_is_given_back() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    let mut redis = raw(&app).await;
    // The database goes away between the gate's answer and the point update.
    app.store.close().await;
    app.receive(2, &token).await.assert_problem(503, "UNAVAILABLE");
    // The slot is back at the head of the list and user 2 holds nothing, so the retry
    // (or anyone else) gets the same share once SQL is back.
    let free: Vec<String> = redis
        .query(redis::cmd("LRANGE").arg(&keys.free).arg(0).arg(-1))
        .await;
    let held: Option<String> = redis
        .query(redis::cmd("HGET").arg(&keys.receivers).arg("2"))
        .await;
    assert_eq!(
        (free, held),
        (vec!["0".to_owned(), "1".to_owned(), "2".to_owned()], None)
    );
}

/// Once every share is recorded (none free, none held), nothing can change the answer to
/// a newcomer before the window closes: each instance remembers the spray and answers its
/// losers and its owner without Redis. Proof here: the keys deleted from Redis stay
/// deleted (a claim through the gate would rebuild them), while the answers stay right.
#[tokio::test]
async fn a_fully_received_spray_answers_newcomers_from_memory_until_its_window_closes() {
    let app = TestApp::new().await;
    let token = app.spray(100, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    let remembered = [("event", "remembered")];
    let before = counter(&app, GATE_EVENTS, &remembered).await;
    // This loser learns from the gate that the spray is taken for good.
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");

    delete_gate_keys(&app, &token).await;
    for user in 5..=9 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "SPRAY_EXHAUSTED");
    }
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    let meta = app.gate_keys(&token).meta;
    let exists: i64 = raw(&app).await.query(redis::cmd("EXISTS").arg(meta)).await;
    assert_eq!(exists, 0, "a newcomer's claim went to Redis");
    assert!(
        counter(&app, GATE_EVENTS, &remembered).await >= before + 6.0,
        "answers from memory are counted"
    );

    // A receiver is never told "exhausted": their claim goes through the gate (rebuilt
    // from SQL) and SQL confirms it.
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");

    // When the window closes the remembered answer no longer holds.
    delete_gate_keys(&app, &token).await;
    app.advance(chrono::TimeDelta::minutes(10));
    app.receive(10, &token)
        .await
        .assert_problem(410, "RECEIVE_EXPIRED");
    let (paid, users) = app.recipients(&token).await;
    assert_eq!((paid, users), (100, HashSet::from([2, 3])));
    app.assert_audit_clean().await;
}

/// User 2 receives through SQL alone; the gate still lists every slot as free. Returns
/// the slot SQL gave them, after putting it at the head of the gate's free list
/// (`first`) or at its tail.
async fn received_through_sql_alone(app: &TestApp, token: &str, first: bool) -> i64 {
    let outcome = claim_through_sql_alone(app, token, "2").await;
    assert!(matches!(outcome, spray::store::ClaimOutcome::Received(_)));
    let keys = app.gate_keys(token);
    let mut redis = raw(app).await;
    let spray_id: i64 = redis.query(redis::cmd("HGET").arg(&keys.meta).arg("id")).await;
    let mut slot = None;
    for candidate in 0..3 {
        let holder = app.store.slot_holder(spray_id, candidate).await.unwrap();
        if holder.map(|h| h.get()) == Some(2) {
            slot = Some(candidate);
        }
    }
    let slot = slot.expect("user 2 holds a share in SQL");
    let _: i64 = redis
        .query(redis::cmd("LREM").arg(&keys.free).arg(0).arg(slot))
        .await;
    let push = if first { "LPUSH" } else { "RPUSH" };
    let _: i64 = redis.query(redis::cmd(push).arg(&keys.free).arg(slot)).await;
    slot
}

#[tokio::test]
async fn a_user_sql_says_already_holds_a_share_gives_the_slot_back_and_stays_listed() {
    let app = TestApp::new().await;
    let token = app.spray(600, 3).await;
    // The gate hands user 2 a slot that is free in SQL; SQL says they hold another.
    received_through_sql_alone(&app, &token, false).await;
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let keys = app.gate_keys(&token);
    let mut redis = raw(&app).await;
    let free: i64 = redis.query(redis::cmd("LLEN").arg(&keys.free)).await;
    let listed: Option<String> = redis
        .query(redis::cmd("HGET").arg(&keys.receivers).arg("2"))
        .await;
    assert_eq!(free, 3, "the slot was not given back");
    assert!(listed.is_some(), "user 2 is no longer listed as a receiver");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_user_handed_the_share_they_took_through_sql_alone_stays_listed() {
    let app = TestApp::new().await;
    let token = app.spray(600, 3).await;
    let slot = received_through_sql_alone(&app, &token, true).await;
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let keys = app.gate_keys(&token);
    let mut redis = raw(&app).await;
    let listed: Option<String> = redis
        .query(redis::cmd("HGET").arg(&keys.receivers).arg("2"))
        .await;
    assert_eq!(listed, Some(slot.to_string()), "user 2 is no longer listed");
    let free: i64 = redis.query(redis::cmd("LLEN").arg(&keys.free)).await;
    assert_eq!(free, 2, "the share taken in SQL went back to the free list");
    app.assert_audit_clean().await;
}

/// Deletes one of the spray's gate keys, as an eviction under any `maxmemory-policy` but
/// `noeviction` may: Redis evicts keys one by one, not a spray's keys together.
async fn evict(app: &TestApp, key: &str) {
    let mut redis = raw(app).await;
    let deleted: i64 = redis.query(redis::cmd("DEL").arg(key)).await;
    assert_eq!(deleted, 1, "the key {key} was there to evict");
}

/// The free slots lost alone: the gate must not take the spray for exhausted while SQL
/// has free shares. It notices the keys no longer agree and rebuilds them from SQL.
#[tokio::test]
async fn a_spray_whose_free_slots_were_evicted_alone_is_rebuilt_not_exhausted() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    app.receive(2, &token).await.assert_status(200);
    evict(&app, &app.gate_keys(&token).free).await;
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token).await.assert_status(200);
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    assert_eq!(app.recipients(&token).await, (300, HashSet::from([2, 3, 4])));
    app.assert_audit_clean().await;
}

/// The holds lost alone: a share handed to a claim that then died is free in SQL. Without
/// its hold the gate could neither take it over nor tell it from a recorded one, and
/// would call the spray exhausted for good.
#[tokio::test]
async fn a_spray_whose_holds_were_evicted_alone_is_rebuilt_and_the_dead_share_goes_out() {
    let app = TestApp::new().await;
    let token = app.spray(100, 1).await;
    let keys = app.gate_keys(&token);
    // User 2's claim is handed the one slot and dies before SQL records it.
    dead_claim(&app, &keys, 2).await;
    evict(&app, &keys.holds).await;
    app.advance(lease(&app));
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    assert_eq!(app.recipients(&token).await, (100, HashSet::from([3])));
    app.assert_audit_clean().await;
}

/// The receivers lost alone, once the spray is taken: an instance that remembers the
/// spray as taken for good must still know who received, or a receiver's retry would be
/// answered "exhausted" instead of "already received".
#[tokio::test]
async fn a_spray_whose_receivers_were_evicted_alone_still_answers_already_received() {
    let app = TestApp::new().await;
    let token = app.spray(200, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    evict(&app, &app.gate_keys(&token).receivers).await;
    for user in 4..=5 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "SPRAY_EXHAUSTED");
    }
    for user in 2..=3 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "ALREADY_RECEIVED");
    }
    assert_eq!(app.recipients(&token).await, (200, HashSet::from([2, 3])));
    app.assert_audit_clean().await;
}

/// The counts the meta hash keeps of the other keys (free slots, holds, receivers).
async fn counts(app: &TestApp, token: &str) -> ([i64; 3], [i64; 3]) {
    let keys = app.gate_keys(token);
    let mut redis = raw(app).await;
    let kept: Vec<i64> = redis
        .query(
            redis::cmd("HMGET")
                .arg(&keys.meta)
                .arg("free")
                .arg("held")
                .arg("recv"),
        )
        .await;
    let free: i64 = redis.query(redis::cmd("LLEN").arg(&keys.free)).await;
    let held: i64 = redis.query(redis::cmd("ZCARD").arg(&keys.holds)).await;
    let recv: i64 = redis.query(redis::cmd("HLEN").arg(&keys.receivers)).await;
    ([kept[0], kept[1], kept[2]], [free, held, recv])
}

/// Every way a script changes the keys keeps the counts right, so the check never
/// rebuilds a spray whose keys were not lost: a claim recorded, a hold taken over, a slot
/// found taken (forgotten, its SQL holder listed), a slot given back, a slot given back by
/// a user SQL says already received.
#[tokio::test]
async fn the_counts_follow_every_change_and_cause_no_rebuild() {
    let app = TestApp::new().await;
    let token = app.spray(600, 6).await;
    let keys = app.gate_keys(&token);
    let gate = gate(&app);
    // A mark in the meta hash: a rebuild starts from empty keys, so it would not survive
    // one. (The rebuild counter is shared with the tests running beside this one.)
    let mut redis = raw(&app).await;
    let _: i64 = redis
        .query(redis::cmd("HSET").arg(&keys.meta).arg("mark").arg(1))
        .await;

    // Recorded and confirmed.
    app.receive(2, &token).await.assert_status(200);
    // A slot given back (SQL could not record it).
    let (_, slot) = dead_claim(&app, &keys, 3).await;
    gate.release(&keys, user(3), slot).await.unwrap();
    assert_eq!(counts(&app, &token).await, ([5, 0, 1], [5, 0, 1]));
    // Received through SQL alone, then the gate hands that slot on: forgotten, holder listed.
    claim_through_sql_alone(&app, &token, "4").await;
    app.receive(5, &token).await.assert_status(200);
    // A user SQL says already received, handed a slot: given back, user kept listed.
    let (_, slot) = dead_claim(&app, &keys, 9).await;
    claim_through_sql_alone(&app, &token, "9").await;
    gate.release_to_others(&keys, user(9), slot).await.unwrap();
    // A hold whose claim died, taken over after the lease.
    dead_claim(&app, &keys, 6).await;
    let (kept, actual) = counts(&app, &token).await;
    assert_eq!(kept, actual);
    // Newcomers drain the free slots, then one takes the dead hold over.
    app.advance(lease(&app));
    for id in 20..=26 {
        let answer = app.receive(id, &token).await;
        if answer.status != 200 {
            answer.assert_problem(409, "SPRAY_EXHAUSTED");
        }
    }
    let (kept, actual) = counts(&app, &token).await;
    assert_eq!(kept, actual, "kept counts against the keys");
    // Every share recorded and no hold left: the dead one was taken over.
    assert_eq!(app.recipients(&token).await.1.len(), 6);
    assert_eq!(actual[1], 0, "no hold left");
    let mark: Option<i64> = redis.query(redis::cmd("HGET").arg(&keys.meta).arg("mark")).await;
    assert_eq!(mark, Some(1), "the keys were never rebuilt");
    app.assert_audit_clean().await;
}

/// One call with several claims (`claim/gathered.rs`) keeps the counts right as it hands
/// out slots, takes a hold over and refuses, so the next claim finds the keys intact.
#[tokio::test]
async fn a_call_of_several_claims_keeps_the_counts_right() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    let (gate, lease, now) = (gate(&app), lease(&app), app.now());
    let at = |id, now| (user(id), now);
    let later = now + lease + TimeDelta::milliseconds(1);
    let verdicts = gate
        .claim_many(
            &keys,
            &[
                at(2, now),
                at(3, now),
                at(2, now),
                at(4, now),
                at(5, now),
                at(6, later),
            ],
            lease,
        )
        .await
        .unwrap();
    let kinds: Vec<&str> = verdicts
        .iter()
        .map(|v| verdict_kind(v.as_ref().unwrap()))
        .collect();
    assert_eq!(kinds, ["SLOT", "SLOT", "ALREADY", "SLOT", "EXHAUSTED", "SLOT"]);
    assert_eq!(counts(&app, &token).await, ([0, 3, 4], [0, 3, 4]));
    // The next call finds them intact: no rebuild, the same holds.
    let next = gate.claim(&keys, user(7), now, lease).await.unwrap();
    assert_eq!(verdict_kind(&next), "EXHAUSTED");
    assert_eq!(counts(&app, &token).await, ([0, 3, 4], [0, 3, 4]));
}

/// Keys that disagree with their counts are dropped by the first claim of a call, and
/// every claim of it is answered "missing", as calls one after another would be; so is
/// every claim after one whose time is past the keys' trust.
#[tokio::test]
async fn a_call_of_several_claims_on_lost_or_stale_keys_answers_missing_after_the_loss() {
    let app = TestApp::new().await;
    let (gate, lease, now) = (gate(&app), lease(&app), app.now());
    let at = |id, now| (user(id), now);
    let kinds = |verdicts: Vec<Result<GateVerdict, _>>| -> Vec<&'static str> {
        verdicts
            .iter()
            .map(|v| verdict_kind(v.as_ref().unwrap()))
            .collect()
    };

    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    evict(&app, &keys.free).await;
    let verdicts = gate
        .claim_many(&keys, &[at(2, now), at(3, now)], lease)
        .await
        .unwrap();
    assert_eq!(kinds(verdicts), ["MISSING", "MISSING"]);
    let exists: i64 = raw(&app).await.query(redis::cmd("EXISTS").arg(&keys.meta)).await;
    assert_eq!(exists, 0, "the keys were dropped");

    // A claim long after the window (by the service's clock) drops the keys; the claim
    // before it was handed a slot, and the claim after it finds nothing.
    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    let long_after = now + TimeDelta::days(1);
    let verdicts = gate
        .claim_many(&keys, &[at(2, now), at(3, long_after), at(4, now)], lease)
        .await
        .unwrap();
    assert_eq!(kinds(verdicts), ["SLOT", "MISSING", "MISSING"]);
    let left: i64 = raw(&app)
        .await
        .query(
            redis::cmd("EXISTS")
                .arg(&keys.meta)
                .arg(&keys.free)
                .arg(&keys.receivers)
                .arg(&keys.holds),
        )
        .await;
    assert_eq!(left, 0, "no key left, none without a time to live");
}

fn verdict_kind(verdict: &GateVerdict) -> &'static str {
    match verdict {
        GateVerdict::Missing => "MISSING",
        GateVerdict::OwnSpray { .. } => "OWN",
        GateVerdict::AlreadyHeld { .. } => "ALREADY",
        GateVerdict::Expired { .. } => "EXPIRED",
        GateVerdict::Exhausted { .. } => "EXHAUSTED",
        GateVerdict::Slot { .. } => "SLOT",
    }
}
