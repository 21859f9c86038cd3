//! Protection from slow and flooding clients: a request past the timeout and a request
//! past the concurrency bound both get a clean problem+json 503 with `Retry-After`.
//!
//! The slow client is simulated with a request body that never finishes, so no test
//! waits in real time: the timeout runs on tokio's paused clock.

mod common;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::Request;
use common::{OWNER, ROOM, TestApp};
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
fn assert_clean_unavailable(answer: &common::Answer) {
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

    let answer = app
        .post(
            "/api/v1/spray",
            OWNER,
            Some(ROOM),
            json!({"amount": 10, "recipient_count": 2}),
        )
        .await;
    assert_clean_unavailable(&answer);
    assert!(answer.body["detail"].as_str().unwrap().contains("capacity"));
    app.get("/api/v1/spray/abc", OWNER, Some(ROOM))
        .await
        .assert_problem(503, "UNAVAILABLE");
    // The operations endpoints take no permit: a saturated instance still says it lives.
    app.send(Request::builder().uri("/healthz").body(Body::empty()).unwrap())
        .await
        .assert_status(200);

    // The slow clients go away; their permits come back.
    stuck.abort_all();
    while stuck.join_next().await.is_some() {}
    app.spray(10, 2).await;
}

#[tokio::test]
async fn the_protection_settings_are_checked_at_start() {
    for bad in [
        Settings {
            request_timeout: Duration::ZERO,
            ..Settings::default()
        },
        Settings {
            max_concurrent_requests: 0,
            ..Settings::default()
        },
    ] {
        assert!(bad.policy().is_err(), "{bad:?}");
    }
}
