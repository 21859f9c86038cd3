//! Request ids and the request span: every request gets an id that is echoed back, and
//! its log lines carry the method, route, request id, user and token.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use common::{OWNER, ROOM, TestApp};
use serde_json::Value;

#[tokio::test]
async fn a_given_request_id_is_echoed() {
    let app = TestApp::new().await;
    for path in ["/healthz", "/api/v1/spray/abc", "/nowhere"] {
        let request = Request::builder()
            .uri(path)
            .header("x-request-id", "req-42.abc")
            .body(Body::empty())
            .unwrap();
        let answer = app.send(request).await;
        assert_eq!(answer.headers["x-request-id"], "req-42.abc", "{path}");
    }
}

#[tokio::test]
async fn a_missing_or_unusable_request_id_is_replaced_by_a_fresh_one() {
    let app = TestApp::new().await;
    let first = app.get("/api/v1/spray/abc", OWNER, Some(ROOM)).await;
    let second = app.get("/api/v1/spray/abc", OWNER, Some(ROOM)).await;
    let id = |answer: &common::Answer| answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id(&first).len(), 36, "{}", id(&first));
    assert_ne!(id(&first), id(&second));
    let too_long = "x".repeat(200);
    for bad in ["", "has space", too_long.as_str()] {
        let request = Request::builder()
            .uri("/healthz")
            .header("x-request-id", bad)
            .body(Body::empty())
            .unwrap();
        let answer = app.send(request).await;
        let echoed = answer.headers["x-request-id"].to_str().unwrap();
        assert_ne!(echoed, bad);
        assert_eq!(echoed.len(), 36);
    }
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

// One thread, so that the subscriber set for this test sees every event of its requests.
#[tokio::test(flavor = "current_thread")]
async fn log_lines_carry_the_request_span_and_health_checks_stay_out_of_the_info_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::new().await;
    app.tokens.push("IEY");
    let token = app.spray(4000, 3).await;
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/receive")
        .header("content-type", "application/json")
        .header("x-user-id", "7")
        .header("x-room-id", ROOM)
        .header("x-request-id", "trace-me-1")
        .body(Body::from(format!(r#"{{"token":"{token}"}}"#)))
        .unwrap();
    app.send(request).await.assert_status(200);
    for path in ["/healthz", "/readyz", "/metrics"] {
        app.send(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .assert_status(200);
    }

    let lines = captured.lines();
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "answered")
        .collect();
    let receive = answered
        .iter()
        .find(|l| l["span"]["request_id"] == "trace-me-1")
        .unwrap_or_else(|| panic!("no line for the receive request in {lines:#?}"));
    assert_eq!(receive["level"], "INFO");
    assert_eq!(receive["span"]["method"], "POST");
    assert_eq!(receive["span"]["route"], "/api/v1/receive");
    assert_eq!(receive["span"]["user_id"], 7);
    assert_eq!(receive["span"]["token"], "IEY");
    assert_eq!(receive["fields"]["status"], 200);
    let spray = answered
        .iter()
        .find(|l| l["span"]["route"] == "/api/v1/spray")
        .unwrap_or_else(|| panic!("no line for the spray request in {lines:#?}"));
    assert_eq!(spray["span"]["token"], "IEY");
    assert_eq!(spray["span"]["user_id"], OWNER);
    for quiet in ["/healthz", "/readyz", "/metrics"] {
        assert!(
            !lines.iter().any(|l| l["span"]["route"] == quiet),
            "{quiet} was logged at info: {lines:#?}"
        );
    }
}
