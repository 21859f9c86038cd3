//! Bad input: every malformed header, body and token gets a clear problem+json answer,
//! changes nothing, and never panics the process.

use crate::common::{OWNER, ROOM, TestApp};
use axum::body::Body;
use axum::http::Request;
use serde_json::json;

/// A POST with raw headers and body, for inputs the JSON helpers cannot express.
fn raw_post(path: &str, headers: &[(&str, &[u8])], body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::builder().method("POST").uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body.into()).unwrap()
}

const JSON: (&str, &[u8]) = ("content-type", b"application/json");
const USER: (&str, &[u8]) = ("x-user-id", b"2");
const IN_ROOM: (&str, &[u8]) = ("x-room-id", ROOM.as_bytes());

async fn assert_nothing_written(app: &TestApp) {
    assert_eq!(app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 0);
    assert_eq!(app.store.count("SELECT COUNT(*) FROM ledger").await.unwrap(), 0);
}

#[tokio::test]
async fn malformed_user_ids_are_invalid_users() {
    let app = TestApp::new().await;
    let bad_users: &[&[u8]] = &[
        b"",
        b"0",
        b"-1",
        b"+1",
        b"01",
        b"1.5",
        b"abc",
        b" 1",
        b"1 ",
        b"9223372036854775808",
        b"123456789012345678901234567890",
        b"\xff",
        b"1e3",
    ];
    for bad in bad_users {
        let body = json!({"amount": 10, "recipient_count": 2}).to_string();
        let answer = app
            .send(raw_post(
                "/api/v1/spray",
                &[JSON, IN_ROOM, ("x-user-id", bad)],
                body,
            ))
            .await;
        answer.assert_problem(401, "INVALID_USER");
        let answer = app
            .send(raw_post(
                "/api/v1/receive",
                &[JSON, IN_ROOM, ("x-user-id", bad)],
                r#"{"token":"abc"}"#,
            ))
            .await;
        answer.assert_problem(401, "INVALID_USER");
    }
    // Missing altogether, or sent twice.
    let body = json!({"amount": 10, "recipient_count": 2}).to_string();
    app.send(raw_post("/api/v1/spray", &[JSON, IN_ROOM], body.clone()))
        .await
        .assert_problem(401, "INVALID_USER");
    app.send(raw_post(
        "/api/v1/spray",
        &[JSON, IN_ROOM, USER, ("x-user-id", b"3")],
        body,
    ))
    .await
    .assert_problem(401, "INVALID_USER");
    let get = Request::builder()
        .uri("/api/v1/spray/abc")
        .body(Body::empty())
        .unwrap();
    app.send(get).await.assert_problem(401, "INVALID_USER");
    assert_nothing_written(&app).await;
}

#[tokio::test]
async fn malformed_rooms_are_invalid_requests() {
    let app = TestApp::new().await;
    let long = "r".repeat(65);
    let bad_rooms: &[&[u8]] = &[b"", b"a b", b"\t", long.as_bytes(), b"caf\xc3\xa9", b"\xff"];
    for bad in bad_rooms {
        let body = json!({"amount": 10, "recipient_count": 2}).to_string();
        let answer = app
            .send(raw_post("/api/v1/spray", &[JSON, USER, ("x-room-id", bad)], body))
            .await;
        answer.assert_problem(400, "INVALID_REQUEST");
    }
    for bad in ["", "a b", long.as_str(), "é", "\u{0}"] {
        let answer = app
            .post(
                "/api/v1/spray",
                OWNER,
                None,
                json!({"amount": 10, "recipient_count": 2, "room_id": bad}),
            )
            .await;
        answer.assert_problem(400, "INVALID_REQUEST");
    }
    assert_nothing_written(&app).await;
}

