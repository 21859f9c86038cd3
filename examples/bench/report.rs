//! The report: Markdown tables from the results, written between the markers of
//! BENCHMARKS.md so that the hand-written sections around them stay.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::{CONNECTIONS, Kind, Mode, Results, Row, SWEEP};

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";
/// p99 at half of the peak must stay under this (issue 10).
const HALF_PEAK_P99_MS: f64 = 10.0;
/// RSS bound of the soak (issue 10).
const RSS_BOUND_MIB: f64 = 150.0;
/// "Flat": the last window's rate at least this share of the first window's.
pub const FLAT: f64 = 0.9;

pub const STORES: [&str; 3] = ["SQLite", "MySQL", "MySQL + Redis"];

/// The middle value (the lower of the two middles for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n => sorted[(n - 1) / 2],
    }
}

/// A winners round's rate over its last window against its first: whether the claims kept
/// their pace from the first share to the last.
fn last_over_first(row: &Row) -> Option<f64> {
    match (row.first_window, row.last_window) {
        (Some(first), Some(last)) if first > 0.0 => Some(last / first),
        _ => None,
    }
}

/// The winners round of `store` whose last-over-first ratio is the median of its rounds
/// (the lower middle for an even count). Flatness is a property of one spray's race, so
/// each round is judged against itself: the medians of the first windows and of the last
/// windows taken separately would mix rounds, and a machine that slows between rounds
/// would look like a spray that slows as its shares are taken.
fn median_flatness_round<'a>(results: &'a Results, store: &'a str) -> Option<&'a Row> {
    median_item(rows(results, store, Kind::Winners).filter_map(|r| Some((last_over_first(r)?, r))))
}

/// The item whose key is the median of the keys (as [`median`] picks it): a whole round,
/// so that figures read from it belong together.
fn median_item<T>(keyed: impl Iterator<Item = (f64, T)>) -> Option<T> {
    let mut keyed: Vec<(f64, T)> = keyed.collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let middle = keyed.len().checked_sub(1)? / 2;
    keyed.into_iter().nth(middle).map(|(_, item)| item)
}

/// The median of one field over the rounds of a workload on a store.
pub fn med(results: &Results, store: &str, kind: Kind, field: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = rows(results, store, kind).filter_map(field).collect();
    (!values.is_empty()).then(|| median(&values))
}

fn rows<'a>(results: &'a Results, store: &'a str, kind: Kind) -> impl Iterator<Item = &'a Row> + 'a {
    results
        .rows
        .iter()
        .filter(move |r| r.store == store && r.kind == kind)
}

/// The commit measured: short hash, and whether the tree had changes.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let hash = git(&["rev-parse", "--short", "HEAD"]);
    // The report and its figures are what this run writes: they do not make it dirty.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        ".",
        ":!BENCHMARKS.md",
        ":!bench/figures",
    ]);
    if dirty.is_empty() {
        format!("`{hash}`")
    } else {
        format!("`{hash}` + uncommitted changes")
    }
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = cores();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mariadb = first_line(
        "mariadb",
        &[
            "--protocol=tcp",
            "-h127.0.0.1",
            "-uroot",
            "-N",
            "-e",
            "SELECT CONCAT(VERSION(), ', innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit, ', sync_binlog=', @@sync_binlog, ', log_bin=', @@log_bin)",
        ],
    );
    let redis = first_line("redis-cli", &["-h", "127.0.0.1", "-p", "6379", "INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let redis_save = first_line(
        "redis-cli",
        &["-h", "127.0.0.1", "-p", "6379", "CONFIG", "GET", "appendonly"],
    )
    .lines()
    .nth(1)
    .unwrap_or("")
    .to_owned();
    vec![
        ("CPU", cpu),
        ("cores", cores.to_string()),
        ("memory", memory),
        ("kernel", kernel),
        ("MariaDB", mariadb),
        ("Redis", format!("{redis}, appendonly={redis_save}")),
    ]
}

fn n0(v: f64) -> String {
    // Thousands separated, as the rest of the project's figures.
    let whole = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt0(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), n0)
}

fn yes(met: bool) -> &'static str {
    if met { "**met**" } else { "not met" }
}

/// One ratio target, judged round by round: each round's figure over the limit it is held
/// against in that same round, and the median of those ratios. Medians of the figures and of
/// the limits taken apart would pair a round with limits measured minutes away, and this
/// machine drifts by a fifth or more in that time.
struct Target {
    what: String,
    /// Each round's figure and its limit, in the order of the rounds; a round without a
    /// figure or with no limit above 0 is left out (see [`paired`]).
    rounds: Vec<(f64, f64)>,
    needed: f64,
}

impl Target {
    /// Each round's ratio, in the order of the rounds.
    fn round_ratios(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|&(figure, limit)| figure / limit)
            .collect()
    }

    /// The round whose ratio is the median (the lower middle for an even count): its figure
    /// and its limit, shown beside the ratio so that the three belong together.
    fn median_round(&self) -> Option<(f64, f64)> {
        median_item(
            self.rounds
                .iter()
                .map(|&(figure, limit)| (figure / limit, (figure, limit))),
        )
    }

    /// The target's ratio: the median of the rounds' ratios.
    fn ratio(&self) -> Option<f64> {
        self.median_round().map(|(figure, limit)| figure / limit)
    }
}

/// Each round of `kind` on `store` beside the limit of the same round, `limit(r)` for the
/// r-th round; rounds without a figure, or without a limit above 0, are left out.
fn paired(
    results: &Results,
    store: &str,
    kind: Kind,
    figure: impl Fn(&Row) -> Option<f64>,
    limit: impl Fn(usize) -> Option<f64>,
) -> Vec<(f64, f64)> {
    rows(results, store, kind)
        .enumerate()
        .filter_map(|(round, row)| Some((figure(row)?, limit(round).filter(|&l| l > 0.0)?)))
        .collect()
}

