//! POST /api/v1/spray: creating a spray.

use crate::common::{OWNER, ROOM, TestApp};
use chrono::TimeDelta;
use serde_json::json;

#[tokio::test]
async fn spraying_answers_201_with_location_token_and_windows() {
    let app = TestApp::new().await;
    let answer = app
        .post_spray(json!({"amount": 4000, "recipient_count": 3}))
        .await;
    answer.assert_status(201);
    let token = answer.body["token"].as_str().unwrap();
    assert_eq!(token.len(), 3);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(answer.headers["location"], format!("/api/v1/spray/{token}"));
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.body["created_at"], "2024-02-21T09:33:10.123Z");
    assert_eq!(answer.body["receive_until"], "2024-02-21T09:43:10.123Z");
    assert_eq!(answer.body["lookup_until"], "2024-02-28T09:33:10.123Z");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn even_shares_are_received_in_order_with_the_remainder_last() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let mut got = vec![];
    for user in 2..=4 {
        let answer = app.receive(user, &token).await;
        answer.assert_status(200);
        got.push(answer.body["received_amount"].as_u64().unwrap());
    }
    assert_eq!(got, vec![1333, 1333, 1334]);
}

#[tokio::test]
async fn random_shares_sum_to_the_amount_and_are_each_at_least_one() {
    let app = TestApp::new().await;
    for _ in 0..20 {
        let token = app
            .spray_as(
                OWNER,
                ROOM,
                json!({"amount": 100, "recipient_count": 7, "mode": "random"}),
            )
            .await;
        let mut total = 0;
        for user in 2..=8 {
            let answer = app.receive(user, &token).await;
            answer.assert_status(200);
            let amount = answer.body["received_amount"].as_u64().unwrap();
            assert!(amount >= 1);
            total += amount;
        }
        assert_eq!(total, 100);
    }
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn total_amount_is_accepted_as_an_alias_of_amount() {
    let app = TestApp::new().await;
    let token = app
        .spray_as(OWNER, ROOM, json!({"total_amount": 10, "recipient_count": 2}))
        .await;
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(details.body["total_amount"], 10);
}

#[tokio::test]
async fn the_room_may_come_from_the_body_instead_of_the_header() {
    let app = TestApp::new().await;
    let answer = app
        .post(
            "/api/v1/spray",
            OWNER,
            None,
            json!({"amount": 10, "recipient_count": 2, "room_id": ROOM}),
        )
        .await;
    answer.assert_status(201);
    let token = answer.body["token"].as_str().unwrap();
    app.receive(2, token).await.assert_status(200);
    // The same room in both places is fine.
    let answer = app
        .post_spray(json!({"amount": 10, "recipient_count": 2, "room_id": ROOM}))
        .await;
    answer.assert_status(201);
}

#[tokio::test]
async fn a_header_room_and_a_different_body_room_are_refused() {
    let app = TestApp::new().await;
    let answer = app
        .post_spray(json!({"amount": 10, "recipient_count": 2, "room_id": "OTHER"}))
        .await;
    answer.assert_problem(400, "INVALID_REQUEST");
    app.assert_audit_clean().await;
    assert_eq!(app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 0);
}

#[tokio::test]
async fn a_spray_without_any_room_is_refused() {
    let app = TestApp::new().await;
    let answer = app
        .post(
            "/api/v1/spray",
            OWNER,
            None,
            json!({"amount": 10, "recipient_count": 2}),
        )
        .await;
    answer.assert_problem(400, "INVALID_REQUEST");
}

#[tokio::test]
async fn the_largest_spray_the_settings_allow_is_written_exactly() {
    let app = TestApp::new().await;
    let token = app
        .spray_as(
            OWNER,
            ROOM,
            json!({"amount": 1_000_000_000u64, "recipient_count": 1000, "mode": "random"}),
        )
        .await;
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(details.body["total_amount"], 1_000_000_000u64);
    assert_eq!(details.body["recipient_count"], 1000);
    app.assert_audit_clean().await;
    // amount == recipient_count: every share is 1.
    let token = app
        .spray_as(OWNER, ROOM, json!({"amount": 5, "recipient_count": 5}))
        .await;
    for user in 2..=6 {
        assert_eq!(app.receive(user, &token).await.body["received_amount"], 1);
    }
}

#[tokio::test]
async fn limits_follow_the_settings() {
    let settings = spray::config::Settings {
        max_amount: 100,
        max_recipients: 3,
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    app.post_spray(json!({"amount": 100, "recipient_count": 3}))
        .await
        .assert_status(201);
    app.post_spray(json!({"amount": 101, "recipient_count": 3}))
        .await
        .assert_problem(400, "INVALID_REQUEST");
    app.post_spray(json!({"amount": 100, "recipient_count": 4}))
        .await
        .assert_problem(400, "INVALID_REQUEST");
}

#[tokio::test]
async fn windows_follow_the_settings_at_creation_time() {
    let settings = spray::config::Settings {
        receive_window: std::time::Duration::from_secs(30),
        lookup_window: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    let answer = app.post_spray(json!({"amount": 10, "recipient_count": 2})).await;
    assert_eq!(answer.body["receive_until"], "2024-02-21T09:33:40.123Z");
    assert_eq!(answer.body["lookup_until"], "2024-02-21T10:33:10.123Z");
}

#[tokio::test]
async fn a_token_taken_in_the_room_is_retried_with_a_fresh_one() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    let first = app.spray(10, 2).await;
    assert_eq!(first, "AAA");
    // Another sprayer in the same room draws AAA first: it must get another token.
    app.tokens.push("AAA");
    app.tokens.push("BBB");
    let second = app
        .spray_as(7, ROOM, json!({"amount": 10, "recipient_count": 2}))
        .await;
    assert_eq!(second, "BBB");
    // The same sprayer in another room draws AAA: also refused, so that (sprayer, token)
    // names one spray.
    app.tokens.push("AAA");
    app.tokens.push("CCC");
    let third = app
        .spray_as(OWNER, "ROOM-2", json!({"amount": 10, "recipient_count": 2}))
        .await;
    assert_eq!(third, "CCC");
    // Another sprayer in another room may hold AAA at the same time.
    app.tokens.push("AAA");
    let fourth = app
        .spray_as(9, "ROOM-3", json!({"amount": 10, "recipient_count": 2}))
        .await;
    assert_eq!(fourth, "AAA");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn tokens_are_case_sensitive() {
    let app = TestApp::new().await;
    app.tokens.push("abc");
    app.tokens.push("ABC");
    assert_eq!(app.spray(10, 2).await, "abc");
    assert_eq!(app.spray(20, 2).await, "ABC");
    assert_eq!(app.lookup(OWNER, "abc").await.body["total_amount"], 10);
    assert_eq!(app.lookup(OWNER, "ABC").await.body["total_amount"], 20);
}

#[tokio::test]
async fn when_every_drawn_token_is_taken_the_answer_is_503_and_nothing_is_written() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(10, 2).await;
    for _ in 0..spray::service::TOKEN_ATTEMPTS {
        app.tokens.push("AAA");
    }
    let answer = app.post_spray(json!({"amount": 10, "recipient_count": 2})).await;
    answer.assert_problem(503, "UNAVAILABLE");
    assert!(answer.headers.contains_key("retry-after"));
    assert!(answer.body["detail"].as_str().unwrap().contains("token"));
    assert_eq!(app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 1);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_token_is_free_again_once_its_spray_left_the_lookup_window() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(10, 2).await;
    app.advance(TimeDelta::days(7) - TimeDelta::milliseconds(1));
    // Still live for one more millisecond: AAA is refused, BBB is used.
    app.tokens.push("AAA");
    app.tokens.push("BBB");
    assert_eq!(app.spray(30, 2).await, "BBB");
    app.advance(TimeDelta::milliseconds(1));
    app.tokens.push("AAA");
    assert_eq!(app.spray(20, 2).await, "AAA");
    // (room, token) now names the new spray.
    let details = app.lookup(OWNER, "AAA").await;
    details.assert_status(200);
    assert_eq!(details.body["total_amount"], 20);
    app.assert_audit_clean().await;
}
