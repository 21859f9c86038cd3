//! Test harness: a fresh store per test (a SQLite file, or a MySQL database of its own),
//! a clock the test moves, scripted tokens, and the real router driven with `oneshot`
//! (no sockets).
//!
//! The same contract suite (`tests/contract/`) is compiled into one test binary per
//! backend (`tests/contract_*.rs`); each binary's crate name picks its backend, see
//! [`Backend::of_this_test_binary`].
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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

pub mod cluster;
pub mod metrics;
pub mod process;
pub mod proxy;

pub const ROOM: &str = "TEST-ROOM-1";
pub const OWNER: i64 = 1;

/// The moment every test starts at: 2024-02-21T09:33:10.123Z.
pub fn start_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-02-21T09:33:10.123Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// The first instant outside the receive window (ten minutes) of a spray made at the start.
pub fn window_closes() -> DateTime<Utc> {
    start_time() + TimeDelta::minutes(10)
}

/// A GET of `path` with no headers: for the operations endpoints.
pub fn plain_get(path: &str) -> Request<Body> {
    Request::builder().uri(path).body(Body::empty()).unwrap()
}

/// Where a test's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
    /// MySQL with the Redis gate on one Redis server.
    MySqlRedis,
    /// MySQL with the Redis gate on a Redis Cluster of three masters started by the tests.
    MySqlRedisCluster,
}

impl Backend {
    /// The backend this test binary runs on, from its crate name (`contract_mysql` runs on
    /// MySQL, `contract_mysql_redis` on MySQL + Redis, `contract_mysql_redis_cluster` on
    /// MySQL + Redis Cluster; anything else on SQLite). `CARGO_CRATE_NAME` is the name of
    /// the test crate that includes this module, fixed at compile time.
    pub fn of_this_test_binary() -> Backend {
        let name = env!("CARGO_CRATE_NAME");
        if name.ends_with("_mysql_redis_cluster") {
            Backend::MySqlRedisCluster
        } else if name.ends_with("_mysql_redis") {
            Backend::MySqlRedis
        } else if name.ends_with("_mysql") {
            Backend::MySql
        } else {
            Backend::Sqlite
        }
    }
}

