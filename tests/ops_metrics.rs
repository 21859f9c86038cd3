//! Metrics move when their events happen, with low-cardinality labels only.
//!
//! The recorder is one per process, so the tests of this file take turns (`SERIAL`) and
//! compare a metric before and after their own requests (read with `common::metrics`).
//! Every metric here is moved by what the service does (requests, claims, the settlement
//! sweeper), never by calling the recording functions.

mod common;

use common::metrics::{self, scrape, value};
use common::{OWNER, ROOM, RawRedis, TestApp, window_closes};
use serde_json::json;
use spray::clock::Clock;
use spray::config::Settings;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let delta = |name: &str, labels: &[(&str, &str)]| metrics::delta(&before, &after, name, labels);
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
    // The winner and the loser went to the store; the loser taught the instance that the
    // spray is taken for good (one read), so the sprayer was answered from memory.
    assert_eq!(
        delta(
            "spray_store_duration_seconds_count",
            &[("operation", "claim_share")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "spray_store_duration_seconds_count",
            &[("operation", "claim_snapshot")]
        ),
        1.0
    );
    assert_eq!(delta("spray_claims_remembered_total", &[]), 1.0);
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
    let delta = |name: &str, labels: &[(&str, &str)]| metrics::delta(&before, &after, name, labels);
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
async fn a_settlement_moves_the_refund_counters_by_its_refund() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    // 2001 in three even shares of 667: one is received, two (1334) are left.
    let token = app.spray(2001, 3).await;
    app.receive(2, &token).await.assert_status(200);
    // A spray nobody touched is refunded in full; one received in full is not refunded.
    app.spray(50, 2).await;
    let full = app.spray(10, 1).await;
    app.receive(3, &full).await.assert_status(200);
    let before = scrape(&app).await;
    // The receive window closes; the settlement sweeper's pass settles all three.
    let settled = spray::jobs::settle_expired_once(app.store.as_ref(), window_closes(), 100)
        .await
        .unwrap();
    assert_eq!(settled, 3);
    let after = scrape(&app).await;
    let delta = |name: &str, labels: &[(&str, &str)]| metrics::delta(&before, &after, name, labels);
    assert_eq!(delta("spray_refunds_total", &[]), 2.0);
    assert_eq!(delta("spray_refunded_amount_total", &[]), 1384.0);
    // A second pass finds nothing more to settle, and moves nothing.
    let again = spray::jobs::settle_expired_once(app.store.as_ref(), window_closes(), 100)
        .await
        .unwrap();
    assert_eq!(again, 0);
    let last = scrape(&app).await;
    for name in ["spray_refunds_total", "spray_refunded_amount_total"] {
        assert_eq!(value(&last, name, &[]), value(&after, name, &[]), "{name}");
    }
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn claims_through_the_redis_gate_move_its_event_counters() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::with_settings(Settings {
        redis_url: Some(common::redis_url()),
        ..Settings::default()
    })
    .await;
    let token = app.spray(100, 3).await;
    let events = |samples: &[common::metrics::Sample], event: &str| {
        value(samples, "spray_gate_events_total", &[("event", event)])
    };
    let before = scrape(&app).await;
    // The gate holds the new spray's keys: the claim is a hit.
    app.receive(2, &token).await.assert_status(200);
    let after_hit = scrape(&app).await;
    // The keys are lost: the next claim misses, rebuilds them from SQL, and then hits.
    let mut redis = RawRedis::connect_url(&common::redis_url()).await;
    for key in app.gate_keys(&token).all() {
        let _: i64 = redis.query(redis::cmd("DEL").arg(key)).await;
    }
    app.receive(3, &token).await.assert_status(200);
    let after_rebuild = scrape(&app).await;
    for (event, hit, rebuilt) in [
        ("hit", 1.0, 1.0),
        ("miss", 0.0, 1.0),
        ("rebuild", 0.0, 1.0),
        ("fallback", 0.0, 0.0),
    ] {
        assert_eq!(events(&after_hit, event) - events(&before, event), hit, "{event}");
        assert_eq!(
            events(&after_rebuild, event) - events(&after_hit, event),
            rebuilt,
            "{event}"
        );
    }

    // Where Redis cannot be reached, each claim falls back to SQL alone.
    let nowhere = format!("redis://127.0.0.1:{}", common::process::free_port());
    let unreachable = TestApp::with_settings(Settings {
        redis_url: Some(nowhere),
        ..Settings::default()
    })
    .await;
    let token = unreachable.spray(100, 3).await;
    let before = scrape(&unreachable).await;
    unreachable.receive(2, &token).await.assert_status(200);
    unreachable.receive(3, &token).await.assert_status(200);
    let after = scrape(&unreachable).await;
    for (event, times) in [("hit", 0.0), ("miss", 0.0), ("rebuild", 0.0), ("fallback", 2.0)] {
        assert_eq!(events(&after, event) - events(&before, event), times, "{event}");
    }
}

