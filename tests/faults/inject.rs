//! The faults, on a seeded schedule, and the recovery probe run after each one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use super::burst;
use super::history::{Call, Endpoint, History, Outcome, millis, now_ms, seconds};
use super::load::{Ids, Targets};
use super::mariadb::OwnMariaDb;
use crate::common::cluster::OwnRedis;
use crate::common::process::Server;

/// An instance that does not serve a spray and a receive within this long after a fault
/// ended has not recovered on its own.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// The room of the recovery probes, apart from the load's rooms.
pub const PROBE_ROOM: &str = "PROBE";
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 one `spray serve`, then start it again.
    KillInstance,
    /// kill -9 Redis, then start it again, empty.
    KillRedis,
    /// FLUSHALL on Redis.
    FlushRedis,
    /// kill -9 MariaDB, then start it again (InnoDB crash recovery).
    KillMariaDb,
    /// SIGSTOP MariaDB for a few seconds, then SIGCONT.
    StopMariaDb,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::KillInstance,
        FaultKind::KillRedis,
        FaultKind::FlushRedis,
        FaultKind::KillMariaDb,
        FaultKind::StopMariaDb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillInstance => "kill -9 instance, restart",
            FaultKind::KillRedis => "kill -9 Redis, restart empty",
            FaultKind::FlushRedis => "FLUSHALL Redis",
            FaultKind::KillMariaDb => "kill -9 MariaDB, restart",
            FaultKind::StopMariaDb => "SIGSTOP MariaDB, SIGCONT",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    /// The instance, for `KillInstance`.
    pub instance: usize,
    /// The pause before the fault.
    pub gap: Duration,
    /// How long the victim stays down or stopped.
    pub hold: Duration,
}

/// A seeded schedule: each kind of `kinds` in a shuffled order, `cycles` times over.
pub fn schedule(
    seed: u64,
    kinds: &[FaultKind],
    cycles: usize,
    instances: usize,
    first_gap: Duration,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Vec::new();
    for _ in 0..cycles {
        let mut order = kinds.to_vec();
        // Fisher-Yates, from the seeded generator.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for kind in order {
            let gap = if plan.is_empty() {
                first_gap
            } else {
                Duration::from_millis(rng.random_range(3_000..=6_000))
            };
            let hold = match kind {
                FaultKind::KillInstance => Duration::from_millis(rng.random_range(500..=2_000)),
                FaultKind::KillRedis => Duration::from_millis(rng.random_range(1_000..=4_000)),
                FaultKind::FlushRedis => Duration::ZERO,
                FaultKind::KillMariaDb => Duration::from_millis(rng.random_range(500..=2_000)),
                FaultKind::StopMariaDb => Duration::from_millis(rng.random_range(2_000..=5_000)),
            };
            plan.push(Fault {
                kind,
                instance: rng.random_range(0..instances),
                gap,
                hold,
            });
        }
    }
    plan
}

/// What the faults act on: the instances, their stores, and how to start an instance again.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub servers: Vec<Server>,
    pub database_url: String,
    pub flags: Vec<String>,
    pub redis: Option<OwnRedis>,
    pub mariadb: Option<OwnMariaDb>,
    pub targets: Arc<Targets>,
}

impl Rig {
    pub async fn start_instance(&self) -> Server {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        Server::start(self.dir.path(), &self.database_url, &flags, &[]).await
    }
}

#[derive(Clone, Debug)]
pub struct FaultReport {
    pub kind: FaultKind,
    pub target: String,
    /// When the fault began and when it ended (the victim back), in ms since the epoch.
    pub start: i64,
    pub end: i64,
    /// The instance killed at `start`, for `KillInstance`.
    pub killed: Option<usize>,
    /// Per instance: ms from the end of the fault to its first spray + receive served,
    /// or `None` if none within `RECOVERY_LIMIT`.
    pub recovery: Vec<Option<i64>>,
}

/// Runs `plan` while the load runs; stops applying faults once `until` has passed.
pub async fn inject(rig: &mut Rig, plan: &[Fault], until: Instant, probe: &Probe) -> Vec<FaultReport> {
    let mut reports = Vec::new();
    let mut racers = Vec::new();
    for fault in plan {
        tokio::time::sleep(fault.gap).await;
        if Instant::now() >= until {
            break;
        }
        // An instance (or MariaDB) is killed in the middle of a race for a hot spray, as
        // in the issue: many claims are cut between the gate and their commit.
        let mut race = match fault.kind {
            FaultKind::KillInstance | FaultKind::KillMariaDb => burst::start(probe, &rig.targets).await,
            _ => None,
        };
        let start = now_ms();
        let target = apply(rig, fault).await;
        let end = now_ms();
        if let Some(race) = &mut race {
            race.late_members(probe, &rig.targets);
        }
        let recovery = probe.all(&rig.targets, end).await;
        // The next fault waits for the late members (a Redis fault would free stranded
        // shares); the keyed racers' retries go on beside it.
        if let Some(mut race) = race {
            while let Some(joined) = race.late.join_next().await {
                joined.expect("a late member of the hot spray");
            }
            racers.push(race.racers);
        }
        let report = FaultReport {
            kind: fault.kind,
            target,
            start,
            end,
            killed: (fault.kind == FaultKind::KillInstance).then_some(fault.instance),
            recovery,
        };
        eprintln!(
            "fault: {} on {} for {:.3}s, recovery (ms) {:?}",
            report.kind.name(),
            report.target,
            seconds(report.end - report.start),
            report.recovery
        );
        reports.push(report);
    }
    for mut set in racers {
        while let Some(joined) = set.join_next().await {
            joined.expect("a racer of a hot spray");
        }
    }
    reports
}