#[tokio::test]
async fn malformed_spray_bodies_are_invalid_requests() {
    let app = TestApp::new().await;
    let cases = [
        ("not json", "{"),
        ("not an object", "[]"),
        ("a bare string", "\"x\""),
        ("null body", "null"),
        ("empty body", ""),
        ("missing amount", r#"{"recipient_count": 2}"#),
        ("missing count", r#"{"amount": 10}"#),
        ("float amount", r#"{"amount": 10.0, "recipient_count": 2}"#),
        ("exponent amount", r#"{"amount": 1e3, "recipient_count": 2}"#),
        ("string amount", r#"{"amount": "10", "recipient_count": 2}"#),
        ("negative amount", r#"{"amount": -10, "recipient_count": 2}"#),
        ("zero amount", r#"{"amount": 0, "recipient_count": 1}"#),
        (
            "amount over the maximum",
            r#"{"amount": 1000000001, "recipient_count": 2}"#,
        ),
        (
            "huge amount",
            r#"{"amount": 99999999999999999999999, "recipient_count": 2}"#,
        ),
        ("null amount", r#"{"amount": null, "recipient_count": 2}"#),
        ("boolean count", r#"{"amount": 10, "recipient_count": true}"#),
        ("zero count", r#"{"amount": 10, "recipient_count": 0}"#),
        (
            "count over the maximum",
            r#"{"amount": 100000, "recipient_count": 1001}"#,
        ),
        (
            "count over u32",
            r#"{"amount": 10, "recipient_count": 4294967297}"#,
        ),
        ("amount below count", r#"{"amount": 2, "recipient_count": 3}"#),
        (
            "unknown field",
            r#"{"amount": 10, "recipient_count": 2, "memo": "hi"}"#,
        ),
        (
            "amount and total_amount",
            r#"{"amount": 10, "total_amount": 10, "recipient_count": 2}"#,
        ),
        (
            "duplicate key",
            r#"{"amount": 10, "amount": 11, "recipient_count": 2}"#,
        ),
        (
            "unknown mode",
            r#"{"amount": 10, "recipient_count": 2, "mode": "lottery"}"#,
        ),
        (
            "mode in capitals",
            r#"{"amount": 10, "recipient_count": 2, "mode": "EVEN"}"#,
        ),
        (
            "null mode",
            r#"{"amount": 10, "recipient_count": 2, "mode": null}"#,
        ),
        (
            "null room",
            r#"{"amount": 10, "recipient_count": 2, "room_id": null}"#,
        ),
        (
            "numeric room",
            r#"{"amount": 10, "recipient_count": 2, "room_id": 5}"#,
        ),
        ("trailing garbage", r#"{"amount": 10, "recipient_count": 2} x"#),
    ];
    for (what, body) in cases {
        let answer = app
            .send(raw_post("/api/v1/spray", &[JSON, USER, IN_ROOM], body))
            .await;
        assert_eq!(
            answer.code(),
            "INVALID_REQUEST",
            "{what}: {}",
            String::from_utf8_lossy(&answer.raw)
        );
        answer.assert_problem(400, "INVALID_REQUEST");
    }
    assert_nothing_written(&app).await;
}

/// serde would read a struct from a JSON array (`[10, 2]` as amount and count), so every
/// valid JSON value that is not an object is refused before the endpoint, on both POST
/// routes, with or without an `Idempotency-Key`, and writes nothing.
#[tokio::test]
async fn a_json_body_that_is_not_an_object_is_an_invalid_request() {
    let app = TestApp::new().await;
    let token = app.spray(1000, 2).await;
    let sprays_before = app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap();
    let ledger_before = app.store.count("SELECT COUNT(*) FROM ledger").await.unwrap();
    let receive_as_array = format!("[\"{token}\"]");
    let cases: [(&str, &str); 8] = [
        ("/api/v1/spray", "[10, 2]"),
        ("/api/v1/spray", " \n[10, 2, \"even\"]"),
        ("/api/v1/spray", "10"),
        ("/api/v1/spray", "\"10\""),
        ("/api/v1/spray", "null"),
        ("/api/v1/spray", "true"),
        ("/api/v1/receive", &receive_as_array),
        ("/api/v1/receive", "[]"),
    ];
    for (path, body) in cases {
        for key in [None, Some(&b"not-an-object-key"[..])] {
            let mut headers = vec![JSON, USER, IN_ROOM];
            headers.extend(key.map(|key| ("idempotency-key", key)));
            let answer = app.send(raw_post(path, &headers, body.to_owned())).await;
            assert_eq!(
                answer.code(),
                "INVALID_REQUEST",
                "{path} {body}: {}",
                String::from_utf8_lossy(&answer.raw)
            );
            answer.assert_problem(400, "INVALID_REQUEST");
        }
    }
    assert_eq!(
        app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap(),
        sprays_before
    );
    assert_eq!(
        app.store.count("SELECT COUNT(*) FROM ledger").await.unwrap(),
        ledger_before
    );
    // Like a body that is not JSON, it is not kept under its key.
    assert_eq!(
        app.store.count("SELECT COUNT(*) FROM idempotency").await.unwrap(),
        0
    );
    // The share is still there for a well-formed receive.
    app.receive(2, &token).await.assert_status(200);
}

#[tokio::test]
async fn malformed_tokens_are_invalid_requests() {
    let app = TestApp::new().await;
    for bad in ["", "AB", "ABCD", "AB-", "A B", "ÄBC", "ab\u{0}"] {
        app.post("/api/v1/receive", 2, Some(ROOM), json!({"token": bad}))
            .await
            .assert_problem(400, "INVALID_REQUEST");
    }
    for body in [
        r#"{"token": 123}"#,
        r#"{"token": null}"#,
        r#"{}"#,
        r#"{"token": "abc", "x": 1}"#,
    ] {
        app.send(raw_post("/api/v1/receive", &[JSON, USER, IN_ROOM], body))
            .await
            .assert_problem(400, "INVALID_REQUEST");
    }
    for bad in ["AB", "ABCD", "A-B", "%C3%84BC", "%FF%FF%FF", "A%20B"] {
        app.get(&format!("/api/v1/spray/{bad}"), OWNER, Some(ROOM))
            .await
            .assert_problem(400, "INVALID_REQUEST");
    }
}

#[tokio::test]
async fn a_body_over_16_kib_is_too_large() {
    let app = TestApp::new().await;
    let padding = " ".repeat(16 * 1024);
    let body = format!(r#"{{"amount": 10, "recipient_count": 2}}{padding}"#);
    app.send(raw_post("/api/v1/spray", &[JSON, USER, IN_ROOM], body.clone()))
        .await
        .assert_problem(413, "PAYLOAD_TOO_LARGE");
    // Without a declared length (a stream), too.
    app.send(raw_post(
        "/api/v1/spray",
        &[JSON, USER, IN_ROOM],
        chunked(body.into_bytes()),
    ))
    .await
    .assert_problem(413, "PAYLOAD_TOO_LARGE");
    // Exactly 16 KiB is accepted.
    let exact = r#"{"amount": 10, "recipient_count": 2}"#;
    let exact = format!("{exact}{}", " ".repeat(16 * 1024 - exact.len()));
    app.send(raw_post("/api/v1/spray", &[JSON, USER, IN_ROOM], exact))
        .await
        .assert_status(201);
}

/// The bytes as a stream of 1 KiB chunks, with no declared length.
fn chunked(bytes: Vec<u8>) -> Body {
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = bytes
        .chunks(1024)
        .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_post_that_is_not_json_is_an_unsupported_media_type() {
    let app = TestApp::new().await;
    let body = json!({"amount": 10, "recipient_count": 2}).to_string();
    let types: &[&[u8]] = &[
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"application/jsonx",
        b"",
    ];
    for content_type in types {
        app.send(raw_post(
            "/api/v1/spray",
            &[("content-type", content_type), USER, IN_ROOM],
            body.clone(),
        ))
        .await
        .assert_problem(415, "UNSUPPORTED_MEDIA_TYPE");
    }
    app.send(raw_post("/api/v1/spray", &[USER, IN_ROOM], body.clone()))
        .await
        .assert_problem(415, "UNSUPPORTED_MEDIA_TYPE");
    app.send(raw_post(
        "/api/v1/spray",
        &[
            ("content-type", b"application/json; charset=utf-8"),
            USER,
            IN_ROOM,
        ],
        body,
    ))
    .await
    .assert_status(201);
}

#[tokio::test]
async fn several_defects_are_answered_in_the_contract_order() {
    let app = TestApp::new().await;
    let big = " ".repeat(17 * 1024);
    // Too large beats not-JSON, bad user and bad body.
    app.send(raw_post("/api/v1/spray", &[("content-type", b"text/plain")], big))
        .await
        .assert_problem(413, "PAYLOAD_TOO_LARGE");
    // Not JSON beats a missing user.
    app.send(raw_post("/api/v1/spray", &[("content-type", b"text/plain")], "{"))
        .await
        .assert_problem(415, "UNSUPPORTED_MEDIA_TYPE");
    // A bad user beats a bad room and a bad body.
    app.send(raw_post("/api/v1/spray", &[JSON, ("x-room-id", b"")], "{"))
        .await
        .assert_problem(401, "INVALID_USER");
    // A bad request beats the endpoint's rules.
    app.send(raw_post(
        "/api/v1/receive",
        &[JSON, USER, IN_ROOM],
        r#"{"token": "nope"}"#,
    ))
    .await
    .assert_problem(400, "INVALID_REQUEST");
}

#[tokio::test]
async fn the_gateway_secret_is_checked_first_and_in_full() {
    let settings = spray::config::Settings {
        gateway_secret: Some("s3cret".into()),
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    let body = json!({"amount": 10, "recipient_count": 2}).to_string();
    let bad_auth: &[&[u8]] = &[
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer s3cre",
        b"Bearer s3cret2",
        b"Basic s3cret",
        b"bearer s3cret",
    ];
    for auth in bad_auth {
        // Even a request with every other defect is refused for the gateway first.
        app.send(raw_post(
            "/api/v1/spray",
            &[("authorization", auth), ("content-type", b"text/plain")],
            " ".repeat(20_000),
        ))
        .await
        .assert_problem(401, "INVALID_GATEWAY");
        app.send(raw_post(
            "/api/v1/spray",
            &[("authorization", auth), JSON, USER, IN_ROOM],
            body.clone(),
        ))
        .await
        .assert_problem(401, "INVALID_GATEWAY");
    }
    app.send(raw_post("/api/v1/spray", &[JSON, USER, IN_ROOM], body.clone()))
        .await
        .assert_problem(401, "INVALID_GATEWAY");
    let get = Request::builder()
        .uri("/api/v1/spray/abc")
        .header("x-user-id", "1")
        .body(Body::empty())
        .unwrap();
    app.send(get).await.assert_problem(401, "INVALID_GATEWAY");
    assert_nothing_written(&app).await;
    app.send(raw_post(
        "/api/v1/spray",
        &[("authorization", b"Bearer s3cret"), JSON, USER, IN_ROOM],
        body,
    ))
    .await
    .assert_status(201);
    // The operations endpoints stay open.
    let health = Request::builder().uri("/healthz").body(Body::empty()).unwrap();
    app.send(health).await.assert_status(200);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_problem_json() {
    let app = TestApp::new().await;
    app.get("/api/v1/nothing", OWNER, Some(ROOM))
        .await
        .assert_problem(404, "NOT_FOUND");
    app.get("/api/v1/receive", OWNER, Some(ROOM))
        .await
        .assert_problem(405, "METHOD_NOT_ALLOWED");
    let delete = Request::builder()
        .method("DELETE")
        .uri("/api/v1/spray/abc")
        .body(Body::empty())
        .unwrap();
    app.send(delete).await.assert_problem(405, "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = TestApp::new().await;
    let answer = app
        .send(Request::builder().uri("/healthz").body(Body::empty()).unwrap())
        .await;
    answer.assert_status(200);
    let answer = app
        .send(Request::builder().uri("/readyz").body(Body::empty()).unwrap())
        .await;
    answer.assert_status(200);
    assert_eq!(answer.body["sql"], "up");
}
