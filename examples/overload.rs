//! The overload benchmark: is overload refused fast, and do the accepted requests keep
//! their latency? Against the real `spray` binary on SQLite (the embedded default):
//!
//! 1. capacity: sprays (distinct sprayers and rooms, 5 shares) from a fixed number of
//!    clients that each send the next request when the last is answered, for a few
//!    seconds: the rate the service can do, and its latency at that rate;
//! 2. overload: an open-loop offer of three times that rate (each request sent on its
//!    schedule, whatever the answers), for the same time.
//!
//! It reports, for each phase, the answers by status and the latency percentiles of the
//! accepted (201) and of the shed (503) requests; checks that every 503 carries
//! `Retry-After` and that none came from the request time-out (`/metrics`); and proves
//! nothing was half-done: every 201's spray is in the store, no refused request left one
//! (each request has its own sprayer), and `spray audit` is clean.
//!
//! Run it with `bench/overload.sh` (which builds the release binary first). Loopback
//! only; bounded in time and requests. Prints a Markdown report.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

#[path = "common/server.rs"]
mod server;

use serde_json::json;
use server::binary;
use tokio::task::JoinSet;

/// Clients of the capacity phase: fewer than the default --store-concurrency (64), so
/// that this phase measures what the store can do, not the admission bound.
const CLIENTS: usize = 48;
/// How long each phase offers load.
const PHASE: Duration = Duration::from_secs(5);
/// The overload, as a multiple of the measured capacity.
const OVERLOAD: u32 = 3;
/// No request waits longer than this for its answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One answer: status (0 when no answer came), latency, whether a 503 said Retry-After.
struct Answer {
    status: u16,
    latency: Duration,
    retry_after: bool,
}

async fn spray(client: &reqwest::Client, base: &str, sprayer: i64) -> Answer {
    let sent = Instant::now();
    let answer = client
        .post(format!("{base}/api/v1/spray"))
        .header("x-user-id", sprayer.to_string())
        .header("x-room-id", format!("room-{sprayer}"))
        .json(&json!({"amount": 5000, "recipient_count": 5}))
        .send()
        .await;
    match answer {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let retry_after = answer.headers().contains_key("retry-after");
            let _ = answer.bytes().await;
            Answer {
                status,
                latency: sent.elapsed(),
                retry_after,
            }
        }
        Err(_) => Answer {
            status: 0,
            latency: sent.elapsed(),
            retry_after: false,
        },
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .pool_max_idle_per_host(4096)
        .build()
        .unwrap()
}

