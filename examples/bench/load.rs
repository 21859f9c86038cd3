//! The load generator: a fixed number of connection tasks, each with its own keep-alive
//! connection to each server (`http.rs`), each sending its next request when the last is
//! answered (closed loop), or each taking the next slot of a fixed schedule (a paced run
//! at a given rate). Latencies go to an HDR histogram per task, merged at the end, so a
//! request costs the generator little.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::http::{Call, Http};

/// How one request was answered, as the workload judges it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A 2xx the workload asked for.
    Ok,
    /// A refusal the workload expects (409 `SPRAY_EXHAUSTED` on a hot spray).
    Expected,
    /// Anything else: another status, a transport error, a wrong body.
    Error,
}

pub type Pending<'a> = Pin<Box<dyn Future<Output = Option<Answer>> + Send + 'a>>;

/// A workload: what the n-th request is. `None` when it has nothing left to send.
pub trait Workload: Send + Sync + 'static {
    /// The base URLs of the servers it sends to.
    fn servers(&self) -> Vec<String>;

    /// The n-th request, sent on `http`, the calling connection task's connections.
    fn request(self: Arc<Self>, http: &mut Http, n: u64) -> Pending<'_>;
}

/// How requests are paced.
#[derive(Clone, Copy)]
pub enum Pace {
    /// Each connection sends its next request when the last is answered: the peak.
    Closed,
    /// Request n is due at `start + n / rate`; its latency counts from when it was due,
    /// so a server that falls behind the schedule is charged for the wait (no coordinated
    /// omission), as an open-loop client would see it.
    Rate(f64),
}

#[derive(Clone, Copy)]
pub struct Load {
    pub connections: usize,
    pub pace: Pace,
    /// The run stops sending at this time, or earlier when the workload is exhausted.
    pub limit: Duration,
}

/// What one run measured.
pub struct Measured {
    pub ok: u64,
    pub expected: u64,
    pub errors: u64,
    pub started: Instant,
    pub elapsed: Duration,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
    /// The share of the whole machine's CPU time that was busy during the run (0 to 1),
    /// whoever used it: the server, MariaDB, Redis and this load generator share the same
    /// cores. `None` where `/proc/stat` cannot be read.
    pub busy: Option<f64>,
    /// The CPU time the machine and each process spent during the run.
    pub cpu: Option<CpuSpent>,
}

impl Measured {
    pub fn answers(&self) -> u64 {
        self.ok + self.expected + self.errors
    }

    /// Every answer per second of the run.
    pub fn per_second(&self) -> f64 {
        rate(self.answers(), self.elapsed)
    }

    /// A latency percentile (0-100) in milliseconds.
    pub fn ms(&self, percentile: f64) -> f64 {
        ms_at(&self.latency, percentile)
    }
}

pub fn ms_at(histogram: &Histogram<u64>, percentile: f64) -> f64 {
    if histogram.is_empty() {
        return 0.0;
    }
    count_f64(histogram.value_at_percentile(percentile)) / 1000.0
}

pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    count_f64(count) / seconds
}

