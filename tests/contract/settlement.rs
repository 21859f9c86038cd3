//! Settlement: when the receive window closes with shares left, one REFUND of the rest
//! goes back to the sprayer. The sweeper's run-once function is called directly, with the
//! time the test chooses.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use spray::jobs::settle_expired_once;

use crate::common::{OWNER, ROOM, TestApp, start_time, window_closes};

async fn settle(app: &TestApp, at: DateTime<Utc>) -> usize {
    settle_expired_once(app.store.as_ref(), at, 100).await.unwrap()
}

async fn refunds(app: &TestApp) -> i64 {
    app.count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND'")
        .await
}

async fn settled(app: &TestApp) -> i64 {
    app.count("SELECT COUNT(*) FROM sprays WHERE settled_at IS NOT NULL")
        .await
}

#[tokio::test]
async fn the_last_millisecond_inside_the_window_settles_nothing() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    assert_eq!(
        settle(&app, window_closes() - TimeDelta::milliseconds(1)).await,
        0
    );
    assert_eq!((refunds(&app).await, settled(&app).await), (0, 0));
    app.advance(TimeDelta::minutes(10) - TimeDelta::milliseconds(1));
    // Still open: the last member in time receives.
    app.receive(3, &token).await.assert_status(200);
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["status"].as_str(), body["refunded_amount"].as_u64()),
        (Some("active"), Some(0))
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_first_millisecond_after_the_window_refunds_the_rest_once() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    assert_eq!(settle(&app, window_closes()).await, 1);
    let exact_refund = app
        .count_where(format!(
            "SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND' AND user_id = {OWNER} AND amount = 2667 AND at = {}",
            window_closes().timestamp_millis()
        ))
        .await;
    assert_eq!(
        exact_refund, 1,
        "one REFUND of 4000 - 1333 to the sprayer, dated at settlement"
    );
    // However often the sweeper comes back, and whenever.
    assert_eq!(settle(&app, window_closes()).await, 0);
    assert_eq!(settle(&app, window_closes() + TimeDelta::days(3)).await, 0);
    assert_eq!(refunds(&app).await, 1);
    app.advance(TimeDelta::minutes(10));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(body["status"], "expired");
    assert_eq!(body["received_amount"], 1333);
    assert_eq!(body["refunded_amount"], 2667);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_lookup_shows_the_same_refund_before_and_after_the_sweeper_ran() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    app.advance(TimeDelta::minutes(10));
    // Derived from the clock, before the sweeper ran...
    let derived = app.lookup(OWNER, &token).await;
    derived.assert_status(200);
    assert_eq!(derived.body["refunded_amount"], 2667);
    // ...and stored, after: the same answer to the byte.
    assert_eq!(settle(&app, app.now()).await, 1);
    let stored = app.lookup(OWNER, &token).await;
    assert_eq!(stored.raw, derived.raw);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_fully_received_spray_is_settled_without_a_refund() {
    let app = TestApp::new().await;
    let token = app.spray(10, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    // Completed sprays are only settled once their window closed, like the others.
    assert_eq!(
        settle(&app, window_closes() - TimeDelta::milliseconds(1)).await,
        0
    );
    assert_eq!(settle(&app, window_closes()).await, 1);
    assert_eq!(refunds(&app).await, 0);
    assert_eq!(settled(&app).await, 1);
    assert_eq!(
        settle(&app, window_closes()).await,
        0,
        "a settled spray is not visited again"
    );
    app.advance(TimeDelta::minutes(10));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["status"].as_str(), body["refunded_amount"].as_u64()),
        (Some("completed"), Some(0))
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_spray_nobody_received_is_refunded_in_full() {
    let app = TestApp::new().await;
    let token = app
        .spray_as(
            OWNER,
            ROOM,
            json!({"amount": 777, "recipient_count": 5, "mode": "random"}),
        )
        .await;
    assert_eq!(settle(&app, window_closes()).await, 1);
    let full_refund = app
        .store
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND' AND amount = 777")
        .await
        .unwrap();
    assert_eq!(full_refund, 1);
    app.advance(TimeDelta::minutes(10));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["received_amount"].as_u64(), body["refunded_amount"].as_u64()),
        (Some(0), Some(777))
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_claim_from_inside_the_window_that_comes_after_the_settlement_sees_it_closed() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    // The sweeper (on an instance whose clock reads the deadline) settles first; then a
    // claim whose clock still reads the last millisecond inside the window arrives.
    assert_eq!(settle(&app, window_closes()).await, 1);
    app.advance(TimeDelta::minutes(10) - TimeDelta::milliseconds(1));
    app.receive(3, &token)
        .await
        .assert_problem(410, "RECEIVE_EXPIRED");
    // The earlier rules still come first on a settled spray.
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    // And the sprayer sees it closed, with the refund that was booked.
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(body["status"], "expired");
    assert_eq!(body["refunded_amount"], 2667);
    assert_eq!(body["recipients"].as_array().unwrap().len(), 1);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn sprays_are_settled_oldest_first_in_batches() {
    let app = TestApp::new().await;
    let mut tokens = Vec::new();
    for (token, amount) in [
        ("AAA", 100),
        ("AAB", 200),
        ("AAC", 300),
        ("AAD", 400),
        ("AAE", 500),
    ] {
        app.tokens.push(token);
        tokens.push(app.spray(amount, 2).await);
        app.advance(TimeDelta::seconds(1));
    }
    let last_closes = window_closes() + TimeDelta::seconds(4);
    let settled_amounts = || async {
        app.count_where(
            "SELECT CAST(COALESCE(SUM(total_amount), 0) AS SIGNED) FROM sprays WHERE settled_at IS NOT NULL"
                .to_owned(),
        )
        .await
    };
    assert_eq!(
        settle_expired_once(app.store.as_ref(), last_closes, 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(settled_amounts().await, 100 + 200);
    assert_eq!(
        settle_expired_once(app.store.as_ref(), last_closes, 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(settled_amounts().await, 100 + 200 + 300 + 400);
    assert_eq!(
        settle_expired_once(app.store.as_ref(), last_closes, 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        settle_expired_once(app.store.as_ref(), last_closes, 2)
            .await
            .unwrap(),
        0
    );
    assert_eq!(refunds(&app).await, 5);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn only_sprays_whose_window_closed_are_settled() {
    let app = TestApp::new().await;
    app.tokens.push("OLD");
    app.spray(100, 2).await;
    app.advance(TimeDelta::minutes(5));
    app.tokens.push("NEW");
    app.spray(100, 2).await;
    // The first closes at 10 minutes, the second at 15.
    assert_eq!(settle(&app, window_closes()).await, 1);
    let new_open = app
        .store
        .count("SELECT COUNT(*) FROM sprays WHERE token = 'NEW' AND settled_at IS NULL")
        .await
        .unwrap();
    assert_eq!(new_open, 1);
    app.advance(TimeDelta::minutes(5) - TimeDelta::milliseconds(1));
    app.receive(2, "NEW").await.assert_status(200);
    assert_eq!(settle(&app, window_closes() + TimeDelta::minutes(5)).await, 1);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_the_sweepers_on_its_clock_and_stops_them_on_shutdown() {
    use std::sync::Arc;

    use spray::clock::ManualClock;
    use spray::config::Settings;
    use spray::domain::ScriptedTokens;
    use spray::startup::Application;

    let app = TestApp::new().await;
    app.spray(4000, 3).await;
    // The server's own clock already reads the deadline: its first pass settles.
    let clock = Arc::new(ManualClock::new(window_closes()));
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        sweep_interval: std::time::Duration::from_millis(20),
        ..app.settings.clone()
    };
    let sources = spray::service::Sources {
        clock: clock.clone(),
        tokens: Arc::new(ScriptedTokens::default()),
        randomness: Arc::new(spray::domain::SeededRandomness::new(1)),
    };
    let server = Application::build_with(&settings, sources).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run_until(async {
        let _ = stopped.await;
    }));
    app.eventually_count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND'", 1)
        .await;
    // A day after the lookup window, a later pass purges it.
    clock.set(start_time() + TimeDelta::days(8));
    app.eventually_count("SELECT COUNT(*) FROM sprays", 0).await;
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), running).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the server did not stop cleanly: {ended:?}"
    );
    app.assert_audit_clean().await;
}
