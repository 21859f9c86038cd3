//! A keyed request cancelled mid-way (the client went away) releases its key, so the
//! retry runs instead of hearing "in progress" until the row counts as abandoned.
//!
//! MySQL only: the test parks the request behind a row lock held by another transaction,
//! which the embedded store's single writer cannot show without also blocking the key's
//! first step.

use std::sync::Arc;

use serde_json::json;

use crate::common::{ROOM, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_releases_its_key_so_the_retry_runs() {
    let app = Arc::new(TestApp::new().await);
    let token = app.spray(1000, 10).await;
    // Another transaction holds the spray row, as a settlement would: the claim waits.
    let pool = sqlx::MySqlPool::connect(&app.settings.database_url)
        .await
        .unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM sprays WHERE token = ? FOR UPDATE")
        .bind(&token)
        .fetch_one(&mut *blocker)
        .await
        .unwrap();
    let body = json!({ "token": token }).to_string();
    let request = {
        let (app, body) = (app.clone(), body.clone());
        tokio::spawn(async move {
            app.post_keyed("/api/v1/receive", 2, Some(ROOM), Some("gone"), &body)
                .await
        })
    };
    // The key is pending while the claim waits; then the client goes away.
    app.eventually_count(
        "SELECT COUNT(*) FROM idempotency WHERE status_code IS NULL AND effect IS NULL",
        1,
    )
    .await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    app.eventually_count("SELECT COUNT(*) FROM idempotency", 0).await;
    blocker.rollback().await.unwrap();
    pool.close().await;

    let retried = app
        .post_keyed("/api/v1/receive", 2, Some(ROOM), Some("gone"), &body)
        .await;
    retried.assert_status(200);
    assert!(retried.headers.get("idempotent-replayed").is_none());
    let credits = app
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
        .await;
    assert_eq!(credits, 1);
    app.assert_audit_clean().await;
}
