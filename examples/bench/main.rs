//! The whole benchmark (issue 10): every workload on every store, beside the machine's
//! limits measured in the same run, written into BENCHMARKS.md with SVG figures.
//!
//! Run it with `bench/run.sh [--quick] [--soak]`, which builds the release binary first.
//! Loopback only; every run is bounded in time. Each store is one real `spray serve`
//! (release) on a fresh database; the mixed workload runs three on MySQL + Redis.

mod figures;
mod http;
mod limits;
mod load;
mod report;
mod workloads;

#[path = "../common/server.rs"]
mod server;

/// The same allocator as the server (`src/main.rs`): the load generator shares the
/// machine's two cores with what it measures, so its own cost is part of every figure.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;

use load::{Load, Measured, Pace, Workload};
use workloads::{Create, Healthz, Ids, Lookup, Mixed, Race};

pub const MYSQL_ADMIN: &str = "mysql://root@127.0.0.1:3306/test";
pub const REDIS: &str = "redis://127.0.0.1:6379";
/// Connections of every run but the connection sweep, as in the measurements.
pub const CONNECTIONS: usize = 128;
/// The connection counts of the sweep.
pub const SWEEP: [usize; 3] = [16, 64, 256];

/// How long and how much each part runs.
pub struct Mode {
    pub name: &'static str,
    pub rounds: usize,
    /// Each time-bound workload (healthz, create, lookup) per round.
    pub duration: Duration,
    pub hot_users: u64,
    pub winners_shares: u64,
    /// The window of the first and last shares whose rate shows whether winners are flat.
    pub winners_window: u64,
    /// A winners round stops sending at this time even if shares are left.
    pub winners_cap: Duration,
    pub half_duration: Duration,
    /// The paced hot-spray and winners runs stop sending at this time.
    pub half_cap: Duration,
    pub half_winners_shares: u64,
    pub sweep_duration: Duration,
    pub mixed_duration: Duration,
    pub sqlite_duration: Duration,
    pub slap_queries: u64,
    pub redis_calls: u64,
    pub soak: Option<Duration>,
}

impl Mode {
    fn quick() -> Self {
        Mode {
            name: "quick",
            rounds: 1,
            duration: Duration::from_millis(1_500),
            hot_users: 3_000,
            winners_shares: 5_000,
            winners_window: 1_000,
            winners_cap: Duration::from_secs(20),
            half_duration: Duration::from_millis(1_500),
            half_cap: Duration::from_secs(10),
            half_winners_shares: 1_000,
            sweep_duration: Duration::from_secs(1),
            mixed_duration: Duration::from_secs(3),
            sqlite_duration: Duration::from_secs(2),
            slap_queries: 10_000,
            redis_calls: 50_000,
            soak: None,
        }
    }

    fn full() -> Self {
        Mode {
            name: "full",
            rounds: 3,
            duration: Duration::from_secs(5),
            hot_users: 20_000,
            winners_shares: 50_000,
            winners_window: 10_000,
            winners_cap: Duration::from_secs(60),
            half_duration: Duration::from_secs(5),
            half_cap: Duration::from_secs(30),
            half_winners_shares: 5_000,
            sweep_duration: Duration::from_secs(3),
            mixed_duration: Duration::from_secs(10),
            sqlite_duration: Duration::from_secs(5),
            slap_queries: 30_000,
            redis_calls: 200_000,
            soak: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Healthz,
    Create,
    Lookup,
    Hot,
    Winners,
    Mixed,
}

impl Kind {
    pub const STORE_WORKLOADS: [Kind; 5] = [
        Kind::Healthz,
        Kind::Create,
        Kind::Lookup,
        Kind::Hot,
        Kind::Winners,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Healthz => "/healthz",
            Kind::Create => "create sprays",
            Kind::Lookup => "look one spray up",
            Kind::Hot => "hot spray",
            Kind::Winners => "winners",
            Kind::Mixed => "mixed (3 instances)",
        }
    }
}

/// One run of one workload on one store.
pub struct Row {
    pub store: &'static str,
    pub kind: Kind,
    /// The run's figure: answers per second (winners per second for `winners`).
    pub rate: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub errors: u64,
    pub answers: u64,
    /// Hot spray: shares recorded per second, losers answered per second.
    pub winners_per_second: Option<f64>,
    pub losers_per_second: Option<f64>,
    /// Winners: the rate over the first and over the last `winners_window` shares.
    pub first_window: Option<f64>,
    pub last_window: Option<f64>,
    /// What was checked and whether it held.
    pub check: String,
    pub exact: bool,
    /// The machine's CPU busy during the run (see `load::Measured::busy`).
    pub busy: Option<f64>,
    /// The CPU the machine and each process spent during the run.
    pub cpu: Option<load::CpuSpent>,
}

impl Row {
    fn failed(store: &'static str, kind: Kind, check: &str) -> Self {
        Row {
            store,
            kind,
            rate: 0.0,
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            errors: 1,
            answers: 0,
            winners_per_second: None,
            losers_per_second: None,
            first_window: None,
            last_window: None,
            check: check.to_owned(),
            exact: false,
            busy: None,
            cpu: None,
        }
    }

