//! A 5xx means nothing was written, and a key is never blocked longer than its lease
//! after a failure (`docs/contract.md` sections 2.3 and 6), under network faults made
//! at exact points of the MySQL protocol by a proxy between the service and MariaDB (see
//! `tests/common/proxy.rs`).
//!
//! MySQL only: the faults are on the wire. On MySQL + Redis the claims go through the
//! gate's point update (`claim_slot`), on MySQL alone through `claim_share`.

use std::time::Duration;

use chrono::TimeDelta;
use serde_json::json;
use spray::config::Settings;
use spray::domain::{Endpoint, Fingerprint, IdempotencyKey, UserId};
use spray::store::{Begin, IdempotentRequest};
use sqlx::Connection;

use crate::common::proxy::Fault;
use crate::common::{Answer, OWNER, ROOM, TestApp};

const SPRAY: &str = "/api/v1/spray";
const RECEIVE: &str = "/api/v1/receive";
const SPRAY_BODY: &str = r#"{"amount": 4000, "recipient_count": 3}"#;
const RECEIVER: i64 = 2;

/// A count read straight from the test's database, around the proxy.
async fn direct_count(app: &TestApp, sql: &str) -> i64 {
    let pool = sqlx::MySqlPool::connect(app.direct_database_url()).await.unwrap();
    let count = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    count
}

async fn receive_keyed(app: &TestApp, token: &str, key: &str) -> Answer {
    let body = json!({ "token": token }).to_string();
    app.post_keyed(RECEIVE, RECEIVER, Some(ROOM), Some(key), &body)
        .await
}

/// A spray of 1000 in ten even shares of 100, written before any fault is armed.
async fn spray_of_ten(app: &TestApp) -> String {
    app.spray(1000, 10).await
}

async fn receipts_of(app: &TestApp, user: i64) -> i64 {
    direct_count(
        app,
        &format!("SELECT COUNT(*) FROM shares WHERE receiver_id = {user}"),
    )
    .await
}

