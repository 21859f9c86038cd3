//! Protection from slow and flooding clients: a request past the timeout and a request
//! past the concurrency bound both get a clean problem+json 503 with `Retry-After`.
//!
//! The slow client is simulated with a request body that never finishes, so no test
//! waits in real time: the timeout runs on tokio's paused clock.

use std::time::Duration;

use crate::common::process::assert_refuses_to_start;
use crate::common::{OWNER, ROOM, TestApp, plain_get};
use axum::body::{Body, Bytes};
use axum::http::Request;
use futures_util::StreamExt;
use serde_json::json;
use spray::config::Settings;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A spray request whose body sends one byte, says so on `started`, then never ends:
/// a slow client holding its request open.
fn stuck_spray(started: mpsc::Sender<()>) -> Request<Body> {
    let first = futures_util::stream::once(async move {
        let _ = started.send(()).await;
        Ok::<_, std::io::Error>(Bytes::from_static(b"{"))
    });
    let body = Body::from_stream(first.chain(futures_util::stream::pending()));
    Request::builder()
        .method("POST")
        .uri("/api/v1/spray")
        .header("content-type", "application/json")
        .header("x-user-id", "1")
        .header("x-room-id", ROOM)
        .body(body)
        .unwrap()
}

#[track_caller]
fn assert_clean_unavailable(answer: &crate::common::Answer) {
    answer.assert_problem(503, "UNAVAILABLE");
    assert_eq!(answer.headers["retry-after"], "1");
    let detail = answer.body["detail"].as_str().unwrap();
    assert!(detail.contains("try again"), "{detail}");
}

#[tokio::test]
async fn a_request_past_the_timeout_gets_a_clean_503() {
    let settings = Settings {
        request_timeout: Duration::from_secs(3),
        ..Settings::default()
    };
    let app = TestApp::with_settings(settings).await;
    // From here on, time only moves when every task waits: the stuck body makes the
    // runtime jump straight to the timeout.
    tokio::time::pause();
    let (started, mut started_rx) = mpsc::channel(1);
    let begun = tokio::time::Instant::now();
    // A guard far past the timeout, so that a missing timeout fails instead of hanging.
    let answer = tokio::time::timeout(Duration::from_secs(60), app.send(stuck_spray(started)))
        .await
        .expect("no answer: the request timeout did not fire");
    assert!(started_rx.recv().await.is_some(), "the body was never read");
    assert_clean_unavailable(&answer);
    assert!(
        answer.body["detail"].as_str().unwrap().contains("too long"),
        "{}",
        answer.body
    );
    let waited = begun.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "answered after {waited:?}"
    );
    tokio::time::resume();
    // Nothing was written, and the service still serves.
    assert_eq!(app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 0);
    app.spray(10, 2).await;
}

#[tokio::test]
async fn requests_past_the_concurrency_bound_are_shed_with_503_not_queued() {
    let settings = Settings {
        max_concurrent_requests: 2,
        ..Settings::default()
    };
    let app = TestApp::with_settings(settings).await;
    let (started, mut started_rx) = mpsc::channel(2);
    let mut stuck = JoinSet::new();
    for _ in 0..2 {
        stuck.spawn(app.router.clone().oneshot(stuck_spray(started.clone())));
    }
    // Both are inside their handlers, reading their bodies: both permits are taken.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(30), started_rx.recv())
            .await
            .expect("the slow requests never reached their handlers")
            .unwrap();
    }

    let answer = app.post_spray(json!({"amount": 10, "recipient_count": 2})).await;
    assert_clean_unavailable(&answer);
    assert!(answer.body["detail"].as_str().unwrap().contains("capacity"));
    app.get("/api/v1/spray/abc", OWNER, Some(ROOM))
        .await
        .assert_problem(503, "UNAVAILABLE");
    // The operations endpoints take no permit: a saturated instance still says it lives.
    app.send(plain_get("/healthz")).await.assert_status(200);

    // The slow clients go away; their permits come back.
    stuck.abort_all();
    while stuck.join_next().await.is_some() {}
    app.spray(10, 2).await;
}

#[tokio::test]
async fn the_protection_settings_are_checked_at_start() {
    // The real binary, started with each bad setting: it refuses before it opens the
    // store or serves, and says which setting is wrong.
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--request-timeout", "0s"), ("--max-concurrent-requests", "0")] {
        assert_refuses_to_start(dir.path(), &format!("{flag} {value}"), &[flag, value], &[], flag).await;
    }
}

#[tokio::test]
async fn requests_past_the_store_concurrency_are_refused_at_once_and_change_nothing() {
    use sqlx::Connection;

    let settings = Settings {
        store_concurrency: 1,
        ..Settings::default()
    };
    let app = TestApp::with_settings(settings).await;
    // Another connection holds SQLite's write lock: a spray waits inside the store.
    let mut holder = sqlx::SqliteConnection::connect(&app.settings.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut holder).await.unwrap();
    let spray_request = || {
        Request::builder()
            .method("POST")
            .uri("/api/v1/spray")
            .header("content-type", "application/json")
            .header("x-user-id", "10")
            .header("x-room-id", ROOM)
            .body(Body::from(r#"{"amount": 10, "recipient_count": 2}"#))
            .unwrap()
    };
    let mut waiting = tokio::spawn(app.router.clone().oneshot(spray_request()));
    // A lookup reads without the write lock, so it is answered at once either way: 404
    // while the permit is free, 503 once the spray holds it. (Should a lookup take the
    // permit just as the spray asks for it, the spray is the one refused: send it again,
    // and let it run to the store before the next lookup. On this single-threaded runtime
    // a spray sent just before a lookup first runs while the lookup waits for its answer,
    // permit in hand.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spray never held the store"
        );
        if waiting.is_finished() {
            let early = waiting.await.unwrap().unwrap();
            assert_eq!(early.status(), 503, "the spray ended while the store was locked");
            waiting = tokio::spawn(app.router.clone().oneshot(spray_request()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let answer = app.lookup(OWNER, "abc").await;
        if answer.status == 503 {
            break answer;
        }
        answer.assert_problem(404, "SPRAY_NOT_FOUND");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_clean_unavailable(&refused);
    // Another spray is refused at once too, before anything is written.
    let other = app
        .post(
            "/api/v1/spray",
            12,
            Some(ROOM),
            json!({"amount": 10, "recipient_count": 2}),
        )
        .await;
    assert_clean_unavailable(&other);

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().status(), 201);
    let written = |owner: i64| format!("SELECT COUNT(*) FROM sprays WHERE owner_id = {owner}");
    assert_eq!(app.count_where(written(10)).await, 1);
    assert_eq!(app.count_where(written(12)).await, 0);
    // Once the store has room again, the refused sprayer's retry goes through.
    app.spray_as(12, ROOM, json!({"amount": 10, "recipient_count": 2}))
        .await;
    app.assert_audit_clean().await;
}