    fn new(store: &'static str, kind: Kind, measured: &Measured) -> Self {
        Row {
            store,
            kind,
            rate: measured.per_second(),
            p50: measured.ms(50.0),
            p90: measured.ms(90.0),
            p99: measured.ms(99.0),
            p999: measured.ms(99.9),
            errors: measured.errors,
            answers: measured.answers(),
            winners_per_second: None,
            losers_per_second: None,
            first_window: None,
            last_window: None,
            busy: measured.busy,
            cpu: measured.cpu,
            check: String::new(),
            exact: true,
        }
    }
}

/// Paced runs at half of the workload's median peak, one per round: the medians of their
/// rates and percentiles (a single run's p99 is a few hundred requests, and one stall of
/// the shared machine decides it), every round's p99, and the errors of all.
pub struct Half {
    pub store: &'static str,
    pub kind: Kind,
    pub offered: f64,
    pub achieved: f64,
    pub p50: f64,
    pub p99: f64,
    pub round_p99: Vec<f64>,
    pub errors: u64,
    /// The median share of the machine's CPU busy during the paced runs: half the peak's
    /// requests need not be half its CPU (smaller batches cost more each).
    pub busy: Option<f64>,
}

impl Half {
    fn of(store: &'static str, kind: Kind, offered: f64, rounds: &[Measured]) -> Half {
        let median_of = |f: fn(&Measured) -> f64| report::median(&rounds.iter().map(f).collect::<Vec<_>>());
        Half {
            store,
            kind,
            offered,
            achieved: median_of(Measured::per_second),
            p50: median_of(|m| m.ms(50.0)),
            p99: median_of(|m| m.ms(99.0)),
            round_p99: rounds.iter().map(|m| m.ms(99.0)).collect(),
            errors: rounds.iter().map(|m| m.errors).sum(),
            busy: {
                let busy: Vec<f64> = rounds.iter().filter_map(|m| m.busy).collect();
                (!busy.is_empty()).then(|| report::median(&busy))
            },
        }
    }
}

pub struct Sweep {
    pub store: &'static str,
    pub kind: Kind,
    pub connections: usize,
    pub rate: f64,
    pub p99: f64,
}

/// The machine's limits, measured at the start of one round of one store's workloads: that
/// round's figures are judged against them (see `report::targets`).
#[derive(Default)]
pub struct LimitRound {
    /// The store whose round followed (empty for `--probe limits all`).
    pub store: &'static str,
    pub sqlite: f64,
    pub mariadb: Option<f64>,
    /// The machine's CPU time per raw MariaDB update, µs over all cores.
    pub mariadb_cpu_micros: Option<f64>,
    /// The part of it MariaDB's own process was charged with.
    pub mariadb_server_cpu_micros: Option<f64>,
    pub redis: Option<f64>,
    pub notes: Vec<String>,
}

pub struct StoreEnd {
    pub store: &'static str,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub audit: String,
}

pub struct Soak {
    pub offered: f64,
    pub achieved: f64,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    /// Seconds since the start, and the RSS of each instance in MiB.
    pub samples: Vec<(f64, Vec<f64>)>,
    /// At each sample, each instance's `spray_gate_remembered_sprays` (`None` if its
    /// `/metrics` did not answer): the one memory that grows with the traffic, to its bound.
    pub remembered: Vec<Vec<Option<f64>>>,
}

pub struct Results {
    /// The commit measured (short hash, and whether the tree had other changes).
    pub commit: String,
    pub started: chrono::DateTime<chrono::Utc>,
    pub rows: Vec<Row>,
    pub half: Vec<Half>,
    pub sweep: Vec<Sweep>,
    pub limits: Vec<LimitRound>,
    pub ends: Vec<StoreEnd>,
    pub mixed_audit: String,
    pub soak: Option<Soak>,
    pub wall: Duration,
}

struct Store {
    name: &'static str,
    url: String,
    flags: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn create_database() -> String {
    let name = format!("spray_bench_{:08x}", rand::random::<u32>());
    let mut conn = sqlx::MySqlConnection::connect(MYSQL_ADMIN)
        .await
        .expect("MariaDB on 127.0.0.1:3306 (root, no password)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a database");
    name
}

async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::MySqlConnection::connect(MYSQL_ADMIN).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
            .execute(&mut conn)
            .await;
    }
}

/// The server's settings for measuring: every request let in (the admission bound of 64
/// store calls would answer 503 to a part of 128 connections, see bench/overload.sh),
/// sprays of up to 100,000 shares for the winners run, 32 MySQL connections.
fn serve_flags(extra: &[String]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--database-max-connections",
        "32",
        "--store-concurrency",
        "4096",
        "--max-concurrent-requests",
        "4096",
        "--max-recipients",
        "100000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    flags.extend_from_slice(extra);
    flags
}

