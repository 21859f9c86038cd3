//! The hot-spray benchmark: one spray of 1,000 shares, 20,000 distinct users racing for
//! it over 256 concurrent connections, against the real `spray` binary on SQLite, on
//! MySQL alone and on MySQL + Redis, side by side in one run. Next to them, in the same
//! run, the limits of the machine's MariaDB and Redis for the same kinds of work.
//!
//! Run it with `bench/hot-spray.sh` (which builds the release binary first). Loopback
//! only; bounded in requests and time. Prints a Markdown report.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/server.rs"]
mod server;

use serde_json::{Value, json};
use server::Server;
use sqlx::Connection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const SHARES: u64 = 1_000;
const USERS: i64 = 20_000;
const CONNECTIONS: usize = 256;
const ROUNDS: usize = 3;
const MYSQL_ADMIN: &str = "mysql://root@127.0.0.1:3306/test";
const REDIS: &str = "redis://127.0.0.1:6379";

/// The hot spray measures how many receives the store can do with 256 at a time, so every
/// request is let in; by default past 64 store calls at once requests are refused with 503
/// (see bench/overload.sh).
async fn start(database_url: &str, extra: &[&str]) -> (Server, String) {
    let mut flags = vec!["--database-max-connections", "32", "--store-concurrency", "1024"];
    flags.extend_from_slice(extra);
    server::start(database_url, &flags, "warn").await
}

struct Run {
    requests_per_second: f64,
    /// Shares recorded per second: winners over the time until the last winner's answer.
    winners_per_second: f64,
    p50: Duration,
    p99: Duration,
    winners: usize,
    paid: u64,
    errors: usize,
}