/// Counts in a benchmark stay far below 2^53, where f64 is exact.
pub fn count_f64(count: u64) -> f64 {
    f64::from(u32::try_from(count).unwrap_or(u32::MAX))
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Runs `workload` under `load` and measures it. The connections are opened before the
/// clock starts, as a client's kept-alive connections would be: otherwise the first requests of a
/// run would carry the TCP connects of all of them at once, and in a short paced run (a
/// few thousand requests) those few hundred connects were the 99th percentile.
pub async fn run(workload: Arc<dyn Workload>, load: Load) -> Measured {
    let connections = open_connections(&workload.servers(), load.connections).await;
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_times();
    let spent_before = CpuSpent::so_far();
    let started = Instant::now();
    let deadline = started + load.limit;
    let mut tasks = JoinSet::new();
    for mut http in connections {
        let (workload, next) = (workload.clone(), next.clone());
        tasks.spawn(async move {
            let mut mine = Tally::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let due = match load.pace {
                    Pace::Closed => Instant::now(),
                    Pace::Rate(per_second) => started + Duration::from_secs_f64(count_f64(n) / per_second),
                };
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let Some(answer) = workload.clone().request(&mut http, n).await else {
                    break;
                };
                let done = Instant::now();
                mine.record(answer, done - due);
                mine.last = mine.last.max(done);
            }
            mine
        });
    }
    let mut all = Tally::new();
    while let Some(done) = tasks.join_next().await {
        all.merge(done.expect("a connection task"));
    }
    let busy = match (cpu_before, cpu_times()) {
        (Some(before), Some(after)) => before.busy_until(&after),
        _ => None,
    };
    let cpu = match (spent_before, CpuSpent::so_far()) {
        (Some(before), Some(after)) => Some(before.until(&after)),
        _ => None,
    };
    Measured {
        ok: all.ok,
        expected: all.expected,
        errors: all.errors,
        started,
        elapsed: all.last.max(started) - started,
        latency: all.latency,
        busy,
        cpu,
    }
}

/// The CPU time (user and system) each thread of process `pid` has used so far, summed
/// by thread name (the runtime's threads share one), in clock ticks, from
/// `/proc/PID/task/TID/stat`. Empty where it cannot be read.
pub fn thread_cpu_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((name, ticks)) = name_and_cpu_ticks(&stat) else {
            continue;
        };
        *by_name.entry(name.to_owned()).or_insert(0) += ticks;
    }
    by_name
}

/// A process's or thread's name and CPU time (user and system, in clock ticks) from its
/// `stat` line, `ID (name) state ...`: the name, in brackets, may hold spaces; utime and
/// stime are fields 14 and 15 of the line, so the 12th and 13th after the name.
fn name_and_cpu_ticks(stat: &str) -> Option<(&str, u64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(').map_or("?", |(_, name)| name);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = [11, 12]
        .iter()
        .map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((name, ticks))
}

/// The CPU time (user and system) process `pid` has used so far, in clock ticks, from
/// `/proc/PID/stat`; `None` where it cannot be read.
fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    name_and_cpu_ticks(&stat).map(|(_, ticks)| ticks)
}

/// The CPU time so far of every process whose command name is `name` (`/proc/PID/comm`).
fn cpu_ticks_of_processes_named(name: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == name)
        })
        .filter_map(process_cpu_ticks)
        .sum()
}

/// CPU time in clock ticks: the whole machine's busy time (all cores), and the part of it
/// each process that answers cost was charged with: every `spray` process, MariaDB, Redis
/// and this one, the load generator. Read at two moments, then [`CpuSpent::until`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSpent {
    pub machine: u64,
    pub spray: u64,
    pub mariadb: u64,
    pub redis: u64,
    pub load_generator: u64,
}

impl CpuSpent {
    /// Since boot (the machine) or each process's start; `None` where `/proc` cannot be read.
    pub fn so_far() -> Option<CpuSpent> {
        Some(CpuSpent {
            machine: cpu_times()?.busy,
            spray: cpu_ticks_of_processes_named("spray"),
            mariadb: cpu_ticks_of_processes_named("mariadbd"),
            redis: cpu_ticks_of_processes_named("redis-server"),
            load_generator: process_cpu_ticks(std::process::id())?,
        })
    }

    /// What was spent between `self` and `later`.
    pub fn until(&self, later: &CpuSpent) -> CpuSpent {
        CpuSpent {
            machine: later.machine.saturating_sub(self.machine),
            spray: later.spray.saturating_sub(self.spray),
            mariadb: later.mariadb.saturating_sub(self.mariadb),
            redis: later.redis.saturating_sub(self.redis),
            load_generator: later.load_generator.saturating_sub(self.load_generator),
        }
    }

    /// The machine's busy time none of the processes above was charged with: other work
    /// on the shared machine, and kernel work charged to no process.
    pub fn rest(&self) -> u64 {
        self.machine
            .saturating_sub(self.spray + self.mariadb + self.redis + self.load_generator)
    }

