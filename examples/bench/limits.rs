//! The machine's limits, measured in the same run as the workloads: what the disk, MariaDB
//! and Redis do for the same kinds of work with nothing of spray in between. (The
//! `/healthz` floor is a workload: it is measured on each store's own server.)

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::MYSQL_ADMIN;
use crate::load::{CpuSpent, count_f64, rate, ticks_to_micros};

/// Rows of the MariaDB table: large enough that 64 clients rarely hit the same row.
const MARIADB_ROWS: u64 = 100_000;
/// Clients of `mariadb-slap`.
pub const MARIADB_CLIENTS: usize = 64;
/// Redis script calls in flight.
pub const REDIS_IN_FLIGHT: usize = 256;

/// Single-row durable SQLite commits per second: one writer (rusqlite, the same bundled
/// SQLite library spray links), WAL, `synchronous=FULL`, a file in `dir` (the disk the
/// SQLite store uses), each `INSERT` its own transaction, for `duration`.
pub async fn sqlite_commits(dir: &Path, duration: Duration) -> f64 {
    let path = dir.join(format!("limit-{:08x}.db", rand::random::<u32>()));
    tokio::task::spawn_blocking(move || {
        let db = rusqlite::Connection::open(&path).expect("open the SQLite file");
        db.pragma_update(None, "journal_mode", "WAL").expect("WAL");
        db.pragma_update(None, "synchronous", "FULL")
            .expect("synchronous=FULL");
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)", ())
            .expect("create the table");
        let mut insert = db.prepare("INSERT INTO t (v) VALUES (?1)").expect("prepare");
        let started = Instant::now();
        let mut commits = 0u64;
        while started.elapsed() < duration {
            // Autocommit: each statement is a transaction of its own, durable when it
            // returns.
            insert
                .execute([i64::try_from(commits).unwrap_or(0)])
                .expect("insert");
            commits += 1;
        }
        let elapsed = started.elapsed();
        drop(insert);
        drop(db);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        rate(commits, elapsed)
    })
    .await
    .expect("the SQLite limit task")
}

/// Single-row durable point updates on distinct rows per second, driven by `mariadb-slap`
/// (a C client, so the client is not the bottleneck): `MARIADB_CLIENTS` connections, each
/// in autocommit calling a procedure that updates one row picked at random among
/// `MARIADB_ROWS` (a procedure, because `WHERE id = FLOOR(RAND() * n)` would scan the table:
/// `RAND()` is evaluated per row). The count is read back from the table.
///
/// Also what one update cost the whole machine, in microseconds of CPU over all its cores
/// (MariaDB and `mariadb-slap` together, and whatever else ran): the figure to set beside
/// what a winner costs, when both are bounded by the same cores.
pub async fn mariadb_point_updates(queries: u64) -> Result<MariadbLimit, String> {
    let name = format!("spray_bench_limit_{:08x}", rand::random::<u32>());
    let mut admin = sqlx::MySqlConnection::connect(MYSQL_ADMIN)
        .await
        .map_err(|e| e.to_string())?;
    let setup = [
        format!("CREATE DATABASE {name}"),
        format!("CREATE TABLE {name}.t (id INT PRIMARY KEY, v BIGINT NOT NULL DEFAULT 0) ENGINE=InnoDB"),
        format!("INSERT INTO {name}.t (id) SELECT seq FROM seq_1_to_{MARIADB_ROWS}"),
        format!(
            "CREATE PROCEDURE {name}.bump() BEGIN \
             DECLARE i INT DEFAULT FLOOR(1 + RAND() * {MARIADB_ROWS}); \
             UPDATE t SET v = v + 1 WHERE id = i; END"
        ),
    ];
    for statement in setup {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
            .map_err(|e| e.to_string())?;
    }
    let args = vec![
        "--protocol=tcp".to_owned(),
        "--host=127.0.0.1".to_owned(),
        "--port=3306".to_owned(),
        "--user=root".to_owned(),
        format!("--create-schema={name}"),
        format!("--concurrency={MARIADB_CLIENTS}"),
        "--iterations=1".to_owned(),
        format!("--number-of-queries={queries}"),
        "--query=CALL bump()".to_owned(),
    ];
    let spent_before = CpuSpent::so_far();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("mariadb-slap")
            .args(args)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("mariadb-slap: {e}"))?;
    let spent = spent_before
        .zip(CpuSpent::so_far())
        .map(|(before, after)| before.until(&after));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let seconds = text
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("Average number of seconds to run all queries:")
                .and_then(|rest| rest.trim().trim_end_matches("seconds").trim().parse::<f64>().ok())
        })
        .ok_or_else(|| {
            format!(
                "mariadb-slap said: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let sum: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CAST(SUM(v) AS SIGNED) FROM {name}.t"
    )))
    .fetch_one(&mut admin)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    if seconds <= 0.0 {
        return Err("mariadb-slap reported no time".into());
    }
    let updates = count_f64(u64::try_from(sum).unwrap_or(0));
    Ok(MariadbLimit {
        per_second: updates / seconds,
        cpu_micros: spent
            .filter(|_| updates > 0.0)
            .map(|spent| ticks_to_micros(spent.machine) / updates),
        server_cpu_micros: spent
            .filter(|_| updates > 0.0)
            .map(|spent| ticks_to_micros(spent.mariadb) / updates),
    })
}

/// What [`mariadb_point_updates`] measured.
pub struct MariadbLimit {
    pub per_second: f64,
    /// The machine's CPU time per update, in microseconds over all cores.
    pub cpu_micros: Option<f64>,
    /// The part of it MariaDB's own process was charged with (the rest is `mariadb-slap`'s,
    /// the kernel's and whatever else ran).
    pub server_cpu_micros: Option<f64>,
}

/// Redis script calls per second: `EVALSHA` of a small script (one `HINCRBY`) on keys of
/// one hash, `REDIS_IN_FLIGHT` calls in flight on one multiplexed connection.
pub async fn redis_script_calls(url: &str, calls: u64) -> Result<f64, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let script = redis::Script::new("return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)");
    let key = format!("spray-bench-limit-{:08x}", rand::random::<u32>());
    let gate = Arc::new(Semaphore::new(REDIS_IN_FLIGHT));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..calls {
        let (mut conn, script, key, gate) = (conn.clone(), script.clone(), key.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            // invoke_async sends EVALSHA (loading the script once on NOSCRIPT).
            script
                .key(&key)
                .arg(i % 1_000)
                .invoke_async::<i64>(&mut conn)
                .await
                .ok()
        });
    }
    let mut done = 0u64;
    while let Some(call) = tasks.join_next().await {
        if matches!(call, Ok(Some(_))) {
            done += 1;
        }
    }
    let elapsed = started.elapsed();
    let mut conn = conn.clone();
    let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
    if done != calls {
        return Err(format!("{} of {calls} script calls failed", calls - done));
    }
    Ok(rate(done, elapsed))
}
