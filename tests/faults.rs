//! Fault injection (issue 8): the real `spray serve` under a mixed load while its
//! processes and stores are killed, flushed and frozen, then a checker that proves from
//! the recorded history and the database (read directly) that nothing was lost or paid
//! twice, that no answer lied (a 5xx that changed something, a `SPRAY_EXHAUSTED` while
//! shares were free past the claim lease, a key blocked past its lease), and that every
//! instance recovered on its own, with the recovery time after each fault.
//!
//! Two scenarios, one after the other: three instances on a MariaDB and a Redis of the
//! test's own (each kind of fault once, an instance killed twice), and one instance on a
//! SQLite file killed with -9 twice. Each kill (of an instance or of MariaDB) comes in the
//! middle of a race for a hot 300-share spray, the case of the issue. Bounded by default
//! (about two minutes of load, then one; the binary takes about three and a half minutes
//! on two cores); `SPRAY_FAULTS_LONG=1` runs three rounds of three minutes of load each
//! (about ten minutes per scenario). `SPRAY_FAULTS_SEED=<n>` replays a schedule (the seed
//! is printed; the load's timing still varies);
//! `SPRAY_FAULTS_HISTORY=<file>` writes every request and its answer there. Traffic goes to
//! 127.0.0.1 only; every process started here is stopped by PID, also on panic.

mod common;

#[path = "faults/burst.rs"]
mod burst;
#[path = "faults/checker.rs"]
mod checker;
#[path = "faults/history.rs"]
mod history;
#[path = "faults/inject.rs"]
mod inject;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/mariadb.rs"]
mod mariadb;

use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::{CLAIM_LEASE_MS, Check, IDEMPOTENCY_LEASE_MS, Store};
use common::cluster::OwnRedis;
use common::process::{COMMAND_LIMIT, Server, run_spray};
use history::{History, Record, now_ms, outcome_counts, seconds};
use inject::{Fault, FaultKind, FaultReport, Probe, RECOVERY_LIMIT, Rig, recovery_text, schedule};
use load::{Ids, Load, LoadSettings, Targets};
use mariadb::OwnMariaDb;

/// The two scenarios run one after the other: on two cores, side by side they would
/// measure each other's CPU starvation rather than the service's recovery.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server setting the checker relies on (see `checker::REQUEST_TIMEOUT_MS`).
const REQUEST_TIMEOUT_FLAG: &str = "10s";
/// Messages printed per failed check (all are counted).
const SHOWN: usize = 10;

/// How long and how hard to run.
struct Mode {
    long: bool,
    rounds: u64,
    /// The least load per round (the faults take what they take on top in bounded mode).
    round_length: Duration,
    /// Load after the last fault of a round, so that holds stranded by it are older than
    /// the lease (and the request time-out) when later receivers come.
    tail: Duration,
    /// A round's load stops here whatever happens.
    round_cap: Duration,
    max_requests: usize,
    test_limit: Duration,
}

impl Mode {
    fn from_env() -> Mode {
        let long = std::env::var("SPRAY_FAULTS_LONG").is_ok_and(|v| v == "1");
        if long {
            Mode {
                long,
                rounds: 3,
                round_length: Duration::from_secs(180),
                tail: Duration::from_secs(20),
                round_cap: Duration::from_secs(300),
                max_requests: 300_000,
                test_limit: Duration::from_secs(3_600),
            }
        } else {
            Mode {
                long,
                rounds: 1,
                round_length: Duration::ZERO,
                tail: Duration::from_secs(20),
                round_cap: Duration::from_secs(200),
                max_requests: 60_000,
                test_limit: Duration::from_secs(280),
            }
        }
    }
}