async fn credits(app: &TestApp) -> i64 {
    direct_count(app, "SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_whose_commit_acknowledgement_is_lost_answers_the_share_it_got() {
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    let token = spray_of_ten(&app).await;
    proxy.arm(Fault::LoseCommitAck);

    let answer = receive_keyed(&app, &token, "lost-ack").await;
    assert_eq!(proxy.fired(), 1, "the COMMIT's acknowledgement was lost");
    answer.assert_status(200);
    assert_eq!(answer.body, json!({ "received_amount": 100 }));
    assert_eq!(receipts_of(&app, RECEIVER).await, 1);
    assert_eq!(credits(&app).await, 1);

    // The kept answer committed with the share: a retry replays it and changes nothing.
    let again = receive_keyed(&app, &token, "lost-ack").await;
    again.assert_status(200);
    assert_eq!(again.raw, answer.raw);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(credits(&app).await, 1);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_whose_commit_acknowledgement_is_lost_answers_201_and_is_there() {
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    app.tokens.push("ACK");
    proxy.arm(Fault::LoseCommitAck);

    let answer = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("lost-ack"), SPRAY_BODY)
        .await;
    assert_eq!(proxy.fired(), 1, "the COMMIT's acknowledgement was lost");
    answer.assert_status(201);
    assert_eq!(answer.body["token"], "ACK");
    assert_eq!(answer.headers["location"], "/api/v1/spray/ACK");
    assert_eq!(
        direct_count(&app, "SELECT COUNT(*) FROM sprays WHERE token = 'ACK'").await,
        1
    );
    let looked_up = app.lookup(OWNER, "ACK").await;
    looked_up.assert_status(200);
    assert_eq!(looked_up.body["total_amount"], 4000);

    let again = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("lost-ack"), SPRAY_BODY)
        .await;
    again.assert_status(201);
    assert_eq!(again.raw, answer.raw);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(direct_count(&app, "SELECT COUNT(*) FROM sprays").await, 1);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_reached_the_database_answers_503_and_the_retry_receives_once() {
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    let token = spray_of_ten(&app).await;
    proxy.arm(Fault::DropCommit);

    let answer = receive_keyed(&app, &token, "no-commit").await;
    assert_eq!(proxy.fired(), 1, "the COMMIT was dropped");
    answer.assert_problem(503, "UNAVAILABLE");
    assert_eq!(receipts_of(&app, RECEIVER).await, 0);
    assert_eq!(credits(&app).await, 0);
    assert_eq!(direct_count(&app, "SELECT COUNT(*) FROM idempotency").await, 0);

    let retried = receive_keyed(&app, &token, "no-commit").await;
    retried.assert_status(200);
    assert!(retried.headers.get("idempotent-replayed").is_none());
    assert_eq!(receipts_of(&app, RECEIVER).await, 1);
    assert_eq!(credits(&app).await, 1);
    app.assert_audit_clean().await;
}

/// The claims of one spray that wait behind its batch being written are written as the
/// next batch, together: when that batch's `COMMIT` never reaches the database, every claim
/// in it is answered 503, none of them is written, and each keyed retry then receives
/// exactly once (issue 10: "a batch whose commit fails answers 503 to all").
///
/// To gather the claims deterministically, the test holds the spray's row with a lock of
/// its own: a first claim's batch waits on it (every claim takes the spray's shared lock),
/// and the claims sent meanwhile queue behind that batch. Once they have all passed the
/// idempotency layer (their keys' rows are written), the lock is let go: the first batch
/// commits, and the `COMMIT` of the next one, holding the waiting claims, is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_claims_whose_commit_is_dropped_answers_503_to_each_and_each_retry_receives_once() {
    const WAITING: std::ops::RangeInclusive<i64> = 3..=8;
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    let token = spray_of_ten(&app).await;
    // A first claim loads the spray into the gate (on MySQL + Redis), so that the claims
    // below go straight to the store's batches.
    app.receive(9, &token).await.assert_status(200);

    let mut lock = sqlx::MySqlConnection::connect(app.direct_database_url())
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM sprays WHERE token = '{token}' FOR UPDATE"
    )))
    .fetch_all(&mut lock)
    .await
    .unwrap();

    let keyed = |user: i64| {
        let body = json!({ "token": token }).to_string();
        let app = &app;
        async move {
            app.post_keyed(RECEIVE, user, Some(ROOM), Some(&format!("batch-{user}")), &body)
                .await
        }
    };
    // A batch's statement taking the spray's shared lock, still running (waiting for it).
    let blocked_batches = "SELECT COUNT(*) FROM information_schema.PROCESSLIST
         WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND COMMAND = 'Query'
           AND INFO LIKE '%FROM sprays%LOCK IN SHARE MODE%'";
    let (first, waiting) = tokio::join!(keyed(RECEIVER), async {
        assert!(
            eventually(&app, blocked_batches, 1, Duration::from_secs(10)).await,
            "the first claim's batch never waited on the test's lock"
        );
        let control = async {
            let keys = "SELECT COUNT(*) FROM idempotency";
            let all = 1 + i64::try_from(WAITING.count()).unwrap();
            assert!(
                eventually(&app, keys, all, Duration::from_secs(10)).await,
                "the claims never reached the store"
            );
            proxy.arm(Fault::DropCommitAfter(1));
            sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
        };
        let (waiting, ()) = tokio::join!(futures_util::future::join_all(WAITING.map(&keyed)), control);
        waiting
    });

    first.assert_status(200);
    assert_eq!(proxy.fired(), 1, "the second batch's COMMIT was dropped");
    // Every 503 comes from the one batch whose COMMIT was dropped. All the claims waiting
    // are in it unless one reached the queue after the lock was let go (a very slow
    // machine); at least two are, or the test would not show a batch failing whole.
    let failed: Vec<i64> = WAITING
        .zip(&waiting)
        .filter(|(_, answer)| answer.status == 503)
        .map(|(user, _)| user)
        .collect();
    assert!(
        failed.len() >= 2,
        "the dropped batch held {} claims",
        failed.len()
    );
    for (user, answer) in WAITING.zip(&waiting) {
        if failed.contains(&user) {
            answer.assert_problem(503, "UNAVAILABLE");
            assert_eq!(receipts_of(&app, user).await, 0, "user {user} was answered 503");
        } else {
            answer.assert_status(200);
            assert_eq!(receipts_of(&app, user).await, 1);
        }
    }
    let received = 2 + i64::try_from(WAITING.count() - failed.len()).unwrap();
    assert_eq!(credits(&app).await, received);

    // Each retry runs afresh and receives once; a second retry replays its answer.
    for &user in &failed {
        let retried = keyed(user).await;
        retried.assert_status(200);
        assert!(retried.headers.get("idempotent-replayed").is_none());
        let again = keyed(user).await;
        again.assert_status(200);
        assert_eq!(again.headers["idempotent-replayed"], "true");
        assert_eq!(again.raw, retried.raw);
        assert_eq!(receipts_of(&app, user).await, 1);
    }
    assert_eq!(credits(&app).await, 2 + i64::try_from(WAITING.count()).unwrap());
    app.assert_audit_clean().await;
}