    /// Microseconds of CPU per operation, for `operations` operations: the machine, then
    /// spray, MariaDB, Redis, the load generator and the rest.
    pub fn micros_per(&self, operations: u64) -> [f64; 6] {
        let each = |ticks: u64| ticks_to_micros(ticks) / count_f64(operations.max(1));
        [
            each(self.machine),
            each(self.spray),
            each(self.mariadb),
            each(self.redis),
            each(self.load_generator),
            each(self.rest()),
        ]
    }
}

/// Clock ticks as microseconds (Linux's `USER_HZ`: 100 on x86-64 and arm64).
pub fn ticks_to_micros(ticks: u64) -> f64 {
    count_f64(ticks) * 10_000.0
}

/// The machine's CPU time so far, from the first line of `/proc/stat`, in clock ticks.
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// The busy share of the ticks between `self` and `later`.
    fn busy_until(&self, later: &CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let busy = later.busy.checked_sub(self.busy)?;
        (total > 0).then(|| count_f64(busy) / count_f64(total))
    }
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle and iowait are the
/// time no CPU was busy; guest time is already counted in user.
pub fn cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    Some(CpuTimes {
        busy: user + nice + system + irq + softirq + steal,
        total: user + nice + system + idle + iowait + irq + softirq + steal,
    })
}

/// Opens the connections of `connections` tasks, each with one unmeasured `GET /healthz`
/// to each server.
async fn open_connections(servers: &[String], connections: usize) -> Vec<Http> {
    let mut opening = JoinSet::new();
    for _ in 0..connections {
        let servers = servers.to_vec();
        opening.spawn(async move {
            let mut http = Http::new();
            for server in &servers {
                let _ = http.send(server, Call::get("/healthz".into(), Vec::new())).await;
            }
            http
        });
    }
    let mut opened = Vec::with_capacity(connections);
    while let Some(http) = opening.join_next().await {
        opened.push(http.expect("a connection task"));
    }
    opened
}

struct Tally {
    ok: u64,
    expected: u64,
    errors: u64,
    latency: Histogram<u64>,
    last: Instant,
}

impl Tally {
    fn new() -> Self {
        Tally {
            ok: 0,
            expected: 0,
            errors: 0,
            latency: histogram(),
            last: Instant::now(),
        }
    }

    fn record(&mut self, answer: Answer, latency: Duration) {
        match answer {
            Answer::Ok => self.ok += 1,
            Answer::Expected => self.expected += 1,
            Answer::Error => self.errors += 1,
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.expected += other.expected;
        self.errors += other.errors;
        self.latency
            .add(&other.latency)
            .expect("histograms of the same bounds");
        self.last = self.last.max(other.last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_user_plus_system_ticks() {
        // A name may hold spaces and brackets: the last `)` ends it. utime 700, stime 42.
        let stat = "4242 (spray (x) y) S 1 4242 4242 0 -1 4194560 2837 0 0 0 700 42 0 0 20 0 3 0";
        assert_eq!(name_and_cpu_ticks(stat), Some(("spray (x) y", 742)));
        assert_eq!(name_and_cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(name_and_cpu_ticks("no brackets"), None);
    }

    #[test]
    fn an_operations_cpu_is_the_busy_ticks_over_the_operations() {
        // Half of 2 cores busy for a second (100 ticks) over 10,000 operations: 100 µs
        // each; a whole 4 cores over 20,000 a second: 200 µs.
        let half_of_two = CpuSpent {
            machine: 100,
            spray: 60,
            load_generator: 30,
            ..CpuSpent::default()
        };
        assert_eq!(
            half_of_two.micros_per(10_000),
            [100.0, 60.0, 0.0, 0.0, 30.0, 10.0]
        );
        let all_of_four = CpuSpent {
            machine: 400,
            ..CpuSpent::default()
        };
        assert_eq!(all_of_four.micros_per(20_000)[0], 200.0);
    }
}