#[tokio::test]
async fn the_pool_gauge_reports_the_stores_connections_at_each_scrape() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let token = app.spray(100, 2).await;
    app.lookup(OWNER, &token).await.assert_status(200);
    let samples = scrape(&app).await;
    let state = |state: &str| {
        value(
            &samples,
            "spray_store_pool_connections",
            &[("backend", "sqlite"), ("state", state)],
        )
    };
    // The writer's one connection and at least the reader the lookup used (at most four
    // readers). How many are idle depends on when the pool takes a connection back.
    let open = state("idle") + state("in_use");
    assert!((2.0..=5.0).contains(&open), "open connections: {open}");
}

#[tokio::test]
async fn a_sweep_reports_its_passes_its_last_success_and_the_settlements_it_is_late_with() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::new().await;
    let settings = app.settings.sweep().unwrap();
    app.spray(100, 2).await;
    let sweep = || spray::jobs::sweep(app.store.as_ref(), app.clock.as_ref(), settings);
    let passes = |samples: &[common::metrics::Sample], outcome: &str| {
        value(
            samples,
            "spray_sweeper_passes_total",
            &[("sweeper", "settle"), ("outcome", outcome)],
        )
    };
    let last_success = |samples: &[common::metrics::Sample]| {
        value(
            samples,
            "spray_sweeper_last_success_timestamp_seconds",
            &[("sweeper", "settle")],
        )
    };
    // Past the receive window, but not yet past what a healthy sweeper is allowed
    // (two sweep intervals and a minute): not overdue.
    app.advance(chrono::TimeDelta::minutes(10) + chrono::TimeDelta::seconds(5));
    let before = scrape(&app).await;
    sweep().await;
    let after = scrape(&app).await;
    assert_eq!(value(&after, "spray_settlement_overdue_sprays", &[]), 0.0);
    assert_eq!(passes(&after, "ok") - passes(&before, "ok"), 1.0);
    let now = app.clock.now();
    let seconds = f64::from(u32::try_from(now.timestamp()).unwrap())
        + f64::from(now.timestamp_subsec_millis()) / 1000.0;
    assert_eq!(last_success(&after), seconds);

    // Another spray's window closes and nobody settles it for longer than that: the next
    // sweep counts it overdue before settling it, and the one after finds none.
    app.spray(100, 2).await;
    app.advance(chrono::TimeDelta::minutes(10) + chrono::TimeDelta::seconds(81));
    sweep().await;
    assert_eq!(
        value(&scrape(&app).await, "spray_settlement_overdue_sprays", &[]),
        1.0
    );
    sweep().await;
    let settled = scrape(&app).await;
    assert_eq!(value(&settled, "spray_settlement_overdue_sprays", &[]), 0.0);

    // A pass that fails (the store is gone) counts as an error and moves no success time.
    app.store.close().await;
    app.advance(chrono::TimeDelta::minutes(1));
    sweep().await;
    let failed = scrape(&app).await;
    assert_eq!(passes(&failed, "error") - passes(&settled, "error"), 1.0);
    assert_eq!(last_success(&failed), last_success(&settled));
}