async fn start(url: &str, extra: &[String]) -> (server::Server, String) {
    let flags = serve_flags(extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    server::start(url, &flags, &log_filter()).await
}

/// The servers' `RUST_LOG`: errors only, unless `SPRAY_BENCH_LOG` says otherwise (to
/// measure with the service's own default, `info`, a line for every API request). At
/// `info` sqlx's slow-statement warnings would flood the terminal at the peak too.
pub fn log_filter() -> String {
    std::env::var("SPRAY_BENCH_LOG").unwrap_or_else(|_| "error".to_owned())
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `spray audit` over a store: its verdict in a few words.
fn audit(url: &str) -> String {
    let output = std::process::Command::new(server::binary("spray"))
        .args(["audit", "--database-url", url])
        .env("RUST_LOG", "warn")
        .output();
    match output {
        Ok(out) if out.status.success() => "clean".to_owned(),
        Ok(out) => format!(
            "FAILED (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("")
        ),
        Err(e) => format!("could not run: {e}"),
    }
}

fn closed(limit: Duration) -> Load {
    Load {
        connections: CONNECTIONS,
        pace: Pace::Closed,
        limit,
    }
}

/// `rate` requests a second offered for `limit` (open loop), over as many connections.
fn paced(rate: f64, limit: Duration) -> Load {
    Load {
        connections: CONNECTIONS,
        pace: Pace::Rate(rate),
        limit,
    }
}

async fn measure(workload: Arc<dyn Workload>, load: Load) -> Measured {
    load::run(workload, load).await
}

/// One race (hot spray or winners) and its row.
async fn race(
    store: &'static str,
    kind: Kind,
    base: &str,
    ids: &Ids,
    shares: u64,
    users: u64,
    mode: &Mode,
) -> Row {
    let Some(race) = Race::prepare(base, ids, shares, users).await else {
        return Row::failed(store, kind, "the spray could not be created");
    };
    let race = Arc::new(race);
    let measured = measure(race.clone(), closed(mode.winners_cap)).await;
    let window = mode.winners_window;
    let won_at = race.won_at();
    let winners = u64::try_from(won_at.len()).unwrap_or(0);
    let mut row = Row::new(store, kind, &measured);
    let to_last = won_at.last().map_or(Duration::ZERO, |t| *t - measured.started);
    let winners_rate = load::rate(winners, to_last);
    row.winners_per_second = Some(winners_rate);
    row.losers_per_second = race.losers_per_second();
    let complete = winners == shares;
    let exact = complete && race.paid() == race.amount;
    if kind == Kind::Winners {
        row.rate = winners_rate;
        let w = usize::try_from(window).unwrap_or(usize::MAX);
        if won_at.len() >= w && w > 0 {
            row.first_window = Some(load::rate(window, won_at[w - 1] - measured.started));
            let last = won_at.len() - 1;
            row.last_window = Some(load::rate(window, won_at[last] - won_at[last - w]));
        }
        // A round cut at its time limit is still checked: every share is amount / shares
        // (even split), so what was paid must be exactly that many shares' worth.
        let each = race.amount / shares.max(1);
        row.exact = measured.errors == 0 && (exact || (!complete && race.paid() == winners * each));
        row.check = if complete {
            format!("{winners} winners, paid {} of {}", race.paid(), race.amount)
        } else {
            format!(
                "cut at {:.0} s: {winners} of {shares} shares taken, paid {}",
                measured.elapsed.as_secs_f64(),
                race.paid()
            )
        };
    } else {
        row.exact = exact;
        row.check = format!("{winners} winners, paid {} of {}", race.paid(), race.amount);
    }
    row
}

/// `kind` on the server at `base`, paced at half of `peak`, `rounds` times (see
/// [`Half`]); `None` for the mixed workload, which has its own.
async fn half_peak(
    mode: &Mode,
    store: &'static str,
    kind: Kind,
    base: &str,
    ids: &Arc<Ids>,
    peak: f64,
    rounds: usize,
) -> Option<Half> {
    let offered = peak / 2.0;
    let mut measured = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        measured.push(half_peak_once(mode, kind, base, ids, offered).await?);
    }
    Some(Half::of(store, kind, offered, &measured))
}

/// One paced run of [`half_peak`].
async fn half_peak_once(
    mode: &Mode,
    kind: Kind,
    base: &str,
    ids: &Arc<Ids>,
    offered: f64,
) -> Option<Measured> {
    let base = base.to_owned();
    Some(match kind {
        Kind::Healthz => measure(Arc::new(Healthz { base }), paced(offered, mode.half_duration)).await,
        Kind::Create => {
            let create = Create {
                base,
                ids: ids.clone(),
            };
            measure(Arc::new(create), paced(offered, mode.half_duration)).await
        }
        Kind::Lookup => {
            let lookup = Lookup::prepare(&base, ids).await.expect("a spray to look up");
            measure(Arc::new(lookup), paced(offered, mode.half_duration)).await
        }
        Kind::Hot | Kind::Winners => {
            // The hot spray is the peak's own shape (1,000 shares, the peak's crowd), so
            // that its half-peak row measures the workload its peak row does.
            let (shares, users) = if kind == Kind::Hot {
                (1_000, mode.hot_users)
            } else {
                (mode.half_winners_shares, mode.half_winners_shares)
            };
            let race = Race::prepare(&base, ids, shares, users).await.expect("a spray");
            let limit = Duration::from_secs_f64(load::count_f64(users) / offered) + Duration::from_secs(5);
            measure(Arc::new(race), paced(offered, limit.min(mode.half_cap))).await
        }
        Kind::Mixed => return None,
    })
}

async fn bench_store(mode: &Mode, store: &Store, dir: &Path, results: &mut Results) {
    let (server, base) = start(&store.url, &store.flags).await;
    let ids = Arc::new(Ids::new());
    // Warm up: connections, caches, the first migrations' pages.
    let _ = measure(
        Arc::new(Healthz { base: base.clone() }),
        closed(Duration::from_millis(500)),
    )
    .await;
    let _ = measure(
        Arc::new(Create {
            base: base.clone(),
            ids: ids.clone(),
        }),
        closed(Duration::from_millis(500)),
    )
    .await;
    let first_row = results.rows.len();
    for round in 0..mode.rounds {
        // The limits again at the start of each round, so that each round is judged against
        // limits measured just before it, not minutes away: the shared machine drifts by a
        // fifth or more within minutes. They still move between rounds a minute apart, so the
        // report shows each round's ratio. For the MySQL stores the raw updates run right
        // after the previous round's race, on the same MariaDB: it may still be busy with
        // that race's pages, which the raw rate then pays for.
        results.limits.push(bench_limits(mode, dir, store.name).await);
        eprintln!("  {} round {round}", store.name);
        let measured = measure(Arc::new(Healthz { base: base.clone() }), closed(mode.duration)).await;
        let mut row = Row::new(store.name, Kind::Healthz, &measured);
        row.exact = measured.errors == 0;
        results.rows.push(row);

        let measured = measure(
            Arc::new(Create {
                base: base.clone(),
                ids: ids.clone(),
            }),
            closed(mode.duration),
        )
        .await;
        let mut row = Row::new(store.name, Kind::Create, &measured);
        row.check = format!("{} sprays, each a 201 with a token", measured.ok);
        row.exact = measured.errors == 0;
        results.rows.push(row);

        let lookup = Lookup::prepare(&base, &ids).await.expect("a spray to look up");
        let measured = measure(Arc::new(lookup), closed(mode.duration)).await;
        let mut row = Row::new(store.name, Kind::Lookup, &measured);
        row.exact = measured.errors == 0;
        results.rows.push(row);

        let row = race(store.name, Kind::Hot, &base, &ids, 1_000, mode.hot_users, mode).await;
        results.rows.push(row);

        let row = race(
            store.name,
            Kind::Winners,
            &base,
            &ids,
            mode.winners_shares,
            mode.winners_shares,
            mode,
        )
        .await;
        results.rows.push(row);
    }

    // Half of each workload's median peak, paced.
    eprintln!("  {} at half peak", store.name);
    for kind in Kind::STORE_WORKLOADS {
        let rates: Vec<f64> = results.rows[first_row..]
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.rate)
            .collect();
        let peak = report::median(&rates);
        if peak <= 0.0 {
            continue;
        }
        let Some(half) = half_peak(mode, store.name, kind, &base, &ids, peak, mode.rounds).await else {
            continue;
        };
        results.half.push(half);
    }

    eprintln!("  {} connection sweep", store.name);
    for kind in [Kind::Create, Kind::Lookup] {
        for connections in SWEEP {
            let workload: Arc<dyn Workload> = match kind {
                Kind::Create => Arc::new(Create {
                    base: base.clone(),
                    ids: ids.clone(),
                }),
                _ => Arc::new(Lookup::prepare(&base, &ids).await.expect("a spray to look up")),
            };
            let measured = measure(
                workload,
                Load {
                    connections,
                    pace: Pace::Closed,
                    limit: mode.sweep_duration,
                },
            )
            .await;
            results.sweep.push(Sweep {
                store: store.name,
                kind,
                connections,
                rate: measured.per_second(),
                p99: measured.ms(99.0),
            });
        }
    }

    let (rss, peak) = rss_mib(server.pid());
    drop(server);
    results.ends.push(StoreEnd {
        store: store.name,
        rss_mib: rss,
        peak_rss_mib: peak,
        audit: audit(&store.url),
    });
}