fn targets(results: &Results, mode: &Mode) -> Vec<Target> {
    let rate = |row: &Row| Some(row.rate);
    // The limits measured at the start of `store`'s rounds, and its `/healthz` rounds.
    let limits =
        |store: &str, round: usize| results.limits.iter().filter(move |l| l.store == store).nth(round);
    let sqlite = |store: &'static str| move |round| limits(store, round).map(|l| l.sqlite);
    let mariadb = |store: &'static str| move |round| limits(store, round).and_then(|l| l.mariadb);
    let healthz =
        |store: &'static str| move |round| rows(results, store, Kind::Healthz).nth(round).map(|r| r.rate);
    let window = n0(crate::load::count_f64(mode.winners_window));
    let mut all = vec![
        Target {
            what: "SQLite: winners/s ≥ 3× raw SQLite durable commits/s".into(),
            rounds: paired(results, "SQLite", Kind::Winners, rate, sqlite("SQLite")),
            needed: 3.0,
        },
        Target {
            what: "SQLite: sprays/s ≥ 3× raw SQLite durable commits/s".into(),
            rounds: paired(results, "SQLite", Kind::Create, rate, sqlite("SQLite")),
            needed: 3.0,
        },
        Target {
            what: "MySQL + Redis: winners/s ≥ 1× raw MariaDB point updates/s".into(),
            rounds: paired(
                results,
                "MySQL + Redis",
                Kind::Winners,
                rate,
                mariadb("MySQL + Redis"),
            ),
            needed: 1.0,
        },
        Target {
            what: "MySQL + Redis: hot-spray losers/s ≥ 50% of its /healthz".into(),
            rounds: paired(
                results,
                "MySQL + Redis",
                Kind::Hot,
                |r| r.losers_per_second,
                healthz("MySQL + Redis"),
            ),
            needed: 0.5,
        },
        Target {
            what: "MySQL: winners/s ≥ 50% of raw MariaDB point updates/s".into(),
            rounds: paired(results, "MySQL", Kind::Winners, rate, mariadb("MySQL")),
            needed: 0.5,
        },
        Target {
            what: format!(
                "MySQL: winners flat (a round's rate over its last {window} shares against its first {window}: the median round's ≥ {:.0}%){}",
                FLAT * 100.0,
                cut_note(results, mode)
            ),
            // Each round against itself: flatness is a property of one spray's race.
            rounds: rows(results, "MySQL", Kind::Winners)
                .filter_map(|r| Some((r.last_window?, r.first_window.filter(|&f| f > 0.0)?)))
                .collect(),
            needed: FLAT,
        },
    ];
    for store in STORES {
        all.push(Target {
            what: format!("{store}: sprays/s ≥ 10% of its /healthz"),
            rounds: paired(results, store, Kind::Create, rate, healthz(store)),
            needed: 0.1,
        });
    }
    for (store, share) in [("SQLite", 0.3), ("MySQL", 0.2), ("MySQL + Redis", 0.2)] {
        all.push(Target {
            what: format!("{store}: lookups/s ≥ {:.0}% of its /healthz", share * 100.0),
            rounds: paired(results, store, Kind::Lookup, rate, healthz(store)),
            needed: share,
        });
    }
    all
}

/// The ratio targets' rows of the table against the targets.
fn ratio_rows(w: &mut String, results: &Results, mode: &Mode) {
    for t in targets(results, mode) {
        let median_round = t.median_round();
        let ratio = t.ratio();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            t.what,
            opt0(median_round.map(|(figure, _)| figure)),
            opt0(median_round.map(|(_, limit)| limit)),
            ratio.map_or_else(|| "-".into(), |r| with_rounds(r, &t.round_ratios(), 2)),
            format_args!("{:.2}", t.needed),
            ratio.map_or("not measured", |r| yes(r >= t.needed))
        );
    }
}

/// The machine's cores (0 when they cannot be read).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
}

/// The MySQL ratio targets again, in the machine's CPU per operation: when the raw update
/// and the winner are both bounded by the same cores, their rates are in the inverse ratio
/// of what each costs the machine, so this says how far a winner's cost is from the raw
/// update's, whatever the cores' speed. Beside it, who spent that CPU, from the round whose
/// machine figure is the median; the raw update's from the limits measured at the start of
/// the MySQL stores' rounds, whose winners it is held against.
fn cpu_per_operation(w: &mut String, results: &Results) {
    let cores = cores();
    let raw = median_item(
        results
            .limits
            .iter()
            .filter(|l| l.store != "SQLite")
            .filter_map(|l| {
                Some((
                    l.mariadb_cpu_micros?,
                    (l.mariadb_cpu_micros?, l.mariadb_server_cpu_micros),
                ))
            }),
    );
    let Some((raw, raw_mariadb)) = raw else {
        return;
    };
    let _ = writeln!(
        w,
        "\nThe MySQL targets in the machine's CPU: what one operation costs all {cores} cores \
         together (the machine's busy time during the run over the operations), and who was \
         charged with it (`/proc/PID/stat`), from the round whose machine figure is the median. \
         A raw update pays MariaDB and `mariadb-slap` (in *the rest*: it has exited when its \
         time would be read); a winner pays MariaDB, `spray serve`, Redis and the load \
         generator. *The rest* is kernel work charged to no process and whatever else ran. \
         Both are bounded by the same cores, so a winners/s ratio of 1× needs a winner to cost \
         the machine no more than a raw update.\n"
    );
    let cell = |micros: Option<f64>| micros.map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"));
    let _ = writeln!(
        w,
        "| operation | machine CPU µs per operation | raw update's ÷ this | spray serve | MariaDB | Redis | load generator | the rest |\n\
         |---|---|---|---|---|---|---|---|\n\
         | raw MariaDB point update | {raw:.1} | 1.00 | - | {} | - | - | {} |",
        cell(raw_mariadb),
        cell(raw_mariadb.map(|m| (raw - m).max(0.0)))
    );
    let median_round = |store: &str, kind: Kind| {
        median_item(
            rows(results, store, kind)
                .filter_map(|r| r.cpu.map(|cpu| cpu.micros_per(r.answers)))
                .map(|each| (each[0], each)),
        )
    };
    for (label, store, kind) in [
        ("winner on MySQL + Redis", "MySQL + Redis", Kind::Winners),
        ("winner on MySQL", "MySQL", Kind::Winners),
        (
            "`/healthz` answer, MySQL + Redis server",
            "MySQL + Redis",
            Kind::Healthz,
        ),
    ] {
        let Some(each) = median_round(store, kind) else {
            continue;
        };
        let [machine, spray, mariadb, redis, load_generator, rest] = each;
        let _ = writeln!(
            w,
            "| {label} | {machine:.1} | {:.2} | {spray:.1} | {mariadb:.1} | {redis:.1} | {load_generator:.1} | {rest:.1} |",
            raw / machine
        );
    }
    let winner = median_round("MySQL + Redis", Kind::Winners);
    let healthz = median_round("MySQL + Redis", Kind::Healthz);
    if let (Some(winner), Some(healthz)) = (winner, healthz) {
        winner_floor(w, raw, &winner, &healthz);
    }
}

