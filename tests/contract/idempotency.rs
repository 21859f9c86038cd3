//! `Idempotency-Key` on both POST endpoints: a retry gets the first answer again and
//! changes nothing.

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request};
use chrono::TimeDelta;
use serde_json::json;
use spray::domain::{Amount, Endpoint, Fingerprint, IdempotencyKey, RoomId, SplitMode, Token, UserId};
use spray::jobs::{purge_idempotency_once, settle_expired_once};
use spray::store::{Begin, IdempotentRequest, NewSpray, StoredAnswer};

use crate::common::{Answer, OWNER, ROOM, TestApp};

const SPRAY: &str = "/api/v1/spray";
const RECEIVE: &str = "/api/v1/receive";
const SPRAY_BODY: &str = r#"{"amount": 4000, "recipient_count": 3}"#;

fn receive_body(token: &str) -> String {
    json!({ "token": token }).to_string()
}

#[track_caller]
fn assert_replay_of(again: &Answer, first: &Answer) {
    assert_eq!(again.status, first.status);
    assert_eq!(
        again.raw,
        first.raw,
        "not the same bytes: {} vs {}",
        String::from_utf8_lossy(&again.raw),
        String::from_utf8_lossy(&first.raw)
    );
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["content-type"], first.headers["content-type"]);
    assert_eq!(again.headers.get("location"), first.headers.get("location"));
    assert!(first.headers.get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_retried_spray_gets_the_first_answer_byte_for_byte_and_sprays_once() {
    let app = TestApp::new().await;
    let first = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k-1"), SPRAY_BODY)
        .await;
    first.assert_status(201);
    assert!(
        first.headers["location"]
            .to_str()
            .unwrap()
            .starts_with("/api/v1/spray/")
    );
    app.advance(TimeDelta::seconds(30));
    let again = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k-1"), SPRAY_BODY)
        .await;
    assert_replay_of(&again, &first);
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM ledger WHERE kind = 'DEBIT'")
            .await,
        1
    );
    // Without a key, the same body is a new spray.
    app.post_keyed(SPRAY, OWNER, Some(ROOM), None, SPRAY_BODY)
        .await
        .assert_status(201);
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 2);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_retried_receive_gets_the_amount_it_got_the_first_time() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let first = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("r-1"), &receive_body(&token))
        .await;
    first.assert_status(200);
    assert_eq!(first.body, json!({"received_amount": 1333}));
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token).await.assert_status(200);
    // Not the last share's 1334, not ALREADY_RECEIVED: the first answer.
    let again = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("r-1"), &receive_body(&token))
        .await;
    assert_replay_of(&again, &first);
    // Also after the window closed and the spray was settled.
    app.advance(TimeDelta::hours(1));
    settle_expired_once(app.store.as_ref(), app.now(), 10)
        .await
        .unwrap();
    let later = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("r-1"), &receive_body(&token))
        .await;
    assert_replay_of(&later, &first);
    // Without the key, the rules answer.
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
            .await,
        3
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_refused_and_changes_nothing() {
    let app = TestApp::new().await;
    let first = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), SPRAY_BODY)
        .await;
    first.assert_status(201);
    let different = [
        (Some(ROOM), r#"{"amount": 5000, "recipient_count": 3}"#),
        (
            Some(ROOM),
            r#"{"amount": 4000, "recipient_count": 3, "mode": "even"}"#,
        ),
        (Some("ROOM-2"), SPRAY_BODY),
        (
            None,
            r#"{"amount": 4000, "recipient_count": 3, "room_id": "ROOM-2"}"#,
        ),
    ];
    for (room, body) in different {
        app.post_keyed(SPRAY, OWNER, room, Some("k"), body)
            .await
            .assert_problem(422, "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 1);
    // The first request is still answered as before.
    let again = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), SPRAY_BODY)
        .await;
    assert_replay_of(&again, &first);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn bodies_equal_as_values_in_the_same_room_are_the_same_request() {
    let app = TestApp::new().await;
    let first = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), SPRAY_BODY)
        .await;
    first.assert_status(201);
    let respelled = "{\n  \"recipient_count\" : 3,\n  \"amount\" : 4000\n}";
    let again = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), respelled)
        .await;
    assert_replay_of(&again, &first);

    // The room named by the body alone, or by the header as well: one effective room.
    let token = first.body["token"].as_str().unwrap();
    let with_room = json!({"token": token, "room_id": ROOM}).to_string();
    let received = app.post_keyed(RECEIVE, 2, None, Some("r"), &with_room).await;
    received.assert_status(200);
    let again = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("r"), &with_room)
        .await;
    assert_replay_of(&again, &received);
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 1);
}