/// The machine's limits, measured once, before a round of `store` (empty for the probe).
async fn bench_limits(mode: &Mode, dir: &Path, store: &'static str) -> LimitRound {
    eprintln!("  limits");
    let mut round = LimitRound {
        store,
        sqlite: limits::sqlite_commits(dir, mode.sqlite_duration).await,
        ..LimitRound::default()
    };
    match limits::mariadb_point_updates(mode.slap_queries).await {
        Ok(limit) => {
            round.mariadb = Some(limit.per_second);
            round.mariadb_cpu_micros = limit.cpu_micros;
            round.mariadb_server_cpu_micros = limit.server_cpu_micros;
        }
        Err(e) => round.notes.push(format!("MariaDB limit failed: {e}")),
    }
    match limits::redis_script_calls(REDIS, mode.redis_calls).await {
        Ok(rate) => round.redis = Some(rate),
        Err(e) => round.notes.push(format!("Redis limit failed: {e}")),
    }
    round
}

/// Three instances on one fresh MySQL database and one Redis key prefix.
async fn instances() -> (Vec<server::Server>, Vec<String>, String, String) {
    let db = create_database().await;
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let extra: Vec<String> = ["--redis-url", REDIS, "--redis-key-prefix", &prefix]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mut servers = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..3 {
        let (server, base) = start(&url, &extra).await;
        servers.push(server);
        bases.push(base);
    }
    (servers, bases, url, db)
}