#[tokio::test]
async fn a_spray_taken_for_good_shows_in_the_remembered_gauges() {
    let _turn = SERIAL.lock().await;
    let app = TestApp::with_settings(Settings {
        redis_url: Some(common::redis_url()),
        ..Settings::default()
    })
    .await;
    let token = app.spray(100, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    let gauges = |samples: &[common::metrics::Sample]| {
        (
            value(samples, "spray_gate_remembered_sprays", &[]),
            value(samples, "spray_gate_remembered_receivers", &[]),
        )
    };
    // This loser learns from the gate that the spray is taken for good: the instance
    // remembers it, with its two receivers. (The gauges are the process's: an app of an
    // earlier test, with a memory of its own, set them last until now.)
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    let after = gauges(&scrape(&app).await);
    assert_eq!(after, (1.0, 2.0));
    // Answered from memory: nothing more is remembered.
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    assert_eq!(gauges(&scrape(&app).await), after);
    app.assert_audit_clean().await;
}

/// A split source that panics: a bug inside a handler, for the panic catcher to answer.
struct PanickingRandomness;

impl spray::domain::SplitRandomness for PanickingRandomness {
    fn generator(&self) -> Result<rand::rngs::StdRng, String> {
        panic!("a bug in a handler")
    }
}

/// A service whose split source panics if asked for a generator.
async fn with_panicking_split_source() -> TestApp {
    let mut app = TestApp::new().await;
    let sources = spray::service::Sources {
        clock: app.clock.clone(),
        tokens: app.tokens.clone(),
        randomness: std::sync::Arc::new(PanickingRandomness),
    };
    app.router = spray::startup::build_router(&app.settings, app.store.clone(), sources).unwrap();
    app
}

/// A handler that panics is answered with a problem+json 500 that says nothing of the bug,
/// with a request id, and counted under its route: the panic catcher sits inside the layer
/// that names, counts and logs every request (`src/http/mod.rs`).
#[tokio::test]
async fn a_panicking_handler_is_answered_500_with_a_request_id_and_counted() {
    let _turn = SERIAL.lock().await;
    let app = with_panicking_split_source().await;
    let before = scrape(&app).await;
    // A random split: an even one asks the split source for nothing (the test below).
    let answer = app
        .post(
            "/api/v1/spray",
            OWNER,
            Some(ROOM),
            json!({"amount": 10, "recipient_count": 2, "mode": "random"}),
        )
        .await;
    answer.assert_problem(500, "INTERNAL");
    let text = String::from_utf8_lossy(&answer.raw);
    assert!(!text.contains("a bug in a handler"), "{text}");
    assert_eq!(answer.headers["x-request-id"].len(), 36);
    let after = scrape(&app).await;
    let delta = |name: &str, labels: &[(&str, &str)]| metrics::delta(&before, &after, name, labels);
    assert_eq!(
        delta(
            "http_requests_total",
            &[("route", "/api/v1/spray"), ("status", "500")]
        ),
        1.0
    );
    assert_eq!(delta("spray_rejections_total", &[("code", "INTERNAL")]), 1.0);
}

/// An even split draws nothing, so an even spray makes no generator: its seed would be a
/// `getrandom` system call on every spray of the default mode. The split source here
/// panics if asked.
#[tokio::test]
async fn an_even_spray_asks_the_split_source_for_nothing() {
    let _turn = SERIAL.lock().await;
    let app = with_panicking_split_source().await;
    for body in [
        json!({"amount": 10, "recipient_count": 4}),
        json!({"amount": 10, "recipient_count": 4, "mode": "even"}),
    ] {
        let answer = app.post("/api/v1/spray", OWNER, Some(ROOM), body).await;
        answer.assert_status(201);
    }
    app.assert_audit_clean().await;
}