/// How close a winner on MySQL + Redis could come to the raw update if `spray serve`'s own
/// work for a claim cost nothing: it would still pay one request and its answer between the
/// load generator and a server (a `/healthz` answer's whole figure) and what MariaDB and
/// Redis spent on its claim. Said in every run because the 1× target depends on it.
fn winner_floor(w: &mut String, raw: f64, winner: &[f64; 6], healthz: &[f64; 6]) {
    let [_, _, mariadb, redis, ..] = *winner;
    let request = healthz[0];
    let floor = request + mariadb + redis;
    let _ = writeln!(
        w,
        "\nA winner on MySQL + Redis without any work of `spray serve` beyond answering a request \
         would still cost the machine {floor:.1} µs: the request and its answer ({request:.1}, \
         the `/healthz` row), MariaDB's work for its claim ({mariadb:.1}) and Redis's \
         ({redis:.1}). Against the raw update's {raw:.1} µs that is at best {:.2}× on these \
         cores, as long as a claim's statements cost MariaDB what they do now: most of that is \
         InnoDB's work on the two rows a claim writes (its share, under the unique key of one \
         share per receiver, and its CREDIT in the ledger).",
        raw / floor
    );
}

/// When the MySQL winners rounds were cut at their time limit, how far they got: the last
/// window is then not the spray's last shares.
fn cut_note(results: &Results, mode: &Mode) -> String {
    let taken = med(results, "MySQL", Kind::Winners, |r| {
        Some(crate::load::count_f64(r.answers))
    });
    match taken {
        Some(t) if t < crate::load::count_f64(mode.winners_shares) => format!(
            " (rounds cut at {:.0} s with {} of {} shares taken: the windows are of those)",
            mode.winners_cap.as_secs_f64(),
            n0(t),
            n0(crate::load::count_f64(mode.winners_shares))
        ),
        _ => String::new(),
    }
}