fn mixed(bases: &[String], ids: &Arc<Ids>) -> Arc<Mixed> {
    // 5,000 rooms; receivers arrive over 3 s after their spray.
    Arc::new(Mixed::new(
        bases.to_vec(),
        ids.clone(),
        5_000,
        Duration::from_secs(3),
    ))
}

async fn bench_mixed(mode: &Mode, results: &mut Results) {
    eprintln!("mixed workload");
    let (servers, bases, url, db) = instances().await;
    let ids = Arc::new(Ids::new());
    let first_row = results.rows.len();
    for round in 0..mode.rounds {
        eprintln!("  mixed round {round}");
        let workload = mixed(&bases, &ids);
        let measured = measure(workload.clone(), closed(mode.mixed_duration)).await;
        let check = workload.check();
        let mut row = Row::new("MySQL + Redis", Kind::Mixed, &measured);
        row.exact = check.overpaid == 0 && check.exact == check.settled && measured.errors == 0;
        row.check = format!(
            "{} sprays; {} with every receiver answered, {} of them paid exactly in full; {} overpaid",
            check.sprays, check.settled, check.exact, check.overpaid
        );
        results.rows.push(row);
    }
    let rates: Vec<f64> = results.rows[first_row..].iter().map(|r| r.rate).collect();
    let offered = report::median(&rates) / 2.0;
    if offered > 0.0 {
        let mut measured = Vec::with_capacity(mode.rounds);
        for _ in 0..mode.rounds.max(1) {
            measured.push(measure(mixed(&bases, &ids), paced(offered, mode.mixed_duration)).await);
        }
        results
            .half
            .push(Half::of("MySQL + Redis", Kind::Mixed, offered, &measured));
    }
    drop(servers);
    results.mixed_audit = audit(&url);
    drop_database(&db).await;

    if let Some(length) = mode.soak {
        let offered = if offered > 0.0 { offered } else { 500.0 };
        let (soak, soak_audit) = soak(&ids, offered, length).await;
        results.soak = Some(soak);
        results.mixed_audit = format!("{}; after the soak: {soak_audit}", results.mixed_audit);
    }
}

