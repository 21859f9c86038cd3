//! Retention: sprays leave the store a grace period after their lookup window, with their
//! shares; the ledger stays, and their tokens are free again.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use spray::jobs::{purge_expired_once, settle_expired_once};

use crate::common::{OWNER, TestApp, start_time};

const GRACE: TimeDelta = TimeDelta::days(1);

/// The first instant at which a spray made at the start may be purged.
fn purgeable() -> DateTime<Utc> {
    start_time() + TimeDelta::days(7) + GRACE
}

/// One pass of the sweepers at `at`: settle, then purge; how many sprays were purged.
async fn purge(app: &TestApp, at: DateTime<Utc>) -> usize {
    sweep(app.store.as_ref(), at, GRACE, 100).await
}

async fn sweep(store: &dyn spray::store::Store, at: DateTime<Utc>, grace: TimeDelta, batch: u32) -> usize {
    settle_expired_once(store, at, batch).await.unwrap();
    purge_expired_once(store, at, grace, batch).await.unwrap()
}

async fn rows(app: &TestApp, table: &str) -> i64 {
    app.count_where(format!("SELECT COUNT(*) FROM {table}")).await
}

#[tokio::test]
async fn a_spray_is_kept_until_the_grace_after_its_lookup_window_has_passed() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    settle_expired_once(app.store.as_ref(), start_time() + TimeDelta::minutes(10), 100)
        .await
        .unwrap();

    assert_eq!(purge(&app, purgeable() - TimeDelta::milliseconds(1)).await, 0);
    app.clock.set(purgeable() - TimeDelta::milliseconds(1));
    app.lookup(OWNER, &token)
        .await
        .assert_problem(410, "LOOKUP_EXPIRED");
    assert_eq!((rows(&app, "sprays").await, rows(&app, "shares").await), (1, 3));

    assert_eq!(purge(&app, purgeable()).await, 1);
    app.clock.set(purgeable());
    assert_eq!((rows(&app, "sprays").await, rows(&app, "shares").await), (0, 0));
    // The money history stays: the DEBIT, the CREDIT and the REFUND.
    assert_eq!(rows(&app, "ledger").await, 3);
    app.lookup(OWNER, &token)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    app.get(&format!("/api/v1/spray/{token}"), OWNER, None)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    app.receive(3, &token)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    assert_eq!(purge(&app, purgeable()).await, 0);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_spray_the_sweeper_never_settled_is_settled_before_it_is_purged() {
    let app = TestApp::new().await;
    app.spray(4000, 3).await;
    assert_eq!(purge(&app, purgeable()).await, 1);
    let refunded_in_full = app
        .store
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND' AND amount = 4000")
        .await
        .unwrap();
    assert_eq!(refunded_in_full, 1);
    assert_eq!(rows(&app, "sprays").await, 0);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_token_of_a_purged_spray_is_free_again() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(4000, 3).await;
    assert_eq!(purge(&app, purgeable()).await, 1);
    app.clock.set(purgeable());
    // The same sprayer in the same room draws it again: free in both scopes.
    app.tokens.push("AAA");
    assert_eq!(app.spray(50, 5).await, "AAA");
    let body = app.lookup(OWNER, "AAA").await.body;
    assert_eq!(
        (body["total_amount"].as_u64(), body["status"].as_str()),
        (Some(50), Some("active"))
    );
    app.receive(2, "AAA").await.assert_status(200);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn purging_goes_in_small_batches_oldest_first() {
    let app = TestApp::new().await;
    for amount in [100, 200, 300, 400, 500] {
        app.spray(amount, 2).await;
        app.advance(TimeDelta::seconds(1));
    }
    let all_purgeable = purgeable() + TimeDelta::seconds(4);
    let purge_two = || sweep(app.store.as_ref(), all_purgeable, GRACE, 2);
    assert_eq!(purge_two().await, 2);
    let oldest_gone = app
        .store
        .count("SELECT COUNT(*) FROM sprays WHERE total_amount IN (100, 200)")
        .await
        .unwrap();
    assert_eq!(oldest_gone, 0);
    assert_eq!(purge_two().await, 2);
    assert_eq!(purge_two().await, 1);
    assert_eq!(purge_two().await, 0);
    let debits = app
        .store
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'DEBIT'")
        .await
        .unwrap();
    assert_eq!(debits, 5);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn without_grace_a_spray_goes_when_its_lookup_window_closes() {
    let app = TestApp::new().await;
    app.spray(10, 2).await;
    let lookup_closes = start_time() + TimeDelta::days(7);
    let none = TimeDelta::zero();
    let store = app.store.as_ref();
    assert_eq!(
        sweep(store, lookup_closes - TimeDelta::milliseconds(1), none, 10).await,
        0
    );
    assert_eq!(sweep(store, lookup_closes, none, 10).await, 1);
    assert_eq!(rows(&app, "sprays").await, 0);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_spray_made_after_a_purge_never_inherits_the_purged_spray_history() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    assert_eq!(purge(&app, purgeable()).await, 1);
    app.clock.set(purgeable());
    // Someone else sprays next: a spray id of its own, whatever the backend hands out.
    let next = app
        .spray_as(5, "ROOM-2", json!({"amount": 60, "recipient_count": 2}))
        .await;
    let fresh_history = app
        .store
        .count(
            "SELECT COUNT(*) FROM ledger l JOIN sprays s ON s.id = l.spray_id
             WHERE s.owner_id = 5 AND NOT (l.kind = 'DEBIT' AND l.user_id = 5 AND l.amount = 60)",
        )
        .await
        .unwrap();
    assert_eq!(
        fresh_history, 0,
        "the new spray carries the purged one's ledger entries"
    );
    let body = app
        .get(&format!("/api/v1/spray/{next}"), 5, Some("ROOM-2"))
        .await
        .body;
    assert_eq!(
        (
            body["received_amount"].as_u64(),
            body["recipients"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
    app.assert_audit_clean().await;
}