/// The generated part of BENCHMARKS.md, markers included.
pub fn markdown(mode: &Mode, results: &Results, figures: &[(String, String)]) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "{BEGIN}");
    let _ = writeln!(
        w,
        "<!-- Generated by `bench/run.sh` (examples/bench/); edits between these markers are overwritten. -->\n"
    );
    let _ = writeln!(w, "## Every workload on every store\n");
    // The command as it was given, flags and all.
    let command = std::iter::once("bench/run.sh".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    if mode.name == "quick" {
        let _ = writeln!(
            w,
            "**Quick mode**: one round of shortened workloads, to check that the benchmark works. \
             Not figures to compare or to quote: run `bench/run.sh` for medians of three rounds.\n"
        );
    }
    let _ = writeln!(
        w,
        "`{command}`, run on {} at commit {}, took {:.1} minutes. {} of each workload; the limits \
         measured in the same run, at the start of every round of every store ({} times).\n",
        results.started.format("%Y-%m-%d %H:%M UTC"),
        results.commit,
        results.wall.as_secs_f64() / 60.0,
        if mode.rounds == 1 {
            "One round".to_owned()
        } else {
            format!("Medians of {} rounds", mode.rounds)
        },
        results.limits.len(),
    );

    let _ = writeln!(w, "### The machine\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, v) in machine() {
        let _ = writeln!(w, "| {k} | {v} |");
    }
    let _ = writeln!(
        w,
        "\nThe load generator, every `spray serve`, MariaDB and Redis share these cores: each \
         figure is bounded by CPU as much as by the store, and the load generator's own work is \
         part of what is measured. The machine is shared with other work (other builds, other \
         benchmarks) and noisy, the disk's durable-commit rate most of all: compare figures \
         within one run, and read a ratio to a limit together with that limit's spread over \
         the run.\n"
    );

    let _ = writeln!(w, "### The limits\n");
    let _ = writeln!(
        w,
        "| limit | median per second | each measurement, in the order measured |\n|---|---|---|"
    );
    let each = |f: &dyn Fn(&crate::LimitRound) -> Option<f64>| {
        results
            .limits
            .iter()
            .map(|l| opt0(f(l)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let med_of = |f: &dyn Fn(&crate::LimitRound) -> Option<f64>| {
        let v: Vec<f64> = results.limits.iter().filter_map(f).collect();
        if v.is_empty() { "-".into() } else { n0(median(&v)) }
    };
    let _ = writeln!(
        w,
        "| SQLite: single-row durable commits, one writer (rusqlite, WAL, `synchronous=FULL`, same disk) | {} | {} |",
        med_of(&|l| Some(l.sqlite)),
        each(&|l| Some(l.sqlite))
    );
    let _ = writeln!(
        w,
        "| MariaDB: single-row durable point updates on distinct rows (`mariadb-slap`, {} connections, autocommit, 100,000 rows) | {} | {} |",
        crate::limits::MARIADB_CLIENTS,
        med_of(&|l| l.mariadb),
        each(&|l| l.mariadb)
    );
    let _ = writeln!(
        w,
        "| Redis: `EVALSHA` of a one-`HINCRBY` script ({} in flight, one connection) | {} | {} |",
        crate::limits::REDIS_IN_FLIGHT,
        med_of(&|l| l.redis),
        each(&|l| l.redis)
    );
    for store in STORES {
        let v: Vec<String> = rows(results, store, Kind::Healthz).map(|r| n0(r.rate)).collect();
        let _ = writeln!(
            w,
            "| `/healthz` of the {store} server ({CONNECTIONS} connections) | {} | {} |",
            opt0(med(results, store, Kind::Healthz, |r| Some(r.rate))),
            v.join(", ")
        );
    }
    for note in results.limits.iter().flat_map(|l| &l.notes) {
        let _ = writeln!(w, "\n{note}");
    }

    let _ = writeln!(w, "\n### Against the targets (issue 10)\n");
    let _ = writeln!(
        w,
        "Each round is judged against the limit measured in the same round: the raw limits at \
         the round's start, `/healthz` as its first workload. *ratio* is the median of the \
         rounds' ratios, each round's in brackets; *figure* and *against* are those of the \
         round whose ratio is the median.\n"
    );
    let _ = writeln!(
        w,
        "| target | figure /s | against /s | ratio | needed | |\n|---|---|---|---|---|---|"
    );
    ratio_rows(w, results, mode);
    let half_met = results
        .half
        .iter()
        .filter(|h| h.p99 < HALF_PEAK_P99_MS && h.errors == 0)
        .count();
    let _ = writeln!(
        w,
        "| p99 < {HALF_PEAK_P99_MS} ms at half of the peak (each workload on each store, below) | {half_met} of {} | | | | {} |",
        results.half.len(),
        yes(half_met == results.half.len() && !results.half.is_empty())
    );
    if let Some(soak) = &results.soak {
        let (max, flat, warm) = rss_verdict(soak);
        let _ = writeln!(
            w,
            "| RSS < {RSS_BOUND_MIB} MiB and flat through the soak after its warm-up (each instance; warm-up {warm:.0} s, see below) | max {max:.1} MiB | | | | {} |",
            yes(max < RSS_BOUND_MIB && flat)
        );
    } else {
        let _ = writeln!(
            w,
            "| RSS < {RSS_BOUND_MIB} MiB and flat through a 10-minute mixed run | not run (`--soak`) | | | | not measured |"
        );
    }

    cpu_per_operation(w, results);

    let _ = writeln!(
        w,
        "\n### Workloads ({})\n",
        if mode.rounds == 1 {
            "one round".to_owned()
        } else {
            format!("medians of {} rounds", mode.rounds)
        }
    );
    let _ = writeln!(
        w,
        "| workload | store | per second | p50 ms | p99 ms | errors | half peak: offered /s | p99 ms there | < {HALF_PEAK_P99_MS} ms | machine's CPU busy: at peak, at half | every round correct |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for kind in [
        Kind::Healthz,
        Kind::Create,
        Kind::Lookup,
        Kind::Hot,
        Kind::Winners,
        Kind::Mixed,
    ] {
        for store in STORES {
            let all: Vec<&Row> = rows(results, store, kind).collect();
            if all.is_empty() {
                continue;
            }
            let half = results.half.iter().find(|h| h.store == store && h.kind == kind);
            let _ = writeln!(
                w,
                "| {} | {store} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {}, {} | {} |",
                kind.name(),
                opt0(med(results, store, kind, |r| Some(r.rate))),
                med(results, store, kind, |r| Some(r.p50)).unwrap_or(0.0),
                med(results, store, kind, |r| Some(r.p99)).unwrap_or(0.0),
                all.iter().map(|r| r.errors).sum::<u64>(),
                half.map_or_else(|| "-".into(), |h| n0(h.offered)),
                half.map_or_else(|| "-".into(), |h| with_rounds(h.p99, &h.round_p99, 1)),
                half.map_or("-", |h| if h.p99 < HALF_PEAK_P99_MS && h.errors == 0 {
                    "yes"
                } else {
                    "no"
                }),
                percent(med(results, store, kind, |r| r.busy)),
                percent(half.and_then(|h| h.busy)),
                if all.iter().all(|r| r.exact) {
                    "yes"
                } else {
                    "**no**"
                },
            );
        }
    }
    let _ = writeln!(
        w,
        "\nThe hot spray (1 spray of 1,000 shares, {} distinct users) and the winners run (1 spray of {} shares, as many distinct users):\n",
        n0(crate::load::count_f64(mode.hot_users)),
        n0(crate::load::count_f64(mode.winners_shares))
    );
    let window = n0(crate::load::count_f64(mode.winners_window));
    let _ = writeln!(
        w,
        "| store | hot: requests/s | hot: winners/s | hot: losers/s | winners/s | shares taken | the median round: first {window} shares /s | last {window} /s | last/first (each round's) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for store in STORES {
        let round = median_flatness_round(results, store);
        let first = round.and_then(|r| r.first_window);
        let last = round.and_then(|r| r.last_window);
        let each: Vec<String> = rows(results, store, Kind::Winners)
            .filter_map(last_over_first)
            .map(|r| format!("{r:.2}"))
            .collect();
        let _ = writeln!(
            w,
            "| {store} | {} | {} | {} | {} | {} | {} | {} | {} |",
            opt0(med(results, store, Kind::Hot, |r| Some(r.rate))),
            opt0(med(results, store, Kind::Hot, |r| r.winners_per_second)),
            opt0(med(results, store, Kind::Hot, |r| r.losers_per_second)),
            opt0(med(results, store, Kind::Winners, |r| Some(r.rate))),
            opt0(med(results, store, Kind::Winners, |r| Some(
                crate::load::count_f64(r.answers)
            ))),
            opt0(first),
            opt0(last),
            match round.and_then(last_over_first) {
                Some(ratio) => format!("{ratio:.2} ({})", each.join(", ")),
                None => "-".into(),
            }
        );
    }

    for (title, file) in figures {
        let _ = writeln!(w, "\n### {title}\n\n![{title}](bench/figures/{file})");
    }
    let _ = writeln!(
        w,
        "\n| workload | store | {} |\n|---|---|{}",
        SWEEP.map(|c| format!("{c} connections: /s, p99 ms")).join(" | "),
        "---|".repeat(SWEEP.len())
    );
    for kind in [Kind::Create, Kind::Lookup] {
        for store in STORES {
            let cells: Vec<String> = SWEEP
                .iter()
                .map(|c| {
                    results
                        .sweep
                        .iter()
                        .find(|s| s.store == store && s.kind == kind && s.connections == *c)
                        .map_or_else(|| "-".into(), |s| format!("{}, {:.1}", n0(s.rate), s.p99))
                })
                .collect();
            let _ = writeln!(w, "| {} | {store} | {} |", kind.name(), cells.join(" | "));
        }
    }

    let _ = writeln!(w, "\n### Memory and audit\n");
    let _ = writeln!(
        w,
        "| server | RSS at its end MiB | peak RSS MiB | `spray audit` after |\n|---|---|---|---|"
    );
    for end in &results.ends {
        let _ = writeln!(
            w,
            "| {} | {:.1} | {:.1} | {} |",
            end.store, end.rss_mib, end.peak_rss_mib, end.audit
        );
    }
    let _ = writeln!(
        w,
        "| mixed: 3 instances on MySQL + Redis | | | {} |",
        results.mixed_audit
    );

    if let Some(soak) = &results.soak {
        let (max, flat, warm) = rss_verdict(soak);
        let _ = writeln!(
            w,
            "\n### The soak: the mixed workload for {:.0} minutes\n",
            soak.samples.last().map_or(0.0, |s| s.0) / 60.0
        );
        let _ = writeln!(
            w,
            "Paced at {}/s (half the mixed peak): {}/s answered, p50 {:.1} ms, p99 {:.1} ms, {} errors. \
             RSS of each instance sampled every 10 s (`/proc/PID/status` VmRSS): at most {max:.1} MiB; \
             flat (each instance's last sample within 10% of its sample at {warm:.0} s, the end of \
             the warm-up: the first minute, or longer while the memory of sprays below was still \
             filling, if that leaves half the soak to judge): {}.\n",
            n0(soak.offered),
            n0(soak.achieved),
            soak.p50,
            soak.p99,
            soak.errors,
            if flat { "yes" } else { "no" }
        );
        let _ = writeln!(
            w,
            "Beside the RSS, each instance's `spray_gate_remembered_sprays`: its memory of sprays \
             taken for good, which grows with the traffic to its bound of 10,000 sprays and then \
             stays there.\n"
        );
        let _ = writeln!(
            w,
            "| s | instance 1 MiB | instance 2 MiB | instance 3 MiB | sprays remembered (1, 2, 3) |\n|---|---|---|---|---|"
        );
        for (i, (t, rss)) in soak.samples.iter().enumerate() {
            // Every minute is enough for the table; the figure has every sample.
            if i % 6 == 0 || i + 1 == soak.samples.len() {
                let cells: Vec<String> = rss.iter().map(|r| format!("{r:.1}")).collect();
                let remembered: Vec<String> = soak.remembered.get(i).map_or_else(Vec::new, |each| {
                    each.iter()
                        .map(|g| g.map_or_else(|| "-".to_owned(), n0))
                        .collect()
                });
                let _ = writeln!(
                    w,
                    "| {t:.0} | {} | {} |",
                    cells.join(" | "),
                    remembered.join(", ")
                );
            }
        }
    }

    let _ = writeln!(w, "\n### Each round\n");
    let _ = writeln!(
        w,
        "| workload | store | per second | p50 ms | p90 ms | p99 ms | p99.9 ms | answers | errors | checked |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &results.rows {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {}{} |",
            row.kind.name(),
            row.store,
            n0(row.rate),
            row.p50,
            row.p90,
            row.p99,
            row.p999,
            n0(crate::load::count_f64(row.answers)),
            row.errors,
            if row.exact { "" } else { "**not exact** " },
            if row.check.is_empty() { "-" } else { &row.check }
        );
    }
    let _ = writeln!(w, "\n### What each figure is\n");
    let _ = writeln!(
        w,
        "- Each store is one `spray serve` (release) on a fresh database: SQLite (a file on the \
           same disk as the raw SQLite limit), MySQL (MariaDB), MySQL + Redis (the gate). It runs \
           with `--store-concurrency 4096 --max-concurrent-requests 4096` (every request let in: \
           the default admission bound would refuse part of {CONNECTIONS} connections, see the \
           overload section), 32 MySQL connections and `--max-recipients 100000`, logging at \
           `RUST_LOG={}` (the service's default, `info`, writes a line for every API request, \
           which costs CPU: see the section of 2026-12-06, 09:25-11:35 UTC; `SPRAY_BENCH_LOG` \
           sets it).\n\
         - The load generator (`examples/bench/`) holds {CONNECTIONS} connection tasks, each with \
           its own keep-alive HTTP/1.1 connection to each server (hyper, driven in the task \
           itself: `examples/bench/http.rs`), opened before the clock starts (one unmeasured \
           `/healthz` each); each task sends its next request when its last is \
           answered (the peak), for {:.1} s per workload and round; latencies go to HDR histograms.\n\
         - *create sprays*: 5 shares each, every spray by a fresh sprayer in a fresh room. \
           *look one spray up*: the sprayer reads one spray of 5 shares, all received. \
           *hot spray*: *per second* is every answer (winners and losers); winners/s counts to \
           the last winner's answer; losers/s is the `409 SPRAY_EXHAUSTED` answers from the \
           first to the last of them (the refusal path alone, once the spray is taken). *winners*: *per second* is shares recorded per second (every user wins); \
           a round stops sending after {:.0} s (the row then says so). *mixed*: see below.\n\
         - *errors*: any answer that is not the 2xx asked for or the expected 409, or a transport error.\n\
         - *half peak*: the workload again, paced at half its median peak: request n is due at \
           n / rate and its latency counts from then (a late server is charged for the wait), \
           on the same {CONNECTIONS} connections; as many rounds as at the peak, their median p99 \
           first and each round's in brackets. The hot spray and winners runs there use a fresh \
           spray: the hot spray one as at the peak ({} users for its 1,000 shares), winners one \
           of {} shares.\n\
         - *machine's CPU busy*: the share of both cores' time that was not idle during the run \
           (`/proc/stat`, steal included), whoever used it: the server, MariaDB, Redis and the \
           load generator all run on this machine; medians over the rounds. Half the peak's \
           requests can take much more than half its CPU, since smaller batches cost more each: \
           a high figure at half peak means its p99 is decided by waiting for a core.\n\
         - *mixed*: three instances on one MariaDB database and one Redis; 5,000 rooms; sprays of \
           2 to 50 shares (amounts of 100 to 1,000 a share); each spray's receivers (a fifth more \
           than its shares, plus one) arrive at random over the next 3 s, and its sprayer looks \
           it up twice within 0.5-4.5 s; each connection sends what is due, else a new spray; \
           requests go to the instances in turn. *per second* is every answer: sprays, receives \
           and lookups. Checked: no spray paid more than its amount or more shares than it has, \
           and every spray whose receivers were all answered was paid exactly in full.\n\
         - *checked*: the hot spray and winners runs count winners and add up what was paid \
           (exact: every share taken once, the amount paid to the unit); `spray audit` runs over \
           every store after its runs.",
        crate::log_filter(),
        mode.duration.as_secs_f64(),
        mode.winners_cap.as_secs_f64(),
        n0(crate::load::count_f64(mode.hot_users)),
        n0(crate::load::count_f64(mode.half_winners_shares)),
    );
    let _ = writeln!(w, "\n{END}");
    out
}

/// A share (0 to 1) as a whole percentage, or "-": the report's and the probe's.
pub fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".into(), |s| format!("{:.0}%", s * 100.0))
}

/// `median`, and each round's figure in brackets when there are several, with `decimals`.
fn with_rounds(median: f64, rounds: &[f64], decimals: usize) -> String {
    if rounds.len() < 2 {
        return format!("{median:.decimals$}");
    }
    let each: Vec<String> = rounds.iter().map(|r| format!("{r:.decimals$}")).collect();
    format!("{median:.decimals$} ({})", each.join(", "))
}

/// The highest RSS of any instance, whether every instance stayed flat, and the second
/// from which flatness was judged.
///
/// Flat: every instance's last sample within 10% of its sample at the end of the warm-up.
/// The warm-up is the first minute, or longer while an instance's memory of sprays taken
/// for good (the one memory that grows with the traffic, to a bound) is still filling: it
/// ends at the first sample from which every instance's gauge stays at its highest. That
/// later start counts only if it leaves at least half the soak to judge; otherwise, or
/// when a gauge could not be read, the first minute it is. A leak grows after its memory
/// is full, so it still shows.
fn rss_verdict(soak: &crate::Soak) -> (f64, bool, f64) {
    let max = soak
        .samples
        .iter()
        .flat_map(|(_, rss)| rss.iter().copied())
        .fold(0.0, f64::max);
    let length = soak.samples.last().map_or(0.0, |(t, _)| *t);
    let minute = soak.samples.iter().position(|(t, _)| *t >= 60.0);
    let filled = memory_filled(&soak.remembered);
    let warm = match (minute, filled) {
        (Some(minute), Some(filled))
            if filled > minute && soak.samples.get(filled).is_some_and(|(t, _)| *t <= length / 2.0) =>
        {
            Some(filled)
        }
        _ => minute,
    };
    let warm = warm.and_then(|i| soak.samples.get(i));
    let flat = match (warm, soak.samples.last()) {
        (Some((_, a)), Some((_, b))) => a.iter().zip(b).all(|(a, b)| *b <= a * 1.1),
        _ => false,
    };
    (max, flat, warm.map_or(60.0, |(t, _)| *t))
}

/// The soak's verdict in a line: the highest RSS, and whether it was flat by
/// [`rss_verdict`]'s rule.
pub fn rss_summary(soak: &crate::Soak) -> String {
    let (max, flat, from) = rss_verdict(soak);
    format!(
        "RSS at most {max:.1} MiB, {} (each instance's last sample against its sample at {from:.0} s)",
        if flat { "flat" } else { "not flat" }
    )
}

/// The first sample from which every instance's memory of sprays stays at its highest
/// until the end, or `None` if a gauge is missing at any sample.
fn memory_filled(remembered: &[Vec<Option<f64>>]) -> Option<usize> {
    let instances = remembered.first()?.len();
    let mut from = 0;
    for instance in 0..instances {
        let gauges: Vec<f64> = remembered
            .iter()
            .map(|sample| sample.get(instance).copied().flatten())
            .collect::<Option<_>>()?;
        let highest = gauges.iter().copied().fold(f64::MIN, f64::max);
        let stays = gauges.iter().rposition(|g| *g < highest).map_or(0, |i| i + 1);
        from = from.max(stays);
    }
    Some(from)
}

/// Replaces the text between the markers (inserting them after the title the first time).
pub fn write_between_markers(path: &Path, generated: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            let after = &old[end + END.len()..];
            format!("{}{}{}", &old[..begin], generated.trim_end(), after)
        }
        _ => {
            // After the first line (the title), before the hand-written sections.
            let split = old.find('\n').map_or(old.len(), |i| i + 1);
            format!("{}\n{}\n{}", &old[..split], generated.trim_end(), &old[split..])
        }
    };
    std::fs::write(path, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MySQL winners rounds with the given (first window, last window) rates.
    fn winners_rounds(windows: &[(f64, f64)]) -> Results {
        let rows = windows
            .iter()
            .map(|&(first, last)| {
                let mut row = Row::failed("MySQL", Kind::Winners, "");
                row.first_window = Some(first);
                row.last_window = Some(last);
                row
            })
            .collect();
        Results {
            commit: String::new(),
            started: chrono::Utc::now(),
            rows,
            half: vec![],
            sweep: vec![],
            limits: vec![],
            ends: vec![],
            mixed_audit: String::new(),
            soak: None,
            wall: std::time::Duration::ZERO,
        }
    }

    /// The flatness target's ratio, as the report judges it.
    fn flatness(results: &Results) -> Option<f64> {
        let target = targets(results, &Mode::quick())
            .into_iter()
            .find(|t| t.what.starts_with("MySQL: winners flat"))?;
        target.ratio()
    }

    /// The ratio of the target whose description starts with `what`.
    fn ratio_of(results: &Results, what: &str) -> Option<f64> {
        targets(results, &Mode::quick())
            .into_iter()
            .find(|t| t.what.starts_with(what))?
            .ratio()
    }

    #[test]
    fn each_round_is_judged_against_the_limits_of_its_own_round() {
        // The machine slowed through the run, the limits with the figures. Round by round the
        // SQLite winners made 3×, 4× and 2× the raw commits measured at the round's start:
        // 3×. The medians taken apart (20,000 over 5,000) would say 4×.
        let mut results = winners_rounds(&[]);
        // Another store's limits, measured first: not the SQLite rounds'.
        results.limits.push(crate::LimitRound {
            store: "MySQL",
            sqlite: 1_000.0,
            ..crate::LimitRound::default()
        });
        for (winners, commits, healthz, sprays) in [
            (30_000.0, 10_000.0, 40_000.0, 8_000.0),
            (20_000.0, 5_000.0, 20_000.0, 1_000.0),
            (10_000.0, 5_000.0, 10_000.0, 1_500.0),
        ] {
            results.limits.push(crate::LimitRound {
                store: "SQLite",
                sqlite: commits,
                ..crate::LimitRound::default()
            });
            for (kind, rate) in [
                (Kind::Healthz, healthz),
                (Kind::Create, sprays),
                (Kind::Winners, winners),
            ] {
                let mut row = Row::failed("SQLite", kind, "");
                row.rate = rate;
                results.rows.push(row);
            }
        }
        let winners = ratio_of(&results, "SQLite: winners/s").unwrap();
        assert!((winners - 3.0).abs() < 1e-9, "{winners}");
        // The same for `/healthz`, measured in each round: 20%, 5% and 15%, so 15%. The
        // medians taken apart (1,500 over 20,000) would say 7.5%.
        let sprays = ratio_of(&results, "SQLite: sprays/s ≥ 10%").unwrap();
        assert!((sprays - 0.15).abs() < 1e-9, "{sprays}");
        // Shown with the round whose ratio is the median, and each round's ratio.
        let mut table = String::new();
        ratio_rows(&mut table, &results, &Mode::quick());
        assert!(
            table.contains(
                "| SQLite: winners/s ≥ 3× raw SQLite durable commits/s | 30,000 | 10,000 | 3.00 (3.00, 4.00, 2.00) | 3.00 | **met** |"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_machine_slowing_between_rounds_is_not_a_spray_slowing_within_one() {
        // Each spray kept most of its pace; the machine was slower in each round. The
        // medians of the windows taken apart (11,000 over 13,000) would say 0.85.
        let results = winners_rounds(&[(15_000.0, 14_000.0), (13_000.0, 11_000.0), (11_000.0, 10_500.0)]);
        let ratio = flatness(&results).unwrap();
        assert!((ratio - 14_000.0 / 15_000.0).abs() < 1e-9, "{ratio}");
        assert!(ratio >= FLAT);
    }

    #[test]
    fn a_spray_slowing_in_every_round_is_not_flat() {
        let results = winners_rounds(&[(12_000.0, 10_000.0), (13_000.0, 10_400.0), (11_000.0, 9_500.0)]);
        assert!(flatness(&results).unwrap() < FLAT);
        assert_eq!(flatness(&winners_rounds(&[])), None);
    }

    #[test]
    fn who_spent_the_cpu_is_read_from_the_median_round_whole() {
        // Each column's own median would mix rounds (spray 40, MariaDB 40 for the winner;
        // MariaDB 60 for the raw update): the table shows the median round's figures, which
        // add up to its machine figure.
        let mut results = winners_rounds(&[]);
        for (machine, spray, mariadb, redis, load_generator) in [
            (100, 50, 20, 10, 15),
            (120, 30, 60, 10, 15),
            (140, 40, 40, 30, 25),
        ] {
            let mut row = Row::failed("MySQL + Redis", Kind::Winners, "");
            row.answers = 10_000;
            row.cpu = Some(crate::load::CpuSpent {
                machine,
                spray,
                mariadb,
                redis,
                load_generator,
            });
            results.rows.push(row);
        }
        for (machine, server) in [(90.0, 60.0), (100.0, 40.0), (110.0, 80.0)] {
            results.limits.push(crate::LimitRound {
                mariadb_cpu_micros: Some(machine),
                mariadb_server_cpu_micros: Some(server),
                ..crate::LimitRound::default()
            });
        }
        let mut without_healthz = String::new();
        cpu_per_operation(&mut without_healthz, &results);
        assert!(
            !without_healthz.contains("would still cost"),
            "no /healthz rounds, no floor: {without_healthz}"
        );
        for (machine, spray, load_generator) in [(30, 12, 14), (40, 20, 15), (50, 25, 20)] {
            let mut row = Row::failed("MySQL + Redis", Kind::Healthz, "");
            row.answers = 10_000;
            row.cpu = Some(crate::load::CpuSpent {
                machine,
                spray,
                mariadb: 0,
                redis: 0,
                load_generator,
            });
            results.rows.push(row);
        }
        let mut table = String::new();
        cpu_per_operation(&mut table, &results);
        // 1 tick is 10,000 µs; over 10,000 winners, 1 µs each.
        assert!(
            table.contains("| raw MariaDB point update | 100.0 | 1.00 | - | 40.0 | - | - | 60.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| winner on MySQL + Redis | 120.0 | 0.83 | 30.0 | 60.0 | 10.0 | 15.0 | 5.0 |"),
            "{table}"
        );
        assert!(
            !table.contains("winner on MySQL |"),
            "no MySQL rounds, no row: {table}"
        );
        assert!(
            table.contains(
                "| `/healthz` answer, MySQL + Redis server | 40.0 | 2.50 | 20.0 | 0.0 | 0.0 | 15.0 | 5.0 |"
            ),
            "{table}"
        );
        // The median winner's MariaDB and Redis (60 + 10) and the median request (40).
        assert!(
            table.contains("would still cost the machine 110.0 µs")
                && table.contains("at best 0.91× on these cores"),
            "{table}"
        );
    }

    /// A soak of `rss` samples 10 s apart, and the gauges of memory beside them.
    fn soak(rss: &[[f64; 2]], remembered: &[[f64; 2]]) -> crate::Soak {
        crate::Soak {
            offered: 1.0,
            achieved: 1.0,
            p50: 1.0,
            p99: 1.0,
            errors: 0,
            samples: (0u32..)
                .zip(rss)
                .map(|(i, r)| (f64::from(i) * 10.0, r.to_vec()))
                .collect(),
            remembered: remembered
                .iter()
                .map(|g| g.iter().map(|v| Some(*v)).collect())
                .collect(),
        }
    }

    /// Eleven samples over 100 s (the minute is the 7th), with RSS given per sample.
    fn ramp(rss: impl Fn(u32) -> f64, gauge: impl Fn(u32) -> f64) -> crate::Soak {
        let rss: Vec<[f64; 2]> = (0..11u32).map(|i| [rss(i), 30.0]).collect();
        let gauges: Vec<[f64; 2]> = (0..11u32).map(|i| [gauge(i), 5.0]).collect();
        soak(&rss, &gauges)
    }

    #[test]
    fn a_memory_full_within_the_minute_leaves_the_minute_as_warm_up() {
        // RSS grows with the gauge until 40 s, then stays.
        let (_, flat, warm) = rss_verdict(&ramp(|i| 30.0 + f64::from(i.min(4)), |i| f64::from(i.min(4))));
        assert!(flat);
        assert_eq!(warm, 60.0);
    }

    #[test]
    fn a_memory_still_filling_at_half_the_soak_leaves_the_minute_as_warm_up() {
        // The gauge fills until 80 s, past half of the 100 s: judged from the minute, where
        // RSS was 30 + 6 and ended at 30 + 10, more than 10% up.
        let (_, flat, warm) = rss_verdict(&ramp(|i| 30.0 + f64::from(i.min(10)), |i| f64::from(i.min(8))));
        assert!(!flat);
        assert_eq!(warm, 60.0);
    }

    #[test]
    fn growth_after_the_memory_is_full_is_not_flat() {
        // A soak of 200 s: the gauge is full at 90 s, then RSS keeps growing: a leak.
        let rss: Vec<[f64; 2]> = (0..21u32).map(|i| [30.0 + f64::from(i), 30.0]).collect();
        let gauges: Vec<[f64; 2]> = (0..21u32).map(|i| [f64::from(i.min(9)), 5.0]).collect();
        let (_, flat, warm) = rss_verdict(&soak(&rss, &gauges));
        assert_eq!(warm, 90.0);
        assert!(!flat);
    }

    #[test]
    fn growth_while_the_memory_fills_is_warm_up() {
        // A soak of 200 s: RSS grows with the gauge by 3 MiB every 10 s until 90 s (48 MiB
        // at the minute, 57 from 90 s on), then stays.
        let rss: Vec<[f64; 2]> = (0..21u32)
            .map(|i| [30.0 + 3.0 * f64::from(i.min(9)), 30.0])
            .collect();
        let gauges: Vec<[f64; 2]> = (0..21u32).map(|i| [f64::from(i.min(9)), 5.0]).collect();
        let (_, flat, warm) = rss_verdict(&soak(&rss, &gauges));
        assert_eq!(warm, 90.0);
        assert!(flat);
        // With gauges that never grew, the same RSS is judged from the minute: not flat.
        let (_, flat, warm) = rss_verdict(&soak(&rss, &[[1.0, 1.0]; 21]));
        assert_eq!(warm, 60.0);
        assert!(!flat);
    }

    #[test]
    fn an_unread_gauge_leaves_the_minute() {
        let mut soak = ramp(|_| 30.0, f64::from);
        soak.remembered[3][0] = None;
        assert_eq!(memory_filled(&soak.remembered), None);
        assert_eq!(rss_verdict(&soak).2, 60.0);
    }
}
