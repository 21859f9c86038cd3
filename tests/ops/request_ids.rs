//! Request ids: every request gets an id that is echoed back. (What the request span
//! logs is in `ops_logging.rs`.)

use crate::common::{OWNER, ROOM, TestApp};
use axum::body::Body;
use axum::http::Request;

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
    let id = |answer: &crate::common::Answer| answer.headers["x-request-id"].to_str().unwrap().to_owned();
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