/// The mixed workload on three fresh instances, paced at `offered` for `length`, with
/// each instance's RSS (and its memory of sprays) sampled every 10 s; and `spray audit`'s
/// verdict after it.
async fn soak(ids: &Arc<Ids>, offered: f64, length: Duration) -> (Soak, String) {
    eprintln!("soak: {:.0} s at {offered:.0} operations/s", length.as_secs_f64());
    let (servers, bases, url, db) = instances().await;
    let pids: Vec<u32> = servers.iter().map(server::Server::pid).collect();
    let workload = mixed(&bases, ids);
    let load = paced(offered, length);
    let started = Instant::now();
    let rss_now = || {
        let rss: Vec<f64> = pids.iter().map(|pid| rss_mib(*pid).0).collect();
        (started.elapsed().as_secs_f64(), rss)
    };
    let running = tokio::spawn(load::run(workload, load));
    let (mut samples, mut remembered) = (Vec::new(), Vec::new());
    while !running.is_finished() {
        samples.push(rss_now());
        remembered.push(remembered_sprays(&bases).await);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let measured = running.await.expect("the soak run");
    samples.push(rss_now());
    remembered.push(remembered_sprays(&bases).await);
    drop(servers);
    let soak_audit = audit(&url);
    drop_database(&db).await;
    let soak = Soak {
        offered,
        achieved: measured.per_second(),
        p50: measured.ms(50.0),
        p99: measured.ms(99.0),
        errors: measured.errors,
        samples,
        remembered,
    };
    (soak, soak_audit)
}

/// The stores and workloads `--probe` runs one server for (besides `gated mixed`,
/// `gated soak` and `limits all`).
const PROBE_STORES: [&str; 3] = ["sqlite", "mysql", "gated"];
const PROBE_WORKLOADS: [&str; 5] = ["healthz", "create", "lookup", "hot", "winners"];

/// How `--probe` is called.
fn probe_usage() -> String {
    format!(
        "usage: bench/run.sh [--quick] --probe {} {}, --probe gated mixed|soak, or --probe limits all",
        PROBE_STORES.join("|"),
        PROBE_WORKLOADS.join("|")
    )
}

/// One workload on one store, once, printed and not written to BENCHMARKS.md: for
/// profiling the server (its PID is printed, for `perf record -p`) and for trying a change
/// quickly.
async fn probe(mode: &Mode, store: &str, workload: &str) {
    // The mixed workload and the soak run three instances on MySQL + Redis, so only
    // under that store's name.
    match (store, workload) {
        ("gated", "mixed") => return probe_mixed(mode).await,
        ("gated", "soak") => return probe_soak().await,
        _ => {}
    }
    if store == "limits" {
        let dir = tempfile::tempdir_in(root().join("target")).expect("a temporary directory");
        let round = bench_limits(mode, dir.path(), "").await;
        println!(
            "limits: SQLite commits {:.0}/s, MariaDB point updates {:?}/s ({:?} µs of machine CPU each, {:?} of it MariaDB's), Redis script calls {:?}/s {:?}",
            round.sqlite,
            round.mariadb.map(f64::round),
            round.mariadb_cpu_micros.map(|m| m.round()),
            round.mariadb_server_cpu_micros.map(|m| m.round()),
            round.redis.map(f64::round),
            round.notes
        );
        return;
    }
    // Refused before a server, a database or a directory is made: `exit` would leave them
    // behind.
    if !PROBE_STORES.contains(&store) || !PROBE_WORKLOADS.contains(&workload) {
        eprintln!("unknown store or workload: {store} {workload}\n{}", probe_usage());
        std::process::exit(2);
    }
    let dir = tempfile::tempdir_in(root().join("target")).expect("a temporary directory");
    let mut database = None;
    let (name, url, flags): (&'static str, String, Vec<String>) = match store {
        "sqlite" => (
            "SQLite",
            format!("sqlite://{}", dir.path().join("bench.db").display()),
            Vec::new(),
        ),
        "mysql" | "gated" => {
            let db = create_database().await;
            let url = format!("mysql://root@127.0.0.1:3306/{db}");
            database = Some(db);
            if store == "mysql" {
                ("MySQL", url, Vec::new())
            } else {
                let prefix = format!("bench-{:08x}", rand::random::<u32>());
                let flags = ["--redis-url", REDIS, "--redis-key-prefix", &prefix];
                (
                    "MySQL + Redis",
                    url,
                    flags.iter().map(|s| (*s).to_owned()).collect(),
                )
            }
        }
        other => unreachable!("store {other} was checked above"),
    };
    let (server, base) = start(&url, &flags).await;
    eprintln!("server PID {}", server.pid());
    let ids = Arc::new(Ids::new());
    let cpu_before = load::thread_cpu_ticks(server.pid());
    let row = match workload {
        "healthz" => Row::new(
            name,
            Kind::Healthz,
            &measure(Arc::new(Healthz { base: base.clone() }), closed(mode.duration)).await,
        ),
        "create" => {
            let create = Create {
                base: base.clone(),
                ids: ids.clone(),
            };
            Row::new(
                name,
                Kind::Create,
                &measure(Arc::new(create), closed(mode.duration)).await,
            )
        }
        "lookup" => {
            let lookup = Lookup::prepare(&base, &ids).await.expect("a spray to look up");
            Row::new(
                name,
                Kind::Lookup,
                &measure(Arc::new(lookup), closed(mode.duration)).await,
            )
        }
        "hot" => race(name, Kind::Hot, &base, &ids, 1_000, mode.hot_users, mode).await,
        "winners" => {
            // `SPRAY_PROBE_ROUNDS`: more races first, on the same server, each printed:
            // does the server slow down as the sprays it has served pile up?
            let rounds: usize = std::env::var("SPRAY_PROBE_ROUNDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let shares = mode.winners_shares;
            for round in 1..rounds {
                let row = race(name, Kind::Winners, &base, &ids, shares, shares, mode).await;
                println!("round {round}: {:.0}/s", row.rate);
            }
            race(name, Kind::Winners, &base, &ids, shares, shares, mode).await
        }
        other => unreachable!("workload {other} was checked above"),
    };
    // The server's own CPU time per answer at the peak, by thread: on this shared machine
    // a steadier figure than the rate for comparing two builds (the rate moves with
    // whatever else runs; the work per request much less).
    let cpu_after = load::thread_cpu_ticks(server.pid());
    let per_answer = |ticks: u64| load::ticks_to_micros(ticks) / load::count_f64(row.answers.max(1));
    let threads: Vec<String> = cpu_after
        .iter()
        .map(|(name, after)| {
            (
                name,
                after.saturating_sub(cpu_before.get(name).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, ticks)| *ticks > 0)
        .map(|(name, ticks)| format!("{name} {:.1}", per_answer(ticks)))
        .collect();
    let before_all: u64 = cpu_before.values().sum();
    let after_all: u64 = cpu_after.values().sum();
    println!(
        "server CPU at the peak: {:.1} µs per answer ({}; {} answers)",
        per_answer(after_all.saturating_sub(before_all)),
        threads.join(", "),
        row.answers
    );
    if let Some(spent) = row.cpu {
        let [machine, spray, mariadb, redis, load_generator, rest] = spent.micros_per(row.answers);
        println!(
            "machine CPU at the peak: {machine:.1} µs per answer: spray {spray:.1}, MariaDB {mariadb:.1}, \
             Redis {redis:.1}, load generator {load_generator:.1}, rest {rest:.1}"
        );
    }
    print_server_figures(&base, &ServerFigures::new()).await;
    // Then paced at half of that peak, as the full run does (or at `SPRAY_PROBE_RATE`).
    let peak = probe_rate().map_or(row.rate, |rate| rate * 2.0);
    let half = half_peak(mode, name, row.kind, &base, &ids, peak, 1).await;
    drop(server);
    if let Some(db) = database {
        drop_database(&db).await;
    }
    if let Some(half) = half {
        println!(
            "{} on {} at half peak: offered {:.0}/s, answered {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, errors {}, CPU busy {}",
            half.kind.name(),
            half.store,
            half.offered,
            half.achieved,
            half.p50,
            half.p99,
            half.errors,
            report::percent(half.busy)
        );
    }
    println!(
        "{} on {}: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, errors {}, CPU busy {} ({:?} µs of machine CPU an answer), winners/s {:?}, losers/s {:?}, first/last window {:?}/{:?}; {}",
        row.kind.name(),
        row.store,
        row.rate,
        row.p50,
        row.p99,
        row.errors,
        report::percent(row.busy),
        row.cpu.map(|cpu| cpu.micros_per(row.answers)[0].round()),
        row.winners_per_second.map(|r| r.round()),
        row.losers_per_second.map(|r| r.round()),
        row.first_window.map(|r| r.round()),
        row.last_window.map(|r| r.round()),
        row.check
    );
}

/// What the server says of its own work during a probe, from its `/metrics`: how many
/// writes its group commits held, and the mean time of each route and store operation
/// it timed, since `before` (an earlier reading, or nothing). For profiling: where a
/// request's time goes.
async fn print_server_figures(base: &str, before: &ServerFigures) -> ServerFigures {
    let now = server_figures(base).await;
    for (series, (sum, count)) in &now {
        let (sum0, count0) = before.get(series).copied().unwrap_or_default();
        let (sum, count) = (sum - sum0, count - count0);
        if count <= 0.0 {
            continue;
        }
        let mean = sum / count;
        if series.contains("_seconds") {
            println!("server: {series}: {count:.0}, mean {:.2} ms", mean * 1000.0);
        } else {
            println!("server: {series}: {count:.0}, mean {mean:.1}");
        }
    }
    now
}

/// The server's `/metrics` page; empty if it did not answer.
async fn metrics_text(base: &str) -> String {
    match reqwest::get(format!("{base}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
    {
        Ok(answer) => answer.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Each server's `spray_gate_remembered_sprays` gauge, read from its `/metrics`.
async fn remembered_sprays(bases: &[String]) -> Vec<Option<f64>> {
    let mut gauges = Vec::with_capacity(bases.len());
    for base in bases {
        let text = metrics_text(base).await;
        gauges.push(
            text.lines()
                .find_map(|line| line.strip_prefix("spray_gate_remembered_sprays "))
                .and_then(|v| v.trim().parse::<f64>().ok()),
        );
    }
    gauges
}

/// Sums and counts of the server's histograms, by series.
type ServerFigures = std::collections::BTreeMap<String, (f64, f64)>;

async fn server_figures(base: &str) -> ServerFigures {
    let mut sums = ServerFigures::new();
    let text = metrics_text(base).await;
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(name_end) = line.find([' ', '{']) else {
            continue;
        };
        let name = &line[..name_end];
        let labels = line[name_end..].split(' ').next().unwrap_or("");
        let (metric, is_sum) = if let Some(m) = name.strip_suffix("_sum") {
            (m, true)
        } else if let Some(m) = name.strip_suffix("_count") {
            (m, false)
        } else {
            continue;
        };
        if !(metric == "spray_store_batch_writes" || metric.ends_with("_seconds")) {
            continue;
        }
        let Some(v) = value(line) else { continue };
        let entry = sums.entry(format!("{metric}{labels}")).or_default();
        if is_sum {
            entry.0 += v;
        } else {
            entry.1 += v;
        }
    }
    sums
}

/// `SPRAY_PROBE_RATE`: a probe paces its second run at this rate instead of half the
/// peak, to compare two builds at the same offered load.
fn probe_rate() -> Option<f64> {
    std::env::var("SPRAY_PROBE_RATE")
        .ok()
        .and_then(|rate| rate.parse::<f64>().ok())
}

/// The mixed workload on three instances on MySQL + Redis (`--probe gated mixed`),
/// at its peak and then paced at half of it, printed only.
async fn probe_mixed(mode: &Mode) {
    let (servers, bases, url, db) = instances().await;
    let pids: Vec<u32> = servers.iter().map(server::Server::pid).collect();
    eprintln!("server PIDs {pids:?}");
    let ids = Arc::new(Ids::new());
    let peak = measure(mixed(&bases, &ids), closed(mode.mixed_duration)).await;
    let offered = probe_rate().unwrap_or(peak.per_second() / 2.0);
    let mut before = Vec::new();
    for base in &bases {
        before.push(server_figures(base).await);
    }
    let half = measure(mixed(&bases, &ids), paced(offered, mode.mixed_duration)).await;
    println!("server figures at half peak:");
    for (base, before) in bases.iter().zip(&before) {
        print_server_figures(base, before).await;
    }
    drop(servers);
    let audit = audit(&url);
    drop_database(&db).await;
    let paced = format!("paced at {offered:.0}/s");
    for (what, measured) in [("peak", &peak), (paced.as_str(), &half)] {
        println!(
            "mixed on MySQL + Redis, 3 instances, {what}: {:.0}/s, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, errors {}, CPU busy {}",
            measured.per_second(),
            measured.ms(50.0),
            measured.ms(90.0),
            measured.ms(99.0),
            measured.errors,
            report::percent(measured.busy)
        );
    }
    println!("spray audit: {audit}");
}

/// The soak alone, longer than the full run's if asked: the mixed workload paced at
/// `SPRAY_PROBE_RATE` (default 2,000/s) for `SPRAY_SOAK_MINUTES` (default 10), each
/// instance's RSS and memory of sprays printed once a minute. For telling a leak, which
/// keeps growing, from an allocator's swings, which do not.
async fn probe_soak() {
    let rate = probe_rate().unwrap_or(2_000.0);
    let minutes: u64 = std::env::var("SPRAY_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let ids = Arc::new(Ids::new());
    let (soak, audit) = soak(&ids, rate, Duration::from_secs(60 * minutes)).await;
    let mut next_minute = 0.0;
    for ((t, rss), remembered) in soak.samples.iter().zip(&soak.remembered) {
        if *t >= next_minute {
            let rss: Vec<String> = rss.iter().map(|r| format!("{r:.1}")).collect();
            let remembered: Vec<String> = remembered
                .iter()
                .map(|g| g.map_or("-".to_owned(), |g| format!("{g:.0}")))
                .collect();
            println!(
                "{t:5.0} s: RSS MiB {}; sprays remembered {}",
                rss.join(", "),
                remembered.join(", ")
            );
            next_minute += 60.0;
        }
    }
    println!(
        "soak: offered {:.0}/s, answered {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, errors {}; {}; spray audit: {audit}",
        soak.offered,
        soak.achieved,
        soak.p50,
        soak.p99,
        soak.errors,
        report::rss_summary(&soak)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mode = if args.iter().any(|a| a == "--quick") {
        Mode::quick()
    } else {
        Mode::full()
    };
    if args.iter().any(|a| a == "--soak") {
        // With --quick, a minute: enough to check that the soak works.
        let minutes = if args.iter().any(|a| a == "--quick") {
            1
        } else {
            10
        };
        mode.soak = Some(Duration::from_secs(60 * minutes));
    }
    if let Some(at) = args.iter().position(|a| a == "--probe") {
        let (Some(store), Some(workload)) = (args.get(at + 1), args.get(at + 2)) else {
            eprintln!("{}", probe_usage());
            std::process::exit(2);
        };
        probe(&mode, store, workload).await;
        return;
    }
    if let Some(unknown) = args.iter().find(|a| !matches!(a.as_str(), "--quick" | "--soak")) {
        eprintln!(
            "unknown argument {unknown}; usage: bench/run.sh [--quick] [--soak] [--probe STORE WORKLOAD]"
        );
        std::process::exit(2);
    }
    let wall = Instant::now();
    let dir = tempfile::tempdir_in(root().join("target")).expect("a temporary directory");
    let mut results = Results {
        commit: report::commit(),
        started: chrono::Utc::now(),
        rows: Vec::new(),
        half: Vec::new(),
        sweep: Vec::new(),
        limits: Vec::new(),
        ends: Vec::new(),
        mixed_audit: String::new(),
        soak: None,
        wall: Duration::ZERO,
    };
    let mysql_db = create_database().await;
    let gated_db = create_database().await;
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let stores = [
        Store {
            name: "SQLite",
            url: format!("sqlite://{}", dir.path().join("bench.db").display()),
            flags: Vec::new(),
        },
        Store {
            name: "MySQL",
            url: format!("mysql://root@127.0.0.1:3306/{mysql_db}"),
            flags: Vec::new(),
        },
        Store {
            name: "MySQL + Redis",
            url: format!("mysql://root@127.0.0.1:3306/{gated_db}"),
            flags: vec![
                "--redis-url".into(),
                REDIS.into(),
                "--redis-key-prefix".into(),
                prefix,
            ],
        },
    ];
    for store in &stores {
        eprintln!("{}", store.name);
        bench_store(&mode, store, dir.path(), &mut results).await;
    }
    bench_mixed(&mode, &mut results).await;
    drop_database(&mysql_db).await;
    drop_database(&gated_db).await;
    results.wall = wall.elapsed();

    let figures_dir = root().join("bench").join("figures");
    std::fs::create_dir_all(&figures_dir).expect("bench/figures");
    let figures = figures::draw(&results, &figures_dir);
    let text = report::markdown(&mode, &results, &figures);
    let path = root().join("BENCHMARKS.md");
    report::write_between_markers(&path, &text).expect("write BENCHMARKS.md");
    println!("{text}");
    eprintln!(
        "wrote {} and {} figures in {:.0} s",
        path.display(),
        figures.len(),
        results.wall.as_secs_f64()
    );
}