#[tokio::test]
async fn another_users_identical_key_is_independent() {
    let app = TestApp::new().await;
    let mine = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), SPRAY_BODY)
        .await;
    let theirs = app.post_keyed(SPRAY, 5, Some(ROOM), Some("k"), SPRAY_BODY).await;
    mine.assert_status(201);
    theirs.assert_status(201);
    assert!(theirs.headers.get("idempotent-replayed").is_none());
    assert_ne!(mine.body["token"], theirs.body["token"]);
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 2);

    // Two members receiving under the same key each get their own share.
    let token = mine.body["token"].as_str().unwrap();
    for user in [2, 3] {
        let answer = app
            .post_keyed(RECEIVE, user, Some(ROOM), Some("k"), &receive_body(token))
            .await;
        answer.assert_status(200);
        assert!(answer.headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
            .await,
        2
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn one_key_on_the_two_endpoints_names_two_requests() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    let sprayed = app
        .post_keyed(SPRAY, 2, Some(ROOM), Some("same"), SPRAY_BODY)
        .await;
    sprayed.assert_status(201);
    let received = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("same"), &receive_body(&token))
        .await;
    received.assert_status(200);
    assert!(received.headers.get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn refusals_are_kept_and_replayed_even_once_the_world_has_changed() {
    let app = TestApp::new().await;
    // No spray AAA yet: 404, kept.
    let first = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("early"), &receive_body("AAA"))
        .await;
    first.assert_problem(404, "SPRAY_NOT_FOUND");
    app.tokens.push("AAA");
    app.spray(4000, 3).await;
    let again = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("early"), &receive_body("AAA"))
        .await;
    assert_replay_of(&again, &first);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
            .await,
        0
    );
    // A fresh request is judged afresh.
    app.receive(2, "AAA").await.assert_status(200);

    // A request refused by a business rule before any effect: 400, kept too.
    let bad = r#"{"amount": 2, "recipient_count": 3}"#;
    let refused = app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("bad"), bad).await;
    refused.assert_problem(400, "INVALID_REQUEST");
    let again = app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("bad"), bad).await;
    assert_replay_of(&again, &refused);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn a_server_error_is_not_kept_and_the_retry_runs_afresh() {
    let app = TestApp::new().await;
    app.tokens.push("AAA");
    app.spray(10, 2).await;
    // Every token drawn for the next spray is taken in the room: 503.
    for _ in 0..spray::service::TOKEN_ATTEMPTS {
        app.tokens.push("AAA");
    }
    let failed = app.post_keyed(SPRAY, 7, Some(ROOM), Some("k"), SPRAY_BODY).await;
    failed.assert_problem(503, "UNAVAILABLE");
    assert_eq!(app.count("SELECT COUNT(*) FROM idempotency").await, 0);
    let retried = app.post_keyed(SPRAY, 7, Some(ROOM), Some("k"), SPRAY_BODY).await;
    retried.assert_status(201);
    assert!(retried.headers.get("idempotent-replayed").is_none());
    assert_eq!(
        app.count("SELECT COUNT(*) FROM sprays WHERE owner_id = 7").await,
        1
    );
    app.assert_audit_clean().await;
}

/// How long a pending key blocks retries: the lease (`--idempotency-lease`).
fn lease_of(app: &TestApp) -> TimeDelta {
    app.settings.policy().unwrap().idempotency_lease
}