/// Applies one fault and returns what it hit once the victim is back.
async fn apply(rig: &mut Rig, fault: &Fault) -> String {
    match fault.kind {
        FaultKind::KillInstance => {
            let i = fault.instance;
            rig.servers[i].kill_9().await;
            tokio::time::sleep(fault.hold).await;
            let server = rig.start_instance().await;
            rig.targets.set(i, server.base.clone());
            rig.servers[i] = server;
            format!("instance {i}")
        }
        FaultKind::KillRedis => {
            let redis = rig.redis.as_ref().expect("a Redis to kill");
            redis.stop();
            tokio::time::sleep(fault.hold).await;
            redis.restart();
            "Redis".to_owned()
        }
        FaultKind::FlushRedis => {
            let redis = rig.redis.as_ref().expect("a Redis to flush");
            let flushed = std::process::Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "flushall"])
                .output()
                .expect("run redis-cli");
            assert_eq!(
                String::from_utf8_lossy(&flushed.stdout).trim(),
                "OK",
                "FLUSHALL failed"
            );
            "Redis".to_owned()
        }
        FaultKind::KillMariaDb => {
            let db = rig.mariadb.as_mut().expect("a MariaDB to kill");
            db.kill_9();
            tokio::time::sleep(fault.hold).await;
            db.restart().await;
            "MariaDB".to_owned()
        }
        FaultKind::StopMariaDb => {
            let db = rig.mariadb.as_ref().expect("a MariaDB to stop");
            db.freeze();
            tokio::time::sleep(fault.hold).await;
            db.thaw();
            "MariaDB".to_owned()
        }
    }
}

/// The recovery probe: a small real operation (a spray of one share, then a receive of
/// it) on each instance, retried until it succeeds. Its requests go into the history like
/// any other, so the checker judges them too.
#[derive(Clone)]
pub struct Probe {
    pub client: reqwest::Client,
    pub history: Arc<History>,
    pub ids: Arc<Ids>,
}

impl Probe {
    /// Probes every instance at once; per instance the ms from `since` to success.
    pub async fn all(&self, targets: &Targets, since: i64) -> Vec<Option<i64>> {
        let probes = (0..targets.len()).map(|i| self.one(targets, i, since));
        futures_util::future::join_all(probes).await
    }

    async fn one(&self, targets: &Targets, instance: usize, since: i64) -> Option<i64> {
        let deadline = Instant::now() + RECOVERY_LIMIT;
        while Instant::now() < deadline {
            if let Some(done) = self.spray_and_receive(targets, instance).await {
                return Some(done - since);
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        None
    }

    /// The end time of the receive if both succeeded.
    async fn spray_and_receive(&self, targets: &Targets, instance: usize) -> Option<i64> {
        let base = targets.get(instance);
        let call = |endpoint, user, body| Call {
            endpoint,
            instance,
            base: &base,
            user,
            room: PROBE_ROOM,
            key: None,
            body,
            timeout: PROBE_TIMEOUT,
            drop_after: None,
        };
        let sprayer = self.ids.sprayer();
        let sprayed = super::history::send(
            &self.client,
            &self.history,
            call(
                Endpoint::Spray,
                sprayer,
                json!({"amount": 1, "recipient_count": 1}),
            ),
        )
        .await;
        if sprayed.status() != Some(201) {
            return None;
        }
        let token = sprayed.token.clone().expect("a 201 carries a token");
        let received = super::history::send(
            &self.client,
            &self.history,
            call(Endpoint::Receive, self.ids.receiver(), json!({"token": token})),
        )
        .await;
        matches!(received.outcome, Outcome::Answered { status: 200, .. }).then_some(received.end)
    }
}

/// Seconds, for the recovery table.
pub fn recovery_text(recovery: &[Option<i64>]) -> String {
    recovery
        .iter()
        .map(|r| match r {
            Some(ms) => format!("{:>7.3}", seconds(*ms)),
            None => format!(">{:>6}", millis(RECOVERY_LIMIT) / 1000),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