/// The Redis server the gate tests use: `SPRAY_TEST_REDIS_URL`, or the local Redis.
pub fn redis_url() -> String {
    std::env::var("SPRAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix of its own for one test, so tests sharing a Redis never see each other.
pub fn redis_prefix() -> String {
    format!("spray-test-{:016x}", rand::random::<u64>())
}

/// The MySQL server the backend tests use: `SPRAY_TEST_MYSQL_URL`, or the local MariaDB.
/// Never skipped: if it is unreachable the tests fail and say why.
pub fn mysql_admin_url() -> String {
    std::env::var("SPRAY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A MySQL database made for one test and dropped when the test ends.
pub struct MySqlDatabase {
    pub url: String,
    name: String,
}

impl MySqlDatabase {
    pub async fn create() -> MySqlDatabase {
        use sqlx::Connection;
        let admin = mysql_admin_url();
        let name = format!("spray_t_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::MySqlConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("the MySQL backend tests need MariaDB/MySQL at SPRAY_TEST_MYSQL_URL ({admin}): {e}")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap_or(&admin);
        MySqlDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for MySqlDatabase {
    fn drop(&mut self) {
        let (admin, name) = (mysql_admin_url(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on async work: use a
        // thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::MySqlConnection::connect(&admin).await {
                    // The test's pool may still hold connections: end them, so the DROP
                    // does not wait for their metadata locks.
                    let ids: Vec<u64> =
                        sqlx::query_scalar("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ?")
                            .bind(&name)
                            .fetch_all(&mut conn)
                            .await
                            .unwrap_or_default();
                    for id in ids {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                            .execute(&mut conn)
                            .await;
                    }
                    let drop = format!("DROP DATABASE IF EXISTS {name}");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
                }
            });
        });
        let _ = dropped.join();
    }
}

/// The `host:port` of a `scheme://[user@]host:port/db` URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

pub struct TestApp {
    pub router: Router,
    pub clock: Arc<ManualClock>,
    pub tokens: Arc<ScriptedTokens>,
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub backend: Backend,
    _dir: tempfile::TempDir,
    _mysql: Option<MySqlDatabase>,
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

    pub async fn with_settings(settings: Settings) -> TestApp {
        TestApp::build(settings, None).await
    }

    /// A MySQL-backed app whose store reaches the database through a [`proxy::DbProxy`]
    /// the test arms to cut connections; returned with it. The test's own reads can go
    /// around it (see [`TestApp::direct_database_url`]).
    pub async fn behind_proxy(settings: Settings) -> (TestApp, proxy::DbProxy) {
        let admin = mysql_admin_url();
        let upstream = authority(&admin).to_owned();
        let db_proxy = proxy::DbProxy::start(&upstream).await;
        let app = TestApp::build(settings, Some(db_proxy.addr.to_string())).await;
        (app, db_proxy)
    }

    /// The test's MySQL database, reached directly rather than through any proxy.
    pub fn direct_database_url(&self) -> &str {
        &self._mysql.as_ref().expect("a MySQL backend").url
    }

    async fn build(mut settings: Settings, proxy: Option<String>) -> TestApp {
        let backend = Backend::of_this_test_binary();
        let dir = tempfile::tempdir().unwrap();
        let mysql = match backend {
            Backend::Sqlite => {
                settings.database_url = format!("sqlite://{}", dir.path().join("spray.db").display());
                None
            }
            Backend::MySql | Backend::MySqlRedis | Backend::MySqlRedisCluster => {
                let database = MySqlDatabase::create().await;
                settings.database_url = match &proxy {
                    Some(proxy) => database.url.replacen(authority(&database.url), proxy, 1),
                    None => database.url.clone(),
                };
                Some(database)
            }
        };
        assert!(
            proxy.is_none() || backend != Backend::Sqlite,
            "a database proxy needs a MySQL backend"
        );
        // A test may bring a Redis of its own; otherwise the backend's.
        if settings.redis_url.is_none() {
            match backend {
                Backend::MySqlRedis => settings.redis_url = Some(redis_url()),
                Backend::MySqlRedisCluster => settings.redis_url = Some(cluster::shared().urls()),
                Backend::Sqlite | Backend::MySql => {}
            }
        }
        settings.redis_key_prefix = redis_prefix();
        // The contract tests race hundreds of requests at once to prove the money rules;
        // admission (503 at once past --store-concurrency) has tests of its own.
        if settings.store_concurrency == spray::config::DEFAULT_STORE_CONCURRENCY {
            settings.store_concurrency = 4096;
        }
        let store = open_store(&settings).await.unwrap();
        let clock = Arc::new(ManualClock::new(start_time()));
        let tokens = Arc::new(ScriptedTokens::default());
        let sources = spray::service::Sources {
            clock: clock.clone(),
            tokens: tokens.clone(),
            randomness: Arc::new(spray::domain::SeededRandomness::new(
                start_time().timestamp().unsigned_abs(),
            )),
        };
        let router = build_router(&settings, store.clone(), sources).unwrap();
        TestApp {
            router,
            clock,
            tokens,
            store,
            settings,
            backend,
            _dir: dir,
            _mysql: mysql,
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
        self.post_keyed(path, user, room, None, &body.to_string()).await
    }

    pub async fn get(&self, path: &str, user: i64, room: Option<&str>) -> Answer {
        let mut request = Request::builder().uri(path).header("x-user-id", user.to_string());
        if let Some(room) = room {
            request = request.header("x-room-id", room);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    /// A spray request with this body as `OWNER` in the header room `ROOM`, whatever the
    /// answer.
    pub async fn post_spray(&self, body: Value) -> Answer {
        self.post("/api/v1/spray", OWNER, Some(ROOM), body).await
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

    /// The amount received from the spray `token` and who received it, as its owner's
    /// lookup shows them.
    pub async fn recipients(&self, token: &str) -> (u64, HashSet<i64>) {
        let details = self.lookup(OWNER, token).await.body;
        let users = details["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["user_id"].as_i64().unwrap())
            .collect();
        (details["received_amount"].as_u64().unwrap(), users)
    }

    /// Runs `spray audit`'s checks in process and asserts they are clean.
    pub async fn assert_audit_clean(&self) {
        let report = spray::audit::run(self.store.as_ref()).await.unwrap();
        assert!(report.is_clean(), "audit failed:\n{}", report.summary());
    }
}

/// Raw access to the test's Redis (single server or cluster), for tests that inspect or
/// damage the gate's keys.
pub struct RawRedis {
    single: Option<redis::aio::MultiplexedConnection>,
    cluster: Option<redis::cluster_async::ClusterConnection>,
}

impl RawRedis {
    pub async fn connect(backend: Backend) -> RawRedis {
        match backend {
            Backend::MySqlRedisCluster => {
                let nodes: Vec<String> = cluster::shared().urls().split(',').map(str::to_owned).collect();
                let client = redis::cluster::ClusterClient::new(nodes).unwrap();
                RawRedis {
                    single: None,
                    cluster: Some(client.get_async_connection().await.unwrap()),
                }
            }
            _ => {
                let client = redis::Client::open(redis_url()).unwrap();
                RawRedis {
                    single: Some(client.get_multiplexed_async_connection().await.unwrap()),
                    cluster: None,
                }
            }
        }
    }

    pub async fn connect_url(url: &str) -> RawRedis {
        let client = redis::Client::open(url).unwrap();
        RawRedis {
            single: Some(client.get_multiplexed_async_connection().await.unwrap()),
            cluster: None,
        }
    }

    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match (&mut self.single, &mut self.cluster) {
            (Some(conn), _) => cmd.query_async(conn).await.unwrap(),
            (_, Some(conn)) => cmd.query_async(conn).await.unwrap(),
            _ => unreachable!("connected to one or the other"),
        }
    }
}

impl TestApp {
    /// The gate's keys of the spray `token` in `ROOM`.
    pub fn gate_keys(&self, token: &str) -> spray::gate::GateKeys {
        spray::gate::GateKeys::new(
            &self.settings.redis_key_prefix,
            &spray::domain::RoomId::parse(ROOM).unwrap(),
            &spray::domain::Token::parse(token).unwrap(),
        )
    }
}

/// Helpers for the tests of a spray's life after its window (settlement, retention,
/// idempotency).
impl TestApp {
    /// The test's clock, now.
    pub fn now(&self) -> DateTime<Utc> {
        use spray::clock::Clock;
        self.clock.now()
    }

    /// A `SELECT COUNT(*)` through the test's store.
    pub async fn count(&self, sql: &'static str) -> i64 {
        self.store.count(sql).await.unwrap()
    }

    /// Polls [`TestApp::count`] until it answers `want`, for at most about ten seconds.
    pub async fn eventually_count(&self, sql: &'static str, want: i64) {
        for _ in 0..1000 {
            if self.count(sql).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("`{sql}` never answered {want}");
    }

    /// Counts with a query built at run time (the store's `count` takes static text).
    pub async fn count_where(&self, sql: String) -> i64 {
        self.store.count(Box::leak(sql.into_boxed_str())).await.unwrap()
    }

    /// Runs one statement directly on the test's database, behind the service's back.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.settings.database_url).await?;
                let done = sqlx::query(sql).execute(&pool).await;
                pool.close().await;
                Ok(done?.rows_affected())
            }
            Backend::MySql | Backend::MySqlRedis | Backend::MySqlRedisCluster => {
                let pool = sqlx::MySqlPool::connect(&self.settings.database_url).await?;
                let done = sqlx::query(sql).execute(&pool).await;
                pool.close().await;
                Ok(done?.rows_affected())
            }
        }
    }

    /// Another store on the same database, as a second instance of the service would open.
    pub async fn second_store(&self) -> Arc<dyn Store> {
        open_store(&self.settings).await.unwrap()
    }

    /// A JSON POST with an exact body text and optional `Idempotency-Key`.
    pub async fn post_keyed(
        &self,
        path: &str,
        user: i64,
        room: Option<&str>,
        key: Option<&str>,
        body: &str,
    ) -> Answer {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/json")
            .header("x-user-id", user.to_string());
        if let Some(room) = room {
            request = request.header("x-room-id", room);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request.body(Body::from(body.to_owned())).unwrap())
            .await
    }
}