/// Closed loop: `CLIENTS` clients for `PHASE`.
async fn capacity(base: &str, next_sprayer: Arc<AtomicI64>) -> (Vec<Answer>, Duration) {
    let client = client();
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, base, next) = (client.clone(), base.to_owned(), next_sprayer.clone());
        clients.spawn(async move {
            let mut answers = Vec::new();
            while started.elapsed() < PHASE {
                answers.push(spray(&client, &base, next.fetch_add(1, Ordering::Relaxed)).await);
            }
            answers
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = clients.join_next().await {
        answers.extend(done.unwrap());
    }
    (answers, started.elapsed())
}

/// Open loop: `rate` requests a second for `PHASE`, each sent on its schedule.
async fn offer(base: &str, rate: f64, next_sprayer: Arc<AtomicI64>) -> (Vec<Answer>, Duration) {
    let client = client();
    let every = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut requests = JoinSet::new();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < PHASE {
        ticks.tick().await;
        let (client, base) = (client.clone(), base.to_owned());
        let sprayer = next_sprayer.fetch_add(1, Ordering::Relaxed);
        requests.spawn(async move { spray(&client, &base, sprayer).await });
    }
    let mut answers = Vec::new();
    while let Some(done) = requests.join_next().await {
        answers.push(done.unwrap());
    }
    (answers, started.elapsed())
}

fn percentile(latencies: &mut [Duration], percent: usize) -> String {
    if latencies.is_empty() {
        return "-".into();
    }
    latencies.sort();
    let at = latencies[(latencies.len() - 1) * percent / 100];
    format!("{:.1} ms", at.as_secs_f64() * 1000.0)
}

struct Summary {
    line: String,
    accepted_per_second: f64,
    created: usize,
    refused: usize,
    refused_without_retry_after: usize,
    no_answer: usize,
}

fn summarize(phase: &str, answers: &[Answer], elapsed: Duration) -> Summary {
    let mut accepted: Vec<Duration> = answers
        .iter()
        .filter(|a| a.status == 201)
        .map(|a| a.latency)
        .collect();
    let mut shed: Vec<Duration> = answers
        .iter()
        .filter(|a| a.status == 503)
        .map(|a| a.latency)
        .collect();
    let created = accepted.len();
    let refused = shed.len();
    let other = answers
        .iter()
        .filter(|a| ![0, 201, 503].contains(&a.status))
        .count();
    let no_answer = answers.iter().filter(|a| a.status == 0).count();
    let accepted_per_second = f64::from(u32::try_from(created).unwrap_or(u32::MAX)) / elapsed.as_secs_f64();
    let offered = f64::from(u32::try_from(answers.len()).unwrap_or(u32::MAX)) / elapsed.as_secs_f64();
    let line = format!(
        "| {phase} | {offered:.0}/s | {accepted_per_second:.0}/s | {} | {} | {} | {} | {} | {} | {other} | {no_answer} |",
        percentile(&mut accepted, 50),
        percentile(&mut accepted, 99),
        refused,
        percentile(&mut shed, 50),
        percentile(&mut shed, 99),
        answers
            .iter()
            .filter(|a| a.status == 503 && a.retry_after)
            .count(),
    );
    Summary {
        line,
        accepted_per_second,
        created,
        refused,
        refused_without_retry_after: answers
            .iter()
            .filter(|a| a.status == 503 && !a.retry_after)
            .count(),
        no_answer,
    }
}

async fn timeouts(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix("http_request_timeouts_total")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let extra: Vec<String> = std::env::args().skip(1).collect();
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("spray.db").display());
    let flags: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (server, base) = server::start(&database_url, &flags, "error").await;
    let next_sprayer = Arc::new(AtomicI64::new(1));

    // A short warm-up, so the first phase does not measure an empty file's growth.
    let (warm_up, _) = capacity(&base, next_sprayer.clone()).await;
    let warm_up_created = warm_up.iter().filter(|a| a.status == 201).count();
    let (answers, elapsed) = capacity(&base, next_sprayer.clone()).await;
    let at_capacity = summarize(
        &format!("capacity ({CLIENTS} clients, closed loop)"),
        &answers,
        elapsed,
    );
    let rate = at_capacity.accepted_per_second * f64::from(OVERLOAD);
    let (answers, elapsed) = offer(&base, rate, next_sprayer.clone()).await;
    let overloaded = summarize(&format!("{OVERLOAD}x capacity (open loop)"), &answers, elapsed);
    let timed_out = timeouts(&base).await;
    drop(server);

    // Nothing half-done: every 201 is a spray in the store, and nothing else left one.
    let pool = sqlx::SqlitePool::connect(&database_url).await.unwrap();
    let sprays: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sprays")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let audit = Command::new(binary("spray"))
        .args(["audit", "--database-url", &database_url])
        .stdout(Stdio::null())
        .status()
        .unwrap();

    println!(
        "Settings: {}",
        if extra.is_empty() {
            "defaults".to_owned()
        } else {
            extra.join(" ")
        }
    );
    println!();
    println!(
        "| phase | offered | accepted (201) | 201 p50 | 201 p99 | shed (503) | 503 p50 | 503 p99 | 503 with Retry-After | other | no answer |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!("{}", at_capacity.line);
    println!("{}", overloaded.line);
    println!();
    let answered_created = warm_up_created + at_capacity.created + overloaded.created;
    println!(
        "Requests cut by the time-out: {timed_out}. 503 without Retry-After: {}. No answer: {}. \
         Sprays in the store: {sprays}; answered 201: {answered_created} ({}). \
         Refused in all: {}. `spray audit`: {}.",
        at_capacity.refused_without_retry_after + overloaded.refused_without_retry_after,
        at_capacity.no_answer + overloaded.no_answer,
        if i64::try_from(answered_created) == Ok(sprays) {
            "equal: nothing half-done"
        } else {
            "DIFFERENT"
        },
        at_capacity.refused + overloaded.refused,
        if audit.success() { "clean" } else { "FAILED" },
    );
}
