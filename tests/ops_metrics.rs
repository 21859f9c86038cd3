//! Metrics move when their events happen, with low-cardinality labels only.
//!
//! The recorder is one per process, so the tests of this file take turns (`SERIAL`) and
//! compare a metric before and after their own requests.

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::Request;
use common::{OWNER, ROOM, TestApp};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One sample of the Prometheus text: its name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `labels` (0 if none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let answer = app
        .send(Request::builder().uri("/metrics").body(Body::empty()).unwrap())
        .await;
    answer.assert_status(200);
    parse(&String::from_utf8(answer.raw).unwrap())
}

#[tokio::test]
async fn a_spray_counts_as_created_with_its_mode() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let before = scrape(&app).await;
    app.spray_as(
        OWNER,
        ROOM,
        json!({"amount": 10, "recipient_count": 2, "mode": "random"}),
    )
    .await;
    let after = scrape(&app).await;
    let random = [("mode", "random")];
    assert_eq!(
        value(&after, "spray_sprays_created_total", &random),
        value(&before, "spray_sprays_created_total", &random) + 1.0
    );
    let even = [("mode", "even")];
    assert_eq!(
        value(&after, "spray_sprays_created_total", &even),
        value(&before, "spray_sprays_created_total", &even)
    );
    // The store call was timed.
    let insert = [("operation", "insert_spray"), ("outcome", "ok")];
    assert_eq!(
        value(&after, "spray_store_duration_seconds_count", &insert),
        value(&before, "spray_store_duration_seconds_count", &insert) + 1.0
    );
}

#[tokio::test]
async fn a_claim_counts_and_a_refusal_counts_under_its_code() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let token = app.spray(10, 1).await;
    let before = scrape(&app).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    let after = scrape(&app).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(delta("spray_claims_total", &[]), 1.0);
    assert_eq!(
        delta("spray_rejections_total", &[("code", "SPRAY_EXHAUSTED")]),
        1.0
    );
    assert_eq!(delta("spray_rejections_total", &[("code", "OWN_SPRAY")]), 1.0);
    assert_eq!(
        delta("spray_rejections_total", &[("code", "ALREADY_RECEIVED")]),
        0.0
    );
    let route = [("route", "/api/v1/receive"), ("method", "POST")];
    assert_eq!(
        delta("http_requests_total", &[route[0], route[1], ("status", "200")]),
        1.0
    );
    assert_eq!(
        delta("http_requests_total", &[route[0], route[1], ("status", "409")]),
        1.0
    );
    assert_eq!(delta("http_request_duration_seconds_count", &route), 3.0);
    assert_eq!(
        delta(
            "spray_store_duration_seconds_count",
            &[("operation", "claim_share")]
        ),
        3.0
    );
}

#[tokio::test]
async fn routes_are_labelled_by_their_template_never_by_the_raw_path() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let before = scrape(&app).await;
    app.get("/api/v1/spray/Zz9", OWNER, Some(ROOM))
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    app.get("/no/such/thing/4242", OWNER, None)
        .await
        .assert_problem(404, "NOT_FOUND");
    let after = scrape(&app).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(
        delta(
            "http_requests_total",
            &[("route", "/api/v1/spray/{token}"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    // Neither the token nor the scanner's path became a label value.
    for sample in &after {
        for value in sample.labels.values() {
            assert!(!value.contains("Zz9") && !value.contains("4242"), "{sample:?}");
        }
    }
}

#[tokio::test]
async fn the_functions_for_refunds_and_the_redis_gate_move_their_counters() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let before = scrape(&app).await;
    spray::telemetry::record_refund(spray::domain::Amount::new(667));
    spray::telemetry::record_gate_hit();
    spray::telemetry::record_gate_miss();
    spray::telemetry::record_gate_rebuild();
    spray::telemetry::record_gate_fallback();
    spray::telemetry::record_gate_fallback();
    spray::telemetry::record_pool_use("sqlite", 5, 3);
    let after = scrape(&app).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(delta("spray_refunds_total", &[]), 1.0);
    assert_eq!(delta("spray_refunded_amount_total", &[]), 667.0);
    for (event, times) in [("hit", 1.0), ("miss", 1.0), ("rebuild", 1.0), ("fallback", 2.0)] {
        assert_eq!(
            delta("spray_gate_events_total", &[("event", event)]),
            times,
            "{event}"
        );
    }
    assert_eq!(
        value(&after, "spray_store_pool_connections", &[("state", "in_use")]),
        2.0
    );
    assert_eq!(
        value(&after, "spray_store_pool_connections", &[("state", "idle")]),
        3.0
    );
}
