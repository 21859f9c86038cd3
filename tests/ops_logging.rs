//! The request span: every line logged while serving a request carries its method,
//! route, request id, trace id, user and token, and health checks stay out of the info log.
//!
//! Alone in its test binary on purpose: tracing caches per call site whether anyone
//! listens, and a test on another thread of the same binary hitting the same call sites
//! without a subscriber races with the subscriber this test installs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use common::{OWNER, ROOM, TestApp};
use serde_json::Value;

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
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
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
    assert_eq!(receive["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
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
