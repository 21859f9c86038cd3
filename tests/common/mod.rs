//! Test harness: a fresh SQLite file per test, a clock the test moves, scripted tokens,
//! and the real router driven with `oneshot` (no sockets).
#![allow(dead_code)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use spray::clock::ManualClock;
use spray::config::Settings;
use spray::domain::ScriptedTokens;
use spray::startup::{build_router, open_store};
use spray::store::Store;
use tower::ServiceExt;

pub const ROOM: &str = "TEST-ROOM-1";
pub const OWNER: i64 = 1;

/// The moment every test starts at: 2024-02-21T09:33:10.123Z.
pub fn start_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-02-21T09:33:10.123Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub struct TestApp {
    pub router: Router,
    pub clock: Arc<ManualClock>,
    pub tokens: Arc<ScriptedTokens>,
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub database_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// An answer, with its body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Answer {
    /// The problem `code`, for error answers.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("<no code>")
    }

    /// Asserts an RFC 9457 problem with this status and code.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.code()),
            (status, code),
            "unexpected answer: {}",
            String::from_utf8_lossy(&self.raw)
        );
        assert_eq!(self.headers["content-type"], "application/problem+json");
        assert_eq!(self.body["type"], "about:blank");
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {}",
            String::from_utf8_lossy(&self.raw)
        );
    }
}

impl TestApp {
    pub async fn new() -> TestApp {
        TestApp::with_settings(Settings::default()).await
    }

    pub async fn with_settings(mut settings: Settings) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let database_path = dir.path().join("spray.db");
        settings.database_url = format!("sqlite://{}", database_path.display());
        let store = open_store(&settings).await.unwrap();
        let clock = Arc::new(ManualClock::new(start_time()));
        let tokens = Arc::new(ScriptedTokens::default());
        let router = build_router(&settings, store.clone(), clock.clone(), tokens.clone()).unwrap();
        TestApp {
            router,
            clock,
            tokens,
            store,
            settings,
            database_path,
            _dir: dir,
        }
    }

    pub fn advance(&self, by: TimeDelta) {
        self.clock.advance(by);
    }

    /// Sends a request through the real router.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    /// A JSON POST as user `user` in the header room `room` (None: no X-ROOM-ID).
    pub async fn post(&self, path: &str, user: i64, room: Option<&str>, body: Value) -> Answer {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/json")
            .header("x-user-id", user.to_string());
        if let Some(room) = room {
            request = request.header("x-room-id", room);
        }
        self.send(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    pub async fn get(&self, path: &str, user: i64, room: Option<&str>) -> Answer {
        let mut request = Request::builder().uri(path).header("x-user-id", user.to_string());
        if let Some(room) = room {
            request = request.header("x-room-id", room);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    /// Sprays `amount` over `count` shares in `ROOM` as `OWNER`; returns the token.
    pub async fn spray(&self, amount: u64, count: u64) -> String {
        self.spray_as(OWNER, ROOM, json!({"amount": amount, "recipient_count": count}))
            .await
    }

    pub async fn spray_as(&self, user: i64, room: &str, body: Value) -> String {
        let answer = self.post("/api/v1/spray", user, Some(room), body).await;
        answer.assert_status(201);
        answer.body["token"].as_str().unwrap().to_owned()
    }

    pub async fn receive(&self, user: i64, token: &str) -> Answer {
        self.post("/api/v1/receive", user, Some(ROOM), json!({"token": token}))
            .await
    }

    pub async fn lookup(&self, user: i64, token: &str) -> Answer {
        self.get(&format!("/api/v1/spray/{token}"), user, Some(ROOM))
            .await
    }

    /// Runs `spray audit`'s checks in process and asserts they are clean.
    pub async fn assert_audit_clean(&self) {
        let report = spray::audit::run(self.store.as_ref()).await.unwrap();
        assert!(report.is_clean(), "audit failed:\n{}", report.summary());
    }
}