/// Polls `sql` around the proxy until it answers `want`, for at most `within`.
async fn eventually(app: &TestApp, sql: &str, want: i64, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        if direct_count(app, sql).await == want {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_release_failed_is_free_again_as_soon_as_the_database_is_back() {
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    let token = spray_of_ten(&app).await;
    // The key's row is written, then the database goes away as the claim begins: 503, and
    // the release of the row cannot reach the database either.
    proxy.arm(Fault::DownAtBegin);
    let answer = receive_keyed(&app, &token, "outage").await;
    assert_eq!(proxy.fired(), 1, "the database went away at BEGIN");
    answer.assert_problem(503, "UNAVAILABLE");
    let pending = "SELECT COUNT(*) FROM idempotency WHERE status_code IS NULL AND effect IS NULL";
    assert_eq!(
        direct_count(&app, pending).await,
        1,
        "the release could not be written"
    );
    assert_eq!(credits(&app).await, 0);

    // The database is back; the service clock has not moved, so no lease has passed: the
    // key is freed by the release being retried, within a second or so.
    proxy.up();
    assert!(
        eventually(
            &app,
            "SELECT COUNT(*) FROM idempotency",
            0,
            Duration::from_secs(5)
        )
        .await,
        "the failed release was never retried"
    );
    let retried = receive_keyed(&app, &token, "outage").await;
    retried.assert_status(200);
    assert!(retried.headers.get("idempotent-replayed").is_none());
    assert_eq!(receipts_of(&app, RECEIVER).await, 1);
    assert_eq!(credits(&app).await, 1);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_left_pending_by_a_request_that_never_answered_is_taken_over_after_the_lease() {
    let settings = Settings {
        idempotency_lease: Duration::from_secs(3),
        ..Settings::default()
    };
    let app = TestApp::with_settings(settings).await;
    // A first request wrote its pending row, then its instance died: nothing releases it.
    let now = app.now();
    let crashed = IdempotentRequest {
        user: UserId::from_stored(OWNER).unwrap(),
        endpoint: Endpoint::Spray,
        key: IdempotencyKey::parse("crashed").unwrap(),
        fingerprint: Fingerprint::of(&serde_json::from_str(SPRAY_BODY).unwrap(), Some(ROOM)),
        now,
        abandoned_before: now - TimeDelta::seconds(3),
        lease: 1,
    };
    assert!(matches!(
        app.store.begin_idempotent(&crashed).await.unwrap(),
        Begin::Run(_)
    ));
    let retry = || app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("crashed"), SPRAY_BODY);
    retry().await.assert_problem(409, "IDEMPOTENCY_IN_PROGRESS");
    app.advance(TimeDelta::seconds(3));
    retry().await.assert_problem(409, "IDEMPOTENCY_IN_PROGRESS");
    app.advance(TimeDelta::milliseconds(1));
    let taken_over = retry().await;
    taken_over.assert_status(201);
    assert!(taken_over.headers.get("idempotent-replayed").is_none());
    assert_eq!(direct_count(&app, "SELECT COUNT(*) FROM sprays").await, 1);
    app.assert_audit_clean().await;
}

/// The proxy itself: it relays faithfully until armed, so a fault a test sees is the one
/// it armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_relays_everything_until_armed() {
    let (app, proxy) = TestApp::behind_proxy(Settings::default()).await;
    let token = spray_of_ten(&app).await;
    receive_keyed(&app, &token, "plain").await.assert_status(200);
    assert_eq!(proxy.fired(), 0);
    app.assert_audit_clean().await;
}