fn seed() -> u64 {
    std::env::var("SPRAY_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

/// What a scenario needs beyond its rig.
struct Scenario {
    name: &'static str,
    kinds: Vec<FaultKind>,
    workers: usize,
    rooms: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_mariadb_and_redis_stay_correct_and_fair_under_faults() {
    let _serial = SERIAL.lock().await;
    let mode = Mode::from_env();
    let limit = mode.test_limit;
    tokio::time::timeout(limit, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mariadb = OwnMariaDb::start().await;
        let redis = OwnRedis::start();
        let flags: Vec<String> = [
            "--redis-url",
            &redis.url(),
            "--redis-key-prefix",
            "faults",
            "--database-max-connections",
            "16",
            "--request-timeout",
            REQUEST_TIMEOUT_FLAG,
        ]
        .map(str::to_owned)
        .to_vec();
        let database_url = mariadb.url();
        let borrowed: Vec<&str> = flags.iter().map(String::as_str).collect();
        // Started together, so they also race to apply the migrations.
        let (a, b, c) = tokio::join!(
            Server::start(dir.path(), &database_url, &borrowed, &[]),
            Server::start(dir.path(), &database_url, &borrowed, &[]),
            Server::start(dir.path(), &database_url, &borrowed, &[]),
        );
        let servers = vec![a, b, c];
        let targets = Arc::new(Targets::new(servers.iter().map(|s| s.base.clone()).collect()));
        let mut rig = Rig {
            dir,
            servers,
            database_url,
            flags,
            redis: Some(redis),
            mariadb: Some(mariadb),
            targets,
        };
        let mut kinds = FaultKind::ALL.to_vec();
        // A second kill of an instance: the fault that strands the most holds.
        kinds.push(FaultKind::KillInstance);
        let scenario = Scenario {
            name: "3 instances, MariaDB + Redis",
            kinds,
            workers: 24,
            rooms: ["R1", "R2", "R3", "R4"].map(str::to_owned).to_vec(),
        };
        run_and_check(&mut rig, &scenario, &mode).await;
    })
    .await
    .unwrap_or_else(|_| panic!("the MariaDB + Redis fault scenario ran past {limit:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_on_sqlite_stays_correct_under_kill_9() {
    let _serial = SERIAL.lock().await;
    let mode = Mode::from_env();
    let limit = mode.test_limit;
    tokio::time::timeout(limit, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let database_url = common::process::database_url(dir.path());
        let flags = vec!["--request-timeout".to_owned(), REQUEST_TIMEOUT_FLAG.to_owned()];
        let server = Server::start(
            dir.path(),
            &database_url,
            &["--request-timeout", REQUEST_TIMEOUT_FLAG],
            &[],
        )
        .await;
        let targets = Arc::new(Targets::new(vec![server.base.clone()]));
        let mut rig = Rig {
            dir,
            servers: vec![server],
            database_url,
            flags,
            redis: None,
            mariadb: None,
            targets,
        };
        let scenario = Scenario {
            name: "1 instance, SQLite",
            kinds: vec![FaultKind::KillInstance, FaultKind::KillInstance],
            workers: 12,
            rooms: ["S1", "S2", "S3"].map(str::to_owned).to_vec(),
        };
        run_and_check(&mut rig, &scenario, &mode).await;
    })
    .await
    .unwrap_or_else(|_| panic!("the SQLite fault scenario ran past {limit:?}"));
}

async fn run_and_check(rig: &mut Rig, scenario: &Scenario, mode: &Mode) {
    let seed = seed();
    eprintln!(
        "== {}: seed {seed} (replay with SPRAY_FAULTS_SEED={seed}), {} mode",
        scenario.name,
        if mode.long { "long" } else { "bounded" }
    );
    let began = Instant::now();
    let origin = now_ms();
    let history = Arc::new(History::default());
    let ids = Arc::new(Ids::default());
    let client = client();
    let probe = Probe {
        client: client.clone(),
        history: history.clone(),
        ids: ids.clone(),
    };
    let mut reports = Vec::new();
    for round in 0..mode.rounds {
        let round_seed = seed.wrapping_add(round);
        let round_start = Instant::now();
        let load = Arc::new(Load::new(
            client.clone(),
            rig.targets.clone(),
            history.clone(),
            ids.clone(),
            LoadSettings {
                workers: scenario.workers,
                rooms: scenario.rooms.clone(),
                deadline: round_start + mode.round_cap,
                max_requests: mode.max_requests,
                seed: round_seed,
            },
        ));
        let running = tokio::spawn(load.clone().run());
        // Long mode: cycle through the kinds until the round's time is up.
        let cycles = if mode.long { 20 } else { 1 };
        let plan: Vec<Fault> = schedule(
            round_seed,
            &scenario.kinds,
            cycles,
            rig.servers.len(),
            Duration::from_secs(6),
        );
        let faults_until = if mode.long {
            round_start + mode.round_length.saturating_sub(mode.tail)
        } else {
            round_start + mode.round_cap.saturating_sub(mode.tail)
        };
        reports.extend(inject::inject(rig, &plan, faults_until, &probe).await);
        let stop_at = (Instant::now() + mode.tail).max(round_start + mode.round_length);
        tokio::time::sleep_until(stop_at.into()).await;
        load.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        running.await.expect("the load");
        eprintln!(
            "round {} done after {:.1}s, {} requests so far",
            round + 1,
            round_start.elapsed().as_secs_f64(),
            history.len()
        );
    }
    let load_time = began.elapsed();
    let records = history.snapshot();
    if let Ok(path) = std::env::var("SPRAY_FAULTS_HISTORY") {
        let lines: String = records
            .iter()
            .map(|r| format!("{}\n", r.describe(origin)))
            .collect();
        std::fs::write(&path, lines).expect("write the history file");
        eprintln!("history written to {path}");
    }

    let store = if rig.database_url.starts_with("mysql:") {
        Store::read_mysql(&rig.database_url).await
    } else {
        Store::read_sqlite(&rig.database_url).await
    }
    .expect("read the database after the run");
    let kills: Vec<(usize, i64)> = reports
        .iter()
        .filter_map(|r| r.killed.map(|instance| (instance, r.start)))
        .collect();
    let mut checks = checker::check_all(&records, &store, origin, &kills);
    checks.push(audit(rig).await);
    checks.push(recovered(&reports, origin));
    checks.push(every_kind_injected(&scenario.kinds, &reports));
    print_summary(
        scenario, seed, &records, &reports, &checks, &store, origin, load_time,
    );

    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.violations.is_empty())
        .map(|c| {
            let shown: Vec<&str> = c.violations.iter().take(3).map(String::as_str).collect();
            format!(
                "{} ({} violations), e.g.:\n    {}",
                c.name,
                c.violations.len(),
                shown.join("\n    ")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} (seed {seed}): {} check(s) failed:\n  {}",
        scenario.name,
        failed.len(),
        failed.join("\n  ")
    );
}

async fn audit(rig: &Rig) -> Check {
    let finished = run_spray(
        rig.dir.path(),
        "audit",
        &["audit", "--database-url", &rig.database_url],
        &[],
        COMMAND_LIMIT,
    )
    .await;
    let violations = if finished.status.success() {
        Vec::new()
    } else {
        vec![format!(
            "spray audit exited with {}:\n{}\n{}",
            finished.status, finished.stdout, finished.stderr
        )]
    };
    Check {
        name: "spray audit is clean",
        violations,
        figures: finished.stdout.lines().last().unwrap_or_default().to_owned(),
    }
}

fn recovered(reports: &[FaultReport], origin: i64) -> Check {
    let mut violations = Vec::new();
    for report in reports {
        for (instance, recovery) in report.recovery.iter().enumerate() {
            if recovery.is_none() {
                violations.push(format!(
                    "instance {instance} did not serve a spray and a receive within {RECOVERY_LIMIT:?} after '{}' on {} ended at {:.3}s",
                    report.kind.name(),
                    report.target,
                    seconds(report.end - origin)
                ));
            }
        }
    }
    let worst = reports
        .iter()
        .flat_map(|r| r.recovery.iter().flatten())
        .max()
        .copied()
        .unwrap_or(0);
    Check {
        name: "every instance recovered on its own after each fault",
        violations,
        figures: format!(
            "{} faults, slowest recovery {:.3}s",
            reports.len(),
            seconds(worst)
        ),
    }
}

/// A run that ran out of time before some kind of fault proves nothing about it.
fn every_kind_injected(kinds: &[FaultKind], reports: &[FaultReport]) -> Check {
    let violations = kinds
        .iter()
        .filter(|kind| !reports.iter().any(|r| r.kind == **kind))
        .map(|kind| {
            format!(
                "'{}' was never injected: the run ran out of time first",
                kind.name()
            )
        })
        .collect();
    Check {
        name: "every kind of fault was injected",
        violations,
        figures: String::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    scenario: &Scenario,
    seed: u64,
    records: &[Record],
    reports: &[FaultReport],
    checks: &[Check],
    store: &Store,
    origin: i64,
    load_time: Duration,
) {
    let mut out = String::new();
    out.push_str(&format!(
        "\n===== faults summary: {} (seed {seed}) =====\n{} requests in {:.1}s (claim lease {}s, idempotency lease {}s assumed)\n",
        scenario.name,
        records.len(),
        load_time.as_secs_f64(),
        CLAIM_LEASE_MS / 1000,
        IDEMPOTENCY_LEASE_MS / 1000
    ));
    out.push_str("-- requests by outcome\n");
    for (label, count) in outcome_counts(records) {
        out.push_str(&format!("{count:>8}  {label}\n"));
    }
    out.push_str("-- faults (times in s since the start; recovery = fault end to first spray + receive served, per instance)\n");
    out.push_str("   start    down  fault                           target       recovery\n");
    for report in reports {
        out.push_str(&format!(
            "{:>8.3} {:>7.3}  {:<31} {:<12} {}\n",
            seconds(report.start - origin),
            seconds(report.end - report.start),
            report.kind.name(),
            report.target,
            recovery_text(&report.recovery)
        ));
    }
    out.push_str(&format!(
        "-- database: {} idempotency rows still pending\n",
        store.pending_keys
    ));
    out.push_str("-- checks\n");
    for check in checks {
        let verdict = if check.violations.is_empty() {
            "ok".to_owned()
        } else {
            format!("FAILED ({} violations)", check.violations.len())
        };
        out.push_str(&format!("[{verdict}] {}\n", check.name));
        if !check.figures.is_empty() {
            out.push_str(&format!("        {}\n", check.figures));
        }
        for violation in check.violations.iter().take(SHOWN) {
            out.push_str(&format!("      - {violation}\n"));
        }
        if check.violations.len() > SHOWN {
            out.push_str(&format!(
                "      - ... and {} more\n",
                check.violations.len() - SHOWN
            ));
        }
    }
    eprintln!("{out}");
}
