//! Several `spray serve` processes on one MariaDB and one Redis behave as one service:
//! real races over HTTP through three real instances, also while Redis is flushed or
//! stopped in the middle, and `spray audit` clean after each.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::MySqlDatabase;
use common::cluster::OwnRedis;
use common::process::*;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

const ROOM: &str = "HOT-ROOM";
const SPRAYER: i64 = 1;
/// Requests in flight at once, across the three instances.
const IN_FLIGHT: usize = 128;

struct Fleet {
    servers: Vec<Server>,
    database: MySqlDatabase,
    redis: OwnRedis,
    client: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Three instances on a fresh database and a Redis of the test's own, started at the
    /// same moment (so they also race to apply the migrations).
    async fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let database = MySqlDatabase::create().await;
        let redis = OwnRedis::start();
        let prefix = format!("fleet-{:08x}", rand::random::<u32>());
        // Eight connections each: three tests of three instances stay under MariaDB's 151.
        // Every racer is let in (past the default admission bound): these races prove
        // exact money, not overload (a slow instance may hold most of the 128 in flight).
        let flags = [
            "--redis-url",
            &redis.url(),
            "--redis-key-prefix",
            &prefix,
            "--database-max-connections",
            "8",
            "--store-concurrency",
            "4096",
        ];
        let (a, b, c) = tokio::join!(
            Server::start(dir.path(), &database.url, &flags, &[]),
            Server::start(dir.path(), &database.url, &flags, &[]),
            Server::start(dir.path(), &database.url, &flags, &[]),
        );
        Fleet {
            servers: vec![a, b, c],
            database,
            redis,
            client: client(),
            dir,
        }
    }

    async fn spray(&self, amount: u64, count: u64) -> String {
        let answer = self
            .client
            .post(self.servers[0].url("/api/v1/spray"))
            .header("x-user-id", SPRAYER.to_string())
            .header("x-room-id", ROOM)
            .json(&json!({"amount": amount, "recipient_count": count}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
        answer.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Sends one receive per entry of `users` (a user may appear many times), spread over
    /// the instances, `IN_FLIGHT` at a time; `midway` runs once a third have answered.
    async fn race(&self, token: &str, users: Vec<i64>, midway: impl FnOnce() + Send + 'static) -> Race {
        let total = users.len();
        let answered = Arc::new(AtomicUsize::new(0));
        let third_done = Arc::new(Notify::new());
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut racers = JoinSet::new();
        for (i, user) in users.into_iter().enumerate() {
            let url = self.servers[i % self.servers.len()].url("/api/v1/receive");
            let (client, token, slots) = (self.client.clone(), token.to_owned(), slots.clone());
            let (answered, third_done) = (answered.clone(), third_done.clone());
            racers.spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                let answer = client
                    .post(url)
                    .header("x-user-id", user.to_string())
                    .header("x-room-id", ROOM)
                    .json(&json!({"token": token}))
                    .send()
                    .await
                    .unwrap();
                let status = answer.status().as_u16();
                let body: Value = answer.json().await.unwrap_or(Value::Null);
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == total / 3 {
                    third_done.notify_one();
                }
                (user, status, body)
            });
        }
        third_done.notified().await;
        midway();
        let mut race = Race::default();
        while let Some(result) = racers.join_next().await {
            let (user, status, body) = result.unwrap();
            match status {
                200 => {
                    let amount = body["received_amount"].as_u64().unwrap();
                    assert!(
                        race.winners.insert(user, amount).is_none(),
                        "user {user} was paid twice"
                    );
                }
                _ => {
                    *race
                        .refusals
                        .entry(format!("{status} {}", body["code"].as_str().unwrap_or("?")))
                        .or_default() += 1
                }
            }
        }
        race
    }

    /// The sprayer's view: who received what.
    async fn recipients(&self, token: &str) -> HashMap<i64, u64> {
        let details: Value = self
            .client
            .get(self.servers[2].url(&format!("/api/v1/spray/{token}")))
            .header("x-user-id", SPRAYER.to_string())
            .header("x-room-id", ROOM)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut recipients = HashMap::new();
        for r in details["recipients"].as_array().unwrap() {
            let user = r["user_id"].as_i64().unwrap();
            assert!(
                recipients.insert(user, r["amount"].as_u64().unwrap()).is_none(),
                "{user} listed twice"
            );
        }
        recipients
    }

    async fn assert_audit_clean(&self) {
        for server in &self.servers {
            let log = server.log_text();
            assert!(
                !log.contains("ERROR") && !log.contains("store unavailable"),
                "instance log:\n{log}"
            );
        }
        let audit = run_spray(
            self.dir.path(),
            "audit",
            &["audit", "--database-url", &self.database.url],
            &[],
            COMMAND_LIMIT,
        )
        .await;
        assert!(
            audit.status.success(),
            "audit failed:\n{}{}",
            audit.stdout,
            audit.stderr
        );
    }
}

#[derive(Debug, Default)]
struct Race {
    winners: HashMap<i64, u64>,
    refusals: HashMap<String, usize>,
}

/// 2,000 distinct users race for 50 shares; then one user races themself 60 times
/// through all three instances on a second spray.
async fn exact_races(fleet: &Fleet, disrupt: impl Fn() + Send + Sync + Clone + 'static) {
    let token = fleet.spray(1_000_003, 50).await;
    let race = fleet.race(&token, (2..2002).collect(), disrupt.clone()).await;
    assert_eq!(race.winners.len(), 50, "refusals: {:?}", race.refusals);
    assert_eq!(race.winners.values().sum::<u64>(), 1_000_003);
    assert_eq!(
        race.refusals.get("409 SPRAY_EXHAUSTED"),
        Some(&1950),
        "{:?}",
        race.refusals
    );
    assert_eq!(fleet.recipients(&token).await, race.winners);

    let token = fleet.spray(1000, 10).await;
    let race = fleet.race(&token, vec![7; 60], disrupt).await;
    assert_eq!(race.winners.len(), 1, "{:?}", race.refusals);
    assert_eq!(
        race.refusals.get("409 ALREADY_RECEIVED"),
        Some(&59),
        "{:?}",
        race.refusals
    );
    assert_eq!(fleet.recipients(&token).await, race.winners);
    fleet.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_give_exact_shares_under_real_races() {
    let fleet = Fleet::start().await;
    exact_races(&fleet, || {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn races_stay_exact_when_redis_is_flushed_midway() {
    let fleet = Fleet::start().await;
    let redis_port = fleet.redis.port;
    exact_races(&fleet, move || {
        let flushed = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &redis_port.to_string(), "flushall"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&flushed.stdout).trim(), "OK");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn races_stay_exact_when_redis_stops_midway() {
    let fleet = Arc::new(Fleet::start().await);
    let stopper = fleet.clone();
    exact_races(&fleet, move || stopper.redis.stop()).await;
}
