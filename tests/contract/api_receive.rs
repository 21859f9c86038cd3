//! POST /api/v1/receive: the five rules, in the contract's order, moved by the clock.

use crate::common::metrics::counter;
use crate::common::{OWNER, ROOM, TestApp};
use chrono::TimeDelta;
use serde_json::json;

#[tokio::test]
async fn a_member_receives_one_share() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let answer = app.receive(2, &token).await;
    answer.assert_status(200);
    assert_eq!(answer.body, json!({"received_amount": 1333}));
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_member_of_another_room_cannot_receive() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let answer = app
        .post("/api/v1/receive", 2, Some("OTHER-ROOM"), json!({"token": token}))
        .await;
    answer.assert_problem(404, "SPRAY_NOT_FOUND");
}

#[tokio::test]
async fn an_unknown_token_is_not_found() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(4000, 3).await;
    app.receive(2, "AAB").await.assert_problem(404, "SPRAY_NOT_FOUND");
    app.receive(2, "aaa").await.assert_problem(404, "SPRAY_NOT_FOUND");
}

#[tokio::test]
async fn the_sprayer_cannot_receive_from_their_own_spray() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    // Still refused as OWN_SPRAY after the window closed (rule 2 before rule 4).
    app.advance(TimeDelta::minutes(10));
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn receiving_twice_from_one_spray_is_refused() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    // Also after the window closed (rule 3 before rule 4), and after exhaustion.
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token).await.assert_status(200);
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.advance(TimeDelta::minutes(11));
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(details.body["recipients"].as_array().unwrap().len(), 3);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_last_millisecond_of_the_window_still_receives() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.advance(TimeDelta::minutes(10) - TimeDelta::milliseconds(1));
    app.receive(2, &token).await.assert_status(200);
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(
        details.body["recipients"][0]["received_at"],
        "2024-02-21T09:43:10.122Z"
    );
}

#[tokio::test]
async fn the_first_millisecond_after_the_window_is_refused() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.advance(TimeDelta::minutes(10));
    app.receive(2, &token)
        .await
        .assert_problem(410, "RECEIVE_EXPIRED");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn an_exhausted_spray_refuses_further_members() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    for user in 2..=4 {
        app.receive(user, &token).await.assert_status(200);
    }
    let answer = app.receive(5, &token).await;
    answer.assert_problem(409, "SPRAY_EXHAUSTED");
    assert_eq!(answer.body["detail"], "all 3 shares have been received");
    // After the window, an outsider hears that the window closed (rule 4 before rule 5).
    app.advance(TimeDelta::minutes(10));
    app.receive(5, &token)
        .await
        .assert_problem(410, "RECEIVE_EXPIRED");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_room_may_come_from_the_body_and_must_agree_with_the_header() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.post(
        "/api/v1/receive",
        2,
        None,
        json!({"token": token, "room_id": ROOM}),
    )
    .await
    .assert_status(200);
    app.post(
        "/api/v1/receive",
        3,
        Some(ROOM),
        json!({"token": token, "room_id": "ELSEWHERE"}),
    )
    .await
    .assert_problem(400, "INVALID_REQUEST");
    app.post("/api/v1/receive", 3, None, json!({"token": token}))
        .await
        .assert_problem(400, "INVALID_REQUEST");
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(details.body["recipients"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_refused_receive_changes_nothing() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    let before = app.lookup(OWNER, &token).await.body;
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.post("/api/v1/receive", 3, Some("ELSEWHERE"), json!({"token": token}))
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
    assert_eq!(app.lookup(OWNER, &token).await.body, before);
    let credits = app
        .count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
        .await;
    assert_eq!(credits, 1);
}

/// A spray of two shares received by users 2 and 3, then refused to user 4: the loser
/// from whom the instance learns that it is taken for good.
async fn taken_for_good(app: &TestApp) -> String {
    let token = app.spray(100, 2).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    token
}

/// Once every share is received, nothing can change a newcomer's answer before the window
/// closes (no share can be freed again), so the instance remembers the spray and answers
/// its newcomers and its sprayer without the store, on every backend: a room of thousands
/// racing for ten shares costs ten writes and one read. Proof: behind the service's back
/// the store loses the spray, and they are still answered as before.
#[tokio::test]
async fn a_spray_taken_for_good_answers_newcomers_without_the_store() {
    let app = TestApp::new().await;
    let token = taken_for_good(&app).await;
    let remembered = counter(&app, "spray_claims_remembered_total", &[]).await;

    // From here a claim that reached the store would be answered "not found".
    let renamed = app
        .execute(&format!(
            "UPDATE sprays SET token = 'zz9' WHERE token = '{token}'"
        ))
        .await
        .unwrap();
    assert_eq!(renamed, 1);
    for user in 5..=9 {
        app.receive(user, &token)
            .await
            .assert_problem(409, "SPRAY_EXHAUSTED");
    }
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    assert!(
        counter(&app, "spray_claims_remembered_total", &[]).await >= remembered + 6.0,
        "answers from memory are counted"
    );
    app.execute(&format!(
        "UPDATE sprays SET token = '{token}' WHERE token = 'zz9'"
    ))
    .await
    .unwrap();
    // A receiver is never answered from memory (it would say "exhausted"): only the store
    // can say they received.
    app.receive(3, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.assert_audit_clean().await;
}

/// Rule 1 comes before what the memory knows: a spray remembered in its room is still
/// "not found" to a member of another room, who would otherwise be told "exhausted" about
/// a spray they cannot see.
#[tokio::test]
async fn a_remembered_spray_is_still_not_found_from_another_room() {
    let app = TestApp::new().await;
    let token = taken_for_good(&app).await;
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.post("/api/v1/receive", 6, Some("ELSEWHERE"), json!({"token": token}))
        .await
        .assert_problem(404, "SPRAY_NOT_FOUND");
}

/// The remembered answer holds only while the window is open: then the store answers
/// (`RECEIVE_EXPIRED`), and the spray is paid exactly as it was.
#[tokio::test]
async fn a_remembered_spray_is_answered_by_the_store_once_its_window_closes() {
    let app = TestApp::new().await;
    let token = taken_for_good(&app).await;
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    app.advance(TimeDelta::minutes(10));
    app.receive(6, &token)
        .await
        .assert_problem(410, "RECEIVE_EXPIRED");
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    let details = app.lookup(OWNER, &token).await;
    assert_eq!(details.body["recipients"].as_array().unwrap().len(), 2);
    app.assert_audit_clean().await;
}
