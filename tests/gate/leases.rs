//! Fair under failure: a share the gate handed to a claim that then died goes back to the
//! other members after the claim lease, and a claim whose request went away still runs to
//! its end. Runs on one Redis and on a Redis Cluster.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use chrono::TimeDelta;
use spray::domain::{Amount, RoomId, Token};
use spray::gate::{GateKeys, GateVerdict};
use spray::store::{Claim, SlotClaim};
use sqlx::Connection;
use tower::ServiceExt;

use super::{dead_claim, gate, lease, user};
use crate::common::process::assert_refuses_to_start;
use crate::common::{OWNER, ROOM, RawRedis, TestApp};

/// How long the tests wait for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(20);

fn claim_of(app: &TestApp, token: &str, id: i64) -> Claim {
    Claim {
        room: RoomId::parse(ROOM).unwrap(),
        token: Token::parse(token).unwrap(),
        user: user(id),
        now: app.now(),
    }
}

async fn holds(redis: &mut RawRedis, keys: &GateKeys) -> i64 {
    redis.query(redis::cmd("ZCARD").arg(&keys.holds)).await
}

/// Polls the condition (an expression with `.await`s) until it holds, for at most
/// [`PATIENCE`].
macro_rules! eventually {
    ($what:expr, $condition:expr) => {{
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !$condition {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never happened: {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

#[tokio::test]
async fn a_share_held_by_a_dead_claim_is_exhausted_only_within_the_lease() {
    let app = TestApp::new().await;
    let token = app.spray(100, 1).await;
    let keys = app.gate_keys(&token);
    dead_claim(&app, &keys, 2).await;

    // While the hold is younger than the lease, the share may still be recorded.
    app.receive(3, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.advance(lease(&app) - TimeDelta::milliseconds(1));
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");

    // Past the lease, the next member gets the share instead of SPRAY_EXHAUSTED...
    app.advance(TimeDelta::milliseconds(1));
    let answer = app.receive(5, &token).await;
    answer.assert_status(200);
    assert_eq!(answer.body["received_amount"], 100);
    // ...and the dead claim's member, coming back, is refused by SQL, not paid twice.
    app.receive(2, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.receive(6, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    assert_eq!(app.recipients(&token).await, (100, HashSet::from([5])));
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_late_original_holder_and_the_taker_cannot_both_record_the_share() {
    let app = TestApp::new().await;
    let token = app.spray(100, 1).await;
    let keys = app.gate_keys(&token);
    let (spray_id, slot) = dead_claim(&app, &keys, 2).await;
    app.advance(lease(&app));

    // User 3's claim takes the hold over...
    let verdict = gate(&app)
        .claim(&keys, user(3), app.now(), lease(&app))
        .await
        .unwrap();
    assert_eq!(
        verdict,
        GateVerdict::Slot {
            spray_id,
            slot,
            taken_over: true
        }
    );
    // ...but the original holder was only slow, and records it first.
    let late = app
        .store
        .claim_slot(&claim_of(&app, &token, 2), spray_id, slot, None)
        .await;
    assert_eq!(late.unwrap(), SlotClaim::Received(Amount::new(100)));
    let taker = app
        .store
        .claim_slot(&claim_of(&app, &token, 3), spray_id, slot, None)
        .await;
    assert_eq!(taker.unwrap(), SlotClaim::Taken);

    // Through the API: the taker finds the spray exhausted, the late holder received.
    app.receive(3, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    assert_eq!(app.recipients(&token).await, (100, HashSet::from([2])));
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_recorded_share_is_confirmed_and_never_taken_over() {
    let app = TestApp::new().await;
    let token = app.spray(100, 1).await;
    let keys = app.gate_keys(&token);
    let mut redis = RawRedis::connect(app.backend).await;
    app.receive(2, &token).await.assert_status(200);
    assert_eq!(holds(&mut redis, &keys).await, 0, "the hold was not confirmed");
    app.advance(lease(&app) * 3);
    app.receive(3, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
}

#[tokio::test]
async fn concurrent_winners_are_all_confirmed_and_only_their_holds() {
    let app = TestApp::new().await;
    let token = app.spray(6_000, 60).await;
    let keys = app.gate_keys(&token);
    let mut redis = RawRedis::connect(app.backend).await;
    // One hold that nothing records (its claim died): confirming the others must leave it.
    dead_claim(&app, &keys, 1_000).await;
    // Winners at once: their confirmations are gathered into shared calls.
    let answers = futures_util::future::join_all((2..61).map(|id| app.receive(id, &token))).await;
    for answer in &answers {
        answer.assert_status(200);
    }
    assert_eq!(
        holds(&mut redis, &keys).await,
        1,
        "only the dead claim's hold is left"
    );
    // Confirmed holds are never taken over; the dead one is, after the lease.
    app.advance(lease(&app));
    app.receive(61, &token).await.assert_status(200);
    app.receive(62, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    assert_eq!(app.recipients(&token).await.1.len(), 60);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_gate_confirms_several_holds_of_a_spray_in_one_call() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    let mut redis = RawRedis::connect(app.backend).await;
    let (_, first) = dead_claim(&app, &keys, 2).await;
    let (_, second) = dead_claim(&app, &keys, 3).await;
    let (_, third) = dead_claim(&app, &keys, 4).await;
    // A hold named with the wrong user is not anyone's: it changes nothing.
    gate(&app)
        .confirm(&keys, &[(user(2), first), (user(3), third), (user(4), third)])
        .await
        .unwrap();
    assert_eq!(holds(&mut redis, &keys).await, 1);
    let left: Vec<String> = redis
        .query(redis::cmd("ZRANGE").arg(&keys.holds).arg(0).arg(-1))
        .await;
    assert_eq!(left, vec![format!("{second}:3")]);
}

#[tokio::test]
async fn a_claim_whose_client_went_away_after_the_gate_step_still_records_its_share() {
    let app = TestApp::new().await;
    let token = app.spray(100, 1).await;
    let keys = app.gate_keys(&token);
    let mut redis = RawRedis::connect(app.backend).await;

    // Another transaction holds the spray row, so the claim waits in SQL right after the
    // gate handed it the slot.
    let mut blocker = sqlx::MySqlConnection::connect(&app.settings.database_url)
        .await
        .unwrap();
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query("SELECT id FROM sprays WHERE token = ? FOR UPDATE")
        .bind(&token)
        .execute(&mut *lock)
        .await
        .unwrap();
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/receive")
        .header("content-type", "application/json")
        .header("x-user-id", "2")
        .header("x-room-id", ROOM)
        .body(Body::from(format!(r#"{{"token":"{token}"}}"#)))
        .unwrap();
    let client = tokio::spawn(app.router.clone().oneshot(request));
    let mut probe = RawRedis::connect(app.backend).await;
    eventually!("the gate hands out the slot", holds(&mut probe, &keys).await == 1);

    // The client goes away: its request is dropped mid-claim.
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    lock.commit().await.unwrap();

    // The claim ran to its end anyway: the share is recorded and the hold confirmed.
    let recorded = format!(
        "SELECT COUNT(*) FROM shares WHERE receiver_id = 2 AND amount = 100 AND spray_id = \
         (SELECT id FROM sprays WHERE token = '{token}')"
    );
    eventually!(
        "the share is recorded",
        app.count_where(recorded.clone()).await == 1
    );
    eventually!("the hold is confirmed", holds(&mut redis, &keys).await == 0);
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.receive(3, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_claim_lease_is_checked_against_the_request_timeout() {
    let mut settings = spray::config::Settings {
        redis_url: Some("redis://127.0.0.1:6379".into()),
        ..Default::default()
    };
    assert!(settings.claim_lease().is_ok());
    settings.claim_lease = settings.request_timeout;
    assert!(settings.claim_lease().is_err(), "a lease as long as the time-out");
    settings.claim_lease = Duration::from_millis(10);
    assert!(
        settings.claim_lease().is_err(),
        "a lease too short to record a share"
    );
    // And the real binary refuses to start with either.
    let dir = tempfile::tempdir().unwrap();
    for (what, lease) in [
        ("a lease as long as the time-out", "10s"),
        ("a lease too short to record a share", "10ms"),
    ] {
        let flags = [
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--request-timeout",
            "10s",
            "--claim-lease",
            lease,
        ];
        assert_refuses_to_start(dir.path(), what, &flags, &[], "--claim-lease").await;
    }
}

/// Claims on one spray are sent to the gate together (`claim/gathered.rs`): one call must
/// decide each exactly as calls one after another would, in the order given, a later
/// claim seeing what an earlier one did (the same user twice, the last free share, the
/// holds past their lease taken over one each).
#[tokio::test]
async fn several_claims_in_one_gate_call_are_decided_as_calls_one_after_another() {
    let app = TestApp::new().await;
    let token = app.spray(300, 3).await;
    let keys = app.gate_keys(&token);
    let (gate, lease, now) = (gate(&app), lease(&app), app.now());
    let at = |id, now| (user(id), now);
    let verdicts = gate
        .claim_many(
            &keys,
            &[
                at(2, now),
                at(2, now),
                at(OWNER, now),
                at(3, now),
                at(4, now),
                at(5, now),
            ],
            lease,
        )
        .await
        .unwrap();
    let verdicts: Vec<GateVerdict> = verdicts.into_iter().map(Result::unwrap).collect();
    let spray_id = match verdicts[0] {
        GateVerdict::Slot { spray_id, .. } => spray_id,
        other => panic!("the first claim got {other:?}"),
    };
    let slot = |slot, taken_over| GateVerdict::Slot {
        spray_id,
        slot,
        taken_over,
    };
    assert_eq!(
        verdicts,
        [
            slot(0, false),
            GateVerdict::AlreadyHeld { spray_id, slot: 0 },
            GateVerdict::OwnSpray { spray_id },
            slot(1, false),
            slot(2, false),
            // Every share held, none past its lease yet.
            GateVerdict::Exhausted {
                spray_id,
                shares: 3,
                for_good: false
            },
        ]
    );

    // Nothing recorded any of them: past the lease, each newcomer takes over one hold,
    // oldest first, and a newcomer who took one already holds it.
    let later = now + lease + TimeDelta::milliseconds(1);
    let verdicts: Vec<GateVerdict> = gate
        .claim_many(&keys, &[at(6, later), at(7, later), at(6, later)], lease)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        verdicts,
        [
            slot(0, true),
            slot(1, true),
            GateVerdict::AlreadyHeld { spray_id, slot: 0 }
        ]
    );
}
