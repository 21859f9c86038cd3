//! GET /api/v1/spray/{token}: the sprayer's view, by room or among their own sprays.

use crate::common::{OWNER, ROOM, TestApp};
use chrono::TimeDelta;
use serde_json::json;

#[tokio::test]
async fn the_sprayer_sees_who_received_what_in_order() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.advance(TimeDelta::seconds(5));
    app.receive(7, &token).await.assert_status(200);
    app.advance(TimeDelta::milliseconds(333));
    app.receive(3, &token).await.assert_status(200);
    let answer = app.lookup(OWNER, &token).await;
    answer.assert_status(200);
    assert_eq!(
        answer.body,
        json!({
            "token": token,
            "room_id": ROOM,
            "created_at": "2024-02-21T09:33:10.123Z",
            "receive_until": "2024-02-21T09:43:10.123Z",
            "lookup_until": "2024-02-28T09:33:10.123Z",
            "status": "active",
            "total_amount": 4000,
            "recipient_count": 3,
            "received_amount": 2666,
            "refunded_amount": 0,
            "recipients": [
                {"user_id": 7, "amount": 1333, "received_at": "2024-02-21T09:33:15.123Z"},
                {"user_id": 3, "amount": 1333, "received_at": "2024-02-21T09:33:15.456Z"}
            ]
        })
    );
}

#[tokio::test]
async fn a_fully_received_spray_is_completed() {
    let app = TestApp::new().await;
    let token = app.spray(10, 2).await;
    app.receive(2, &token).await;
    app.receive(3, &token).await;
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["status"].as_str(), body["received_amount"].as_u64()),
        (Some("completed"), Some(10))
    );
    // Still completed, nothing refunded, after the window.
    app.advance(TimeDelta::hours(1));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["status"].as_str(), body["refunded_amount"].as_u64()),
        (Some("completed"), Some(0))
    );
}

#[tokio::test]
async fn when_the_window_closes_unfinished_the_rest_is_shown_refunded() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await;
    app.advance(TimeDelta::minutes(10) - TimeDelta::milliseconds(1));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        (body["status"].as_str(), body["refunded_amount"].as_u64()),
        (Some("active"), Some(0))
    );
    app.advance(TimeDelta::milliseconds(1));
    let body = app.lookup(OWNER, &token).await.body;
    assert_eq!(body["status"], "expired");
    assert_eq!(body["received_amount"], 1333);
    assert_eq!(body["refunded_amount"], 4000 - 1333);
}

#[tokio::test]
async fn someone_else_looking_up_by_room_is_not_the_owner() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await;
    app.lookup(2, &token).await.assert_problem(403, "NOT_OWNER");
    app.lookup(99, &token).await.assert_problem(403, "NOT_OWNER");
}

#[tokio::test]
async fn without_a_room_the_spray_is_found_among_the_callers_own() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let answer = app.get(&format!("/api/v1/spray/{token}"), OWNER, None).await;
    answer.assert_status(200);
    assert_eq!(answer.body["room_id"], ROOM);
    // Someone else, without a room, cannot even tell that it exists.
    app.get(&format!("/api/v1/spray/{token}"), 2, None)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
}

#[tokio::test]
async fn the_room_may_come_from_the_query_and_must_agree_with_the_header() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.get(&format!("/api/v1/spray/{token}?room_id={ROOM}"), OWNER, None)
        .await
        .assert_status(200);
    app.get(
        &format!("/api/v1/spray/{token}?room_id={ROOM}"),
        OWNER,
        Some(ROOM),
    )
    .await
    .assert_status(200);
    app.get(
        &format!("/api/v1/spray/{token}?room_id=ELSEWHERE"),
        OWNER,
        Some(ROOM),
    )
    .await
    .assert_problem(400, "INVALID_REQUEST");
    app.get(&format!("/api/v1/spray/{token}?room_id=ELSEWHERE"), OWNER, None)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    app.get(
        &format!("/api/v1/spray/{token}?room_id={ROOM}&room_id={ROOM}"),
        OWNER,
        None,
    )
    .await
    .assert_problem(400, "INVALID_REQUEST");
}

#[tokio::test]
async fn an_unknown_token_is_not_found() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(4000, 3).await;
    app.lookup(OWNER, "ZZZ")
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    app.get("/api/v1/spray/ZZZ", OWNER, None)
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
}

#[tokio::test]
async fn the_lookup_window_is_seven_days_to_the_millisecond() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.advance(TimeDelta::days(7) - TimeDelta::milliseconds(1));
    app.lookup(OWNER, &token).await.assert_status(200);
    app.get(&format!("/api/v1/spray/{token}"), OWNER, None)
        .await
        .assert_status(200);
    app.advance(TimeDelta::milliseconds(1));
    app.lookup(OWNER, &token)
        .await
        .assert_problem(410, "LOOKUP_EXPIRED");
    app.get(&format!("/api/v1/spray/{token}"), OWNER, None)
        .await
        .assert_problem(410, "LOOKUP_EXPIRED");
    // A stranger is still only told that it is not theirs.
    app.lookup(2, &token).await.assert_problem(403, "NOT_OWNER");
}

#[tokio::test]
async fn the_same_sprayer_in_two_rooms_is_told_apart_by_the_room() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(10, 2).await;
    app.tokens.push("AAA");
    let other = app
        .spray_as(5, "ROOM-2", json!({"amount": 99, "recipient_count": 3}))
        .await;
    assert_eq!(other, "AAA");
    assert_eq!(app.lookup(OWNER, "AAA").await.body["total_amount"], 10);
    let by_room = app.get("/api/v1/spray/AAA", 5, Some("ROOM-2")).await;
    assert_eq!(by_room.body["total_amount"], 99);
    let own = app.get("/api/v1/spray/AAA", 5, None).await;
    assert_eq!(own.body["total_amount"], 99);
}
