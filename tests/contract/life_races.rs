//! Real concurrency at the end of a spray's life: sweepers racing each other, receives
//! racing the sweeper at the deadline, and identical idempotent requests racing each
//! other. Tasks on a multi-threaded runtime, through the real router and the real store.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::TimeDelta;
use serde_json::json;
use spray::jobs::settle_expired_once;
use spray::store::Store;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::common::{OWNER, ROOM, TestApp, window_closes};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_sweepers_on_two_instances_settle_each_spray_exactly_once() {
    let app = TestApp::new().await;
    // 30 sprays: some untouched, some partly received, some received in full.
    let mut with_rest = 0;
    for index in 0..30_i64 {
        let token = app.spray(1000, 4).await;
        let receivers = index % 5;
        for user in 0..receivers.min(4) {
            app.receive(100 + user, &token).await.assert_status(200);
        }
        if receivers < 4 {
            with_rest += 1;
        }
    }
    // Two instances, four sweepers each, all at the deadline.
    let stores: [Arc<dyn Store>; 2] = [app.store.clone(), app.second_store().await];
    let mut sweepers = JoinSet::new();
    for round in 0..8 {
        let store = stores[round % 2].clone();
        sweepers.spawn(async move { settle_expired_once(store.as_ref(), window_closes(), 100).await });
    }
    let mut settled = 0;
    while let Some(done) = sweepers.join_next().await {
        settled += done.unwrap().unwrap();
    }
    assert_eq!(
        settled, 30,
        "each spray is counted by the one sweeper that settled it"
    );
    let refunds = app
        .store
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND'")
        .await
        .unwrap();
    assert_eq!(refunds, with_rest);
    let unsettled = app
        .store
        .count("SELECT COUNT(*) FROM sprays WHERE settled_at IS NULL")
        .await
        .unwrap();
    assert_eq!(unsettled, 0);
    app.assert_audit_clean().await;
}

/// `sprays` sprays of 10 shares of 100. For each, 8 members race for a share at the last
/// millisecond inside the window while a sweeper settles it at the deadline: the nine
/// start together (a barrier), the sweeper a few scheduler turns late or early, so it lands
/// at different points among the claims.
/// Returns how many claims got a share and how many saw the window closed.
async fn receives_against_the_sweeper(app: &Arc<TestApp>, sprays: usize) -> (usize, usize) {
    let mut tokens = Vec::new();
    for _ in 0..sprays {
        let token = app.spray(1000, 10).await;
        let id = app
            .count_where(format!(
                "SELECT id FROM sprays WHERE room_id = '{ROOM}' AND token = '{token}'"
            ))
            .await;
        tokens.push((token, id));
    }
    // Every claim's clock reads the last millisecond inside the window; the sweepers'
    // clocks read the deadline.
    app.clock.set(window_closes() - TimeDelta::milliseconds(1));
    let second = app.second_store().await;
    let mut racers = JoinSet::new();
    for (index, (token, spray_id)) in tokens.iter().cloned().enumerate() {
        let start = Arc::new(Barrier::new(9));
        for user in 2..=9_i64 {
            let (app, token, start) = (app.clone(), token.clone(), start.clone());
            racers.spawn(async move {
                start.wait().await;
                Some((token.clone(), app.receive(user, &token).await))
            });
        }
        let (store, start) = (second.clone(), start.clone());
        racers.spawn(async move {
            start.wait().await;
            for _ in 0..index % 8 {
                tokio::task::yield_now().await;
            }
            store.settle_spray(spray_id, window_closes()).await.unwrap();
            None
        });
    }
    let mut received: HashMap<String, u64> = HashMap::new();
    let (mut got, mut closed) = (0, 0);
    while let Some(done) = racers.join_next().await {
        let Some((token, answer)) = done.unwrap() else {
            continue;
        };
        match answer.status.as_u16() {
            200 => {
                got += 1;
                *received.entry(token).or_default() += answer.body["received_amount"].as_u64().unwrap();
            }
            _ => {
                answer.assert_problem(410, "RECEIVE_EXPIRED");
                closed += 1;
            }
        }
    }
    second.close().await;
    // The sprayer sees exactly what the members were told, and the rest refunded.
    for (token, _) in &tokens {
        let body = app.lookup(OWNER, token).await.body;
        let paid = received.get(token).copied().unwrap_or(0);
        assert_eq!(body["received_amount"].as_u64(), Some(paid), "{body}");
        assert_eq!(body["refunded_amount"].as_u64(), Some(1000 - paid), "{body}");
        assert_eq!(body["status"], "expired");
    }
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receives_racing_the_sweeper_at_the_deadline_never_double_spend() {
    let app = Arc::new(TestApp::new().await);
    let sprays = 24;
    let (got, closed) = receives_against_the_sweeper(&app, sprays).await;
    assert_eq!(
        got + closed,
        sprays * 8,
        "{got} received, {closed} saw the window closed"
    );
    let refunds = app
        .store
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'REFUND'")
        .await
        .unwrap();
    assert_eq!(
        usize::try_from(refunds).unwrap(),
        sprays,
        "each spray had shares left, and is refunded once"
    );
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_sprays_with_one_key_at_once_spray_once() {
    let app = Arc::new(TestApp::new().await);
    let body = r#"{"amount": 900, "recipient_count": 3}"#;
    let mut racers = JoinSet::new();
    for _ in 0..20 {
        let app = app.clone();
        racers.spawn(async move {
            app.post_keyed("/api/v1/spray", OWNER, Some(ROOM), Some("once"), body)
                .await
        });
    }
    let mut created = Vec::new();
    while let Some(answer) = racers.join_next().await {
        let answer = answer.unwrap();
        match answer.status.as_u16() {
            201 => created.push(answer.raw),
            _ => answer.assert_problem(409, "IDEMPOTENCY_IN_PROGRESS"),
        }
    }
    assert!(!created.is_empty());
    assert!(
        created.iter().all(|raw| *raw == created[0]),
        "every 201 is the same answer"
    );
    let sprays = app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap();
    assert_eq!(sprays, 1);
    let replay = app
        .post_keyed("/api/v1/spray", OWNER, Some(ROOM), Some("once"), body)
        .await;
    assert_eq!(replay.raw, created[0]);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_receives_with_one_key_at_once_receive_once() {
    let app = Arc::new(TestApp::new().await);
    let token = app.spray(1000, 10).await;
    let body = json!({ "token": token }).to_string();
    let mut racers = JoinSet::new();
    for _ in 0..20 {
        let (app, body) = (app.clone(), body.clone());
        racers.spawn(async move {
            app.post_keyed("/api/v1/receive", 2, Some(ROOM), Some("once"), &body)
                .await
        });
    }
    let mut received = Vec::new();
    while let Some(answer) = racers.join_next().await {
        let answer = answer.unwrap();
        match answer.status.as_u16() {
            200 => received.push(answer.raw),
            _ => answer.assert_problem(409, "IDEMPOTENCY_IN_PROGRESS"),
        }
    }
    assert!(!received.is_empty());
    assert!(received.iter().all(|raw| *raw == received[0]));
    let credits = app
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
        .await;
    assert_eq!(credits, 1);
    app.assert_audit_clean().await;
}