/// One spray of `SHARES` shares, then `USERS` distinct receivers, `CONNECTIONS` at a time.
async fn hot_spray(base: &str, round: usize) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .unwrap();
    let room = format!("bench-room-{round}");
    let created: Value = client
        .post(format!("{base}/api/v1/spray"))
        .header("x-user-id", "1")
        .header("x-room-id", &room)
        .json(&json!({"amount": 1_000_000, "recipient_count": SHARES}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().expect("a token").to_owned();
    let gate = Arc::new(Semaphore::new(CONNECTIONS));
    let started = Instant::now();
    let mut racers = JoinSet::new();
    for user in 2..USERS + 2 {
        let (client, gate, room, token) = (client.clone(), gate.clone(), room.clone(), token.clone());
        let url = format!("{base}/api/v1/receive");
        racers.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let sent = Instant::now();
            let answer = client
                .post(url)
                .header("x-user-id", user.to_string())
                .header("x-room-id", room)
                .json(&json!({"token": token}))
                .send()
                .await;
            let (status, amount) = match answer {
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    let body: Value = answer.json().await.unwrap_or(Value::Null);
                    (status, body["received_amount"].as_u64().unwrap_or(0))
                }
                Err(_) => (0, 0),
            };
            (sent.elapsed(), status, amount, Instant::now())
        });
    }
    let mut latencies = Vec::with_capacity(usize::try_from(USERS).unwrap());
    let (mut winners, mut paid, mut errors) = (0, 0, 0);
    let mut last_winner = started;
    while let Some(done) = racers.join_next().await {
        let (latency, status, amount, finished) = done.unwrap();
        latencies.push(latency);
        match status {
            200 => {
                winners += 1;
                paid += amount;
                last_winner = last_winner.max(finished);
            }
            409 => {}
            _ => errors += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |percent: usize| latencies[(latencies.len() - 1) * percent / 100];
    Run {
        requests_per_second: per_second(latencies.len(), elapsed),
        winners_per_second: per_second(winners, last_winner - started),
        p50: at(50),
        p99: at(99),
        winners,
        paid,
        errors,
    }
}

/// MariaDB's limits for the two kinds of load: point updates of distinct rows, and
/// transactions that all fight for the first free row of one table.
async fn mariadb_limits(url: &str) -> (f64, f64) {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(64)
        .connect(url)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, taker BIGINT NULL, KEY (taker)) ENGINE=InnoDB",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rows: i64 = 20_000;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1000) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({i}, NULL)")).collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO bench_rows VALUES {}",
            values.join(",")
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    // Distinct rows: every update hits its own row.
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..64i64 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut id = worker;
            while id < rows {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("UPDATE bench_rows SET taker = ? WHERE id = ? AND taker IS NULL")
                    .bind(id + 1)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                id += 64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let distinct = per_second(usize::try_from(rows).unwrap(), started.elapsed());

    // The first free row: every transaction looks for the lowest free row and takes it.
    sqlx::query("UPDATE bench_rows SET taker = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let takes: i64 = 2_000;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..64i64 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut n = worker;
            while n < takes {
                let mut tx = pool.begin().await.unwrap();
                let id: i64 = sqlx::query_scalar(
                    "SELECT id FROM bench_rows WHERE taker IS NULL ORDER BY id LIMIT 1 FOR UPDATE",
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                sqlx::query("UPDATE bench_rows SET taker = ? WHERE id = ?")
                    .bind(n + 1)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                n += 64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let first_free = per_second(usize::try_from(takes).unwrap(), started.elapsed());
    pool.close().await;
    (distinct, first_free)
}

/// Redis's limit for the gate's kind of work: one small Lua script per request on one
/// hot key, 256 at a time.
async fn redis_limit() -> f64 {
    let client = redis::Client::open(REDIS).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new("return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)");
    let key = format!("bench-{:08x}", rand::random::<u32>());
    let calls: usize = 100_000;
    let gate = Arc::new(Semaphore::new(CONNECTIONS));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..calls {
        let (mut conn, script, key, gate) = (conn.clone(), script.clone(), key.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let _: i64 = script
                .key(&key)
                .arg(i % 1000)
                .invoke_async(&mut conn)
                .await
                .unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = per_second(calls, started.elapsed());
    let mut conn = conn.clone();
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    rate
}

async fn create_database() -> (String, String) {
    let name = format!("spray_bench_{:08x}", rand::random::<u32>());
    let mut conn = sqlx::MySqlConnection::connect(MYSQL_ADMIN).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    (format!("mysql://root@127.0.0.1:3306/{name}"), name)
}

async fn drop_database(name: &str) {
    let mut conn = sqlx::MySqlConnection::connect(MYSQL_ADMIN).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    f64::from(u32::try_from(count).unwrap_or(u32::MAX)) / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    let (mysql, mysql_name) = create_database().await;
    let (gated, gated_name) = create_database().await;
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let setups: Vec<(&str, String, Vec<&str>)> = vec![
        ("SQLite", sqlite, vec![]),
        ("MySQL", mysql, vec![]),
        (
            "MySQL + Redis",
            gated,
            vec!["--redis-url", REDIS, "--redis-key-prefix", &prefix],
        ),
    ];
    println!("| store | round | requests/s | winners/s | p50 ms | p99 ms | winners | paid | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (name, url, extra) in &setups {
        let (_server, base) = start(url, extra).await;
        let mut runs = Vec::new();
        for round in 0..ROUNDS {
            let run = hot_spray(&base, round).await;
            println!(
                "| {name} | {round} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
                run.requests_per_second,
                run.winners_per_second,
                ms(run.p50),
                ms(run.p99),
                run.winners,
                run.paid,
                run.errors
            );
            runs.push(run);
        }
        summary.push((
            *name,
            median(runs.iter().map(|r| r.requests_per_second).collect()),
            median(runs.iter().map(|r| r.winners_per_second).collect()),
            median(runs.iter().map(|r| ms(r.p50)).collect()),
            median(runs.iter().map(|r| ms(r.p99)).collect()),
            runs.iter().all(|r| r.winners == 1000 && r.paid == 1_000_000),
            runs.iter().map(|r| r.errors).sum::<usize>(),
        ));
    }
    let (limits_url, limits_name) = create_database().await;
    let (distinct, first_free) = mariadb_limits(&limits_url).await;
    let redis = redis_limit().await;
    println!();
    println!(
        "Medians of {ROUNDS} rounds (each: 1 spray of {SHARES} shares, {USERS} distinct users, {CONNECTIONS} connections):"
    );
    println!();
    println!(
        "| store | requests/s | winners/s | p50 ms | p99 ms | every round exact (1000 winners, all paid) | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, rps, wps, p50, p99, exact, errors) in &summary {
        println!("| {name} | {rps:.0} | {wps:.0} | {p50:.1} | {p99:.1} | {exact} | {errors} |");
    }
    println!();
    println!("Limits measured in the same run:");
    println!();
    println!("| limit | per second |");
    println!("|---|---|");
    println!("| MariaDB: point-update transactions on distinct rows (64 connections) | {distinct:.0} |");
    println!("| MariaDB: transactions fighting for the first free row (64 connections) | {first_free:.0} |");
    println!("| Redis: one Lua script call on one hot key ({CONNECTIONS} in flight) | {redis:.0} |");
    for name in [mysql_name, gated_name, limits_name] {
        drop_database(&name).await;
    }
}