fn pending_request(app: &TestApp, lease: i64) -> IdempotentRequest {
    let now = app.now();
    IdempotentRequest {
        user: UserId::from_stored(OWNER).unwrap(),
        endpoint: Endpoint::Spray,
        key: IdempotencyKey::parse("slow").unwrap(),
        fingerprint: Fingerprint::of(&serde_json::from_str(SPRAY_BODY).unwrap(), Some(ROOM)),
        now,
        abandoned_before: now - lease_of(app),
        lease,
    }
}

#[tokio::test]
async fn a_request_still_running_answers_in_progress_until_it_counts_as_abandoned() {
    let app = TestApp::new().await;
    // Seconds, not a minute (the contract): the default lease.
    assert_eq!(lease_of(&app), TimeDelta::seconds(10));
    // A first request began and is still running (or its process died).
    let Begin::Run(stale) = app
        .store
        .begin_idempotent(&pending_request(&app, 1))
        .await
        .unwrap()
    else {
        panic!("the first request should run");
    };
    app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("slow"), SPRAY_BODY)
        .await
        .assert_problem(409, "IDEMPOTENCY_IN_PROGRESS");
    app.post_keyed(
        SPRAY,
        OWNER,
        Some(ROOM),
        Some("slow"),
        r#"{"amount": 1, "recipient_count": 1}"#,
    )
    .await
    .assert_problem(422, "IDEMPOTENCY_KEY_REUSED");
    app.advance(lease_of(&app));
    app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("slow"), SPRAY_BODY)
        .await
        .assert_problem(409, "IDEMPOTENCY_IN_PROGRESS");
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 0);

    // Untouched for longer than the lease: the retry takes the row over and runs.
    app.advance(TimeDelta::milliseconds(1));
    let taken_over = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("slow"), SPRAY_BODY)
        .await;
    taken_over.assert_status(201);

    // The first request, had it been merely slow, can no longer record anything.
    let spray = NewSpray {
        token: Token::parse("OLD").unwrap(),
        room: RoomId::parse(ROOM).unwrap(),
        owner: UserId::from_stored(OWNER).unwrap(),
        mode: SplitMode::Even,
        total_amount: Amount::new(4000),
        shares: vec![Amount::new(1333), Amount::new(1333), Amount::new(1334)],
        created_at: app.now(),
        receive_until: app.now() + TimeDelta::minutes(10),
        lookup_until: app.now() + TimeDelta::days(7),
    };
    let stale_answer = StoredAnswer {
        status: 409,
        content_type: "application/problem+json".into(),
        location: None,
        body: b"{}".to_vec(),
    };
    assert!(app.store.insert_spray(&spray, Some(&stale)).await.is_err());
    assert!(
        !app.store
            .finish_idempotent(&stale, &stale_answer, app.now())
            .await
            .unwrap()
    );
    app.store.release_idempotent(&stale).await.unwrap();
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 1);
    let again = app
        .post_keyed(SPRAY, OWNER, Some(ROOM), Some("slow"), SPRAY_BODY)
        .await;
    assert_replay_of(&again, &taken_over);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn malformed_keys_are_invalid_requests_and_nothing_happens() {
    let app = TestApp::new().await;
    let too_long = "k".repeat(256);
    let bad_keys: [(&str, HeaderValue); 5] = [
        ("empty", HeaderValue::from_static("")),
        ("256 characters", HeaderValue::try_from(too_long).unwrap()),
        ("a space", HeaderValue::from_static("a b")),
        ("a tab", HeaderValue::from_static("a\tb")),
        ("not ASCII", HeaderValue::from_bytes("clé".as_bytes()).unwrap()),
    ];
    for (what, key) in bad_keys {
        let request = Request::builder()
            .method(Method::POST)
            .uri(SPRAY)
            .header("content-type", "application/json")
            .header("x-user-id", "1")
            .header("x-room-id", ROOM)
            .header("idempotency-key", key)
            .body(Body::from(SPRAY_BODY))
            .unwrap();
        let answer = app.send(request).await;
        assert_eq!(answer.code(), "INVALID_REQUEST", "{what}");
        answer.assert_problem(400, "INVALID_REQUEST");
    }
    // Sent twice, even the same value twice, is refused rather than guessed between.
    let twice = Request::builder()
        .method(Method::POST)
        .uri(SPRAY)
        .header("content-type", "application/json")
        .header("x-user-id", "1")
        .header("x-room-id", ROOM)
        .header("idempotency-key", "k")
        .header("idempotency-key", "k")
        .body(Body::from(SPRAY_BODY))
        .unwrap();
    app.send(twice).await.assert_problem(400, "INVALID_REQUEST");
    assert_eq!(app.count("SELECT COUNT(*) FROM sprays").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM idempotency").await, 0);
    // The longest valid key works.
    let longest = "k".repeat(255);
    app.post_keyed(SPRAY, OWNER, Some(ROOM), Some(&longest), SPRAY_BODY)
        .await
        .assert_status(201);
}

#[tokio::test]
async fn defects_ranked_before_the_key_answer_as_without_it_and_are_not_kept() {
    let app = TestApp::new().await;
    let bad_key = Some("a b");
    // INVALID_USER comes before INVALID_REQUEST, whatever the key.
    let no_user = Request::builder()
        .method(Method::POST)
        .uri(SPRAY)
        .header("content-type", "application/json")
        .header("x-room-id", ROOM)
        .header("idempotency-key", "a b")
        .body(Body::from(SPRAY_BODY))
        .unwrap();
    app.send(no_user).await.assert_problem(401, "INVALID_USER");
    // UNSUPPORTED_MEDIA_TYPE before both.
    let not_json = Request::builder()
        .method(Method::POST)
        .uri(SPRAY)
        .header("content-type", "text/plain")
        .header("x-user-id", "1")
        .header("idempotency-key", "k")
        .body(Body::from(SPRAY_BODY))
        .unwrap();
    app.send(not_json)
        .await
        .assert_problem(415, "UNSUPPORTED_MEDIA_TYPE");
    // PAYLOAD_TOO_LARGE before everything.
    let huge = format!(
        r#"{{"amount": 4000, "recipient_count": 3, "pad": "{}"}}"#,
        "x".repeat(20_000)
    );
    app.post_keyed(SPRAY, OWNER, Some(ROOM), bad_key, &huge)
        .await
        .assert_problem(413, "PAYLOAD_TOO_LARGE");
    // A body that is not JSON cannot be compared as a value: answered, not kept.
    app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), "{not json")
        .await
        .assert_problem(400, "INVALID_REQUEST");
    assert_eq!(app.count("SELECT COUNT(*) FROM idempotency").await, 0);
    // So the key is still free for the request the client meant.
    app.post_keyed(SPRAY, OWNER, Some(ROOM), Some("k"), SPRAY_BODY)
        .await
        .assert_status(201);
}

#[tokio::test]
async fn keys_are_kept_for_24_hours_after_their_answer_then_forgotten() {
    let app = TestApp::new().await;
    let token = app.spray(4000, 3).await;
    app.advance(TimeDelta::minutes(1));
    let first = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("day"), &receive_body(&token))
        .await;
    first.assert_status(200);
    let purge = |app: &TestApp| {
        let (store, now) = (app.store.clone(), app.now());
        async move { purge_idempotency_once(store.as_ref(), now, 100).await.unwrap() }
    };
    app.advance(TimeDelta::hours(24));
    assert_eq!(purge(&app).await, 0);
    let again = app
        .post_keyed(RECEIVE, 2, Some(ROOM), Some("day"), &receive_body(&token))
        .await;
    assert_replay_of(&again, &first);
    app.advance(TimeDelta::milliseconds(1));
    assert_eq!(purge(&app).await, 1);
    // Forgotten: the same request now runs afresh and meets the rules.
    app.post_keyed(RECEIVE, 2, Some(ROOM), Some("day"), &receive_body(&token))
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.assert_audit_clean().await;
}
