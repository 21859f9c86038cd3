//! The Redis gate in front of the claim (`docs/design.md` section 2).
//!
//! A hot spray would pile every receive onto the same rows. The gate keeps, per live
//! spray, the list of free share slots and the set of receivers in Redis, and one atomic
//! script per receive answers "own spray", "window closed" and "no share left" at Redis
//! speed, or hands out a slot no other request holds. SQL then records the claim with a
//! point update of that one row.
//!
//! The gate never decides alone: Redis may lose everything at any moment, so a missing
//! key is rebuilt from SQL, an "already received" is confirmed by SQL, and any Redis
//! error sends the request down the SQL-only path. After an error the gate stays out of
//! the way for a short while ([`BACKOFF`]) and then tries Redis again by itself.
//!
//! A slot handed out is a hold with a time: confirmed once SQL recorded it, given back
//! when SQL could not, and taken over by another claim once older than the claim lease
//! when its claim died without either (see `scripts.rs`).

mod keys;
mod scripts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, Value};
use tokio::sync::Mutex;

pub use keys::GateKeys;

use crate::domain::{RoomId, Token, UserId};
use crate::store::ClaimSnapshot;

/// The most holds one `CONFIRM` call takes.
pub const CONFIRM_AT_ONCE: usize = 512;
/// The most claims one `CLAIM` call takes. Redis runs nothing else while a script runs:
/// this bounds that to well under a millisecond.
pub const CLAIM_AT_ONCE: usize = 128;
/// How long one Redis call may take before the request goes down the SQL path.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the gate stays out of the way after Redis failed.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// How long after its receive window a spray's keys are kept, so late retries are
/// answered by Redis too.
const KEEP_AFTER_WINDOW: TimeDelta = TimeDelta::minutes(10);

/// The gate's answer to a receive, in the contract's rule order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateVerdict {
    /// Redis does not know this spray (never loaded, flushed, evicted, expired).
    Missing,
    OwnSpray {
        spray_id: i64,
    },
    /// The gate handed this user `slot` before; SQL must confirm it.
    AlreadyHeld {
        spray_id: i64,
        slot: i64,
    },
    Expired {
        spray_id: i64,
    },
    /// No share is free. `for_good`: none is held either, so the answer to newcomers
    /// cannot change before the window closes ([`RedisGate::exhausted_spray`]).
    Exhausted {
        spray_id: i64,
        shares: u32,
        for_good: bool,
    },
    /// This request, and no other, now holds `slot`. `taken_over`: the slot was held by
    /// a claim older than the lease, which may yet record it; SQL decides.
    Slot {
        spray_id: i64,
        slot: i64,
        taken_over: bool,
    },
}

/// Redis could not answer; the caller takes the SQL-only path.
#[derive(Debug, thiserror::Error)]
#[error("redis gate unavailable: {0}")]
pub struct GateUnavailable(pub String);

impl From<RedisError> for GateUnavailable {
    fn from(error: RedisError) -> GateUnavailable {
        GateUnavailable(error.to_string())
    }
}

enum Target {
    Single(ConnectionManager),
    /// Connected on first use, and again after a failure.
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: redis::cluster::ClusterClient,
    connection: Mutex<Option<ClusterConnection>>,
}

pub struct RedisGate {
    target: Target,
    prefix: String,
    claim: Script,
    rebuild: Script,
    release: Script,
    forget: Script,
    confirm: Script,
    exhausted_spray: Script,
    started: Instant,
    /// Milliseconds since `started` before which Redis is not tried (the back-off).
    resume_at: AtomicU64,
}

/// `TCP_NODELAY` on every connection to Redis (redis-rs leaves Nagle's algorithm on). The
/// gate multiplexes every request's script calls over one connection, so a call is
/// written while others are still unanswered, and Nagle held such small writes back until
/// the earlier ones were acknowledged.
fn no_delay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

impl RedisGate {
    /// A gate for `url`: one `redis://` URL, or several separated by commas for a Redis
    /// Cluster (the seed nodes). Does not connect yet: the service starts and serves
    /// even when Redis is unreachable.
    pub fn new(url: &str, prefix: &str) -> Result<RedisGate, GateUnavailable> {
        RedisGate::with_ca(url, prefix, None)
    }

    /// Like [`RedisGate::new`]; for `rediss://`, `ca_pem` (a PEM certificate) is the
    /// authority the servers' certificates must chain to, instead of the system's roots.
    pub fn with_ca(url: &str, prefix: &str, ca_pem: Option<Vec<u8>>) -> Result<RedisGate, GateUnavailable> {
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let certificates = |root_cert| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        };
        let target = if urls.len() > 1 {
            let mut builder = redis::cluster::ClusterClient::builder(urls)
                .tcp_settings(no_delay())
                .connection_timeout(CALL_TIMEOUT)
                .response_timeout(CALL_TIMEOUT)
                .retries(1);
            if let Some(ca) = ca_pem {
                builder = builder.certs(certificates(ca));
            }
            let client = builder.build()?;
            Target::Cluster(Box::new(Cluster {
                client,
                connection: Mutex::new(None),
            }))
        } else {
            use redis::IntoConnectionInfo;
            let info = url.into_connection_info()?.set_tcp_settings(no_delay());
            let client = match ca_pem {
                Some(ca) => redis::Client::build_with_tls(info, certificates(ca))?,
                None => redis::Client::open(info)?,
            };
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(1);
            Target::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
        Ok(RedisGate {
            target,
            prefix: prefix.to_owned(),
            claim: Script::new(scripts::CLAIM),
            rebuild: Script::new(scripts::REBUILD),
            release: Script::new(scripts::RELEASE),
            forget: Script::new(scripts::FORGET),
            confirm: Script::new(scripts::CONFIRM),
            exhausted_spray: Script::new(scripts::EXHAUSTED_SPRAY),
            started: Instant::now(),
            resume_at: AtomicU64::new(0),
        })
    }

    pub fn keys(&self, room: &RoomId, token: &Token) -> GateKeys {
        GateKeys::new(&self.prefix, room, token)
    }

    /// Runs one script on the spray's keys: bounded in time, skipped during the back-off,
    /// and starting the back-off when Redis fails.
    async fn run(
        &self,
        script: &Script,
        keys: &GateKeys,
        args: Vec<String>,
    ) -> Result<Value, GateUnavailable> {
        if self.elapsed_ms() < self.resume_at.load(Ordering::Relaxed) {
            return Err(GateUnavailable("backing off after a Redis failure".into()));
        }
        let mut invocation = script.prepare_invoke();
        for key in keys.all() {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let answer = tokio::time::timeout(CALL_TIMEOUT * 2, async {
            match &self.target {
                Target::Single(manager) => invocation.invoke_async::<Value>(&mut manager.clone()).await,
                Target::Cluster(cluster) => {
                    let mut connection = self
                        .cluster_connection(&cluster.client, &cluster.connection)
                        .await?;
                    invocation.invoke_async::<Value>(&mut connection).await
                }
            }
        })
        .await;
        let failure = match answer {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => {
                if let Target::Cluster(cluster) = &self.target {
                    // Reconnect next time: the topology may have changed.
                    *cluster.connection.lock().await = None;
                }
                GateUnavailable::from(error)
            }
            Err(_) => GateUnavailable("redis call timed out".into()),
        };
        let resume = self
            .elapsed_ms()
            .saturating_add(u64::try_from(BACKOFF.as_millis()).unwrap_or(u64::MAX));
        self.resume_at.store(resume, Ordering::Relaxed);
        tracing::warn!(error = %failure, "redis gate unavailable; using the SQL path");
        Err(failure)
    }

    async fn cluster_connection(
        &self,
        client: &redis::cluster::ClusterClient,
        slot: &Mutex<Option<ClusterConnection>>,
    ) -> Result<ClusterConnection, RedisError> {
        let mut guard = slot.lock().await;
        if let Some(connection) = guard.as_ref() {
            return Ok(connection.clone());
        }
        let connection = client.get_async_connection().await?;
        *guard = Some(connection.clone());
        Ok(connection)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The atomic receive step: see [`GateVerdict`]. A hold older than `lease` at `now`
    /// is taken over when no slot is free.
    pub async fn claim(
        &self,
        keys: &GateKeys,
        user: UserId,
        now: DateTime<Utc>,
        lease: TimeDelta,
    ) -> Result<GateVerdict, GateUnavailable> {
        let mut verdicts = self.claim_many(keys, &[(user, now)], lease).await?;
        verdicts
            .pop()
            .unwrap_or_else(|| Err(GateUnavailable("no claim answer".into())))
    }

    /// Several claims on one spray in one call (at most [`CLAIM_AT_ONCE`]), each decided as
    /// [`RedisGate::claim`] would decide it alone, in the order given: their verdicts in
    /// that order. A verdict that cannot be read fails its claim alone.
    pub async fn claim_many(
        &self,
        keys: &GateKeys,
        claims: &[(UserId, DateTime<Utc>)],
        lease: TimeDelta,
    ) -> Result<Vec<Result<GateVerdict, GateUnavailable>>, GateUnavailable> {
        let mut args = Vec::with_capacity(2 + 2 * claims.len());
        args.push(KEEP_AFTER_WINDOW.num_milliseconds().to_string());
        args.push(lease.num_milliseconds().to_string());
        for (user, now) in claims {
            args.push(user.to_string());
            args.push(now.timestamp_millis().to_string());
        }
        let answer = self.run(&self.claim, keys, args).await?;
        let verdicts = match answer {
            Value::Array(verdicts) if verdicts.len() == claims.len() => verdicts,
            other => return Err(GateUnavailable(format!("unexpected claim answer {other:?}"))),
        };
        Ok(verdicts
            .iter()
            .map(|verdict| {
                parse_verdict(verdict)
                    .ok_or_else(|| GateUnavailable(format!("unexpected claim answer {verdict:?}")))
            })
            .collect())
    }

    /// Loads a spray's keys from a SQL snapshot unless they exist already. `now` is the
    /// service's clock: the keys live until [`KEEP_AFTER_WINDOW`] after the window closes.
    pub async fn rebuild(
        &self,
        keys: &GateKeys,
        snapshot: &ClaimSnapshot,
        now: DateTime<Utc>,
    ) -> Result<(), GateUnavailable> {
        // Never past the lookup window: the token may name another spray after it.
        let until = (snapshot.receive_until + KEEP_AFTER_WINDOW).min(snapshot.lookup_until);
        let time_to_live = (until - now).num_milliseconds();
        if time_to_live <= 0 {
            return Ok(());
        }
        let mut args = vec![
            snapshot.spray_id.to_string(),
            snapshot.owner.to_string(),
            snapshot.receive_until.timestamp_millis().to_string(),
            snapshot.recipient_count.to_string(),
            time_to_live.to_string(),
            snapshot.free_slots.len().to_string(),
        ];
        args.extend(snapshot.free_slots.iter().map(i64::to_string));
        for (user, slot) in &snapshot.receivers {
            args.push(user.to_string());
            args.push(slot.to_string());
        }
        self.run(&self.rebuild, keys, args).await.map(drop)
    }

    /// Gives a slot back after SQL failed to record it.
    pub async fn release(&self, keys: &GateKeys, user: UserId, slot: i64) -> Result<(), GateUnavailable> {
        self.run(&self.release, keys, vec![user.to_string(), slot.to_string()])
            .await
            .map(drop)
    }

    /// Gives a slot back after SQL said the user already holds another share: the user
    /// stays listed as a receiver.
    pub async fn release_to_others(
        &self,
        keys: &GateKeys,
        user: UserId,
        slot: i64,
    ) -> Result<(), GateUnavailable> {
        self.run(
            &self.release,
            keys,
            vec![user.to_string(), slot.to_string(), "1".into()],
        )
        .await
        .map(drop)
    }

    /// Marks each user's hold of its slot as recorded in SQL, so it is never taken over:
    /// several holds of one spray in one call (at most [`CONFIRM_AT_ONCE`]; more are sent
    /// in several).
    pub async fn confirm(&self, keys: &GateKeys, holds: &[(UserId, i64)]) -> Result<(), GateUnavailable> {
        for chunk in holds.chunks(CONFIRM_AT_ONCE) {
            let args = chunk
                .iter()
                .flat_map(|(user, slot)| [user.to_string(), slot.to_string()])
                .collect();
            self.run(&self.confirm, keys, args).await?;
        }
        Ok(())
    }

    /// Forgets a slot that SQL says is taken, and lists `holder` (its holder in SQL, when
    /// known) as a receiver.
    pub async fn forget(
        &self,
        keys: &GateKeys,
        user: UserId,
        slot: i64,
        holder: Option<UserId>,
    ) -> Result<(), GateUnavailable> {
        let mut args = vec![user.to_string(), slot.to_string()];
        args.extend(holder.map(|holder| holder.to_string()));
        self.run(&self.forget, keys, args).await.map(drop)
    }

    /// The spray `spray_id` under `keys` when it is taken for good (no share free or
    /// held): what an instance needs to answer its newcomers by itself until the window
    /// closes. `None` when the keys hold another spray or a share is free or held.
    pub async fn exhausted_spray(
        &self,
        keys: &GateKeys,
        spray_id: i64,
    ) -> Result<Option<ExhaustedSpray>, GateUnavailable> {
        let answer = self
            .run(&self.exhausted_spray, keys, vec![spray_id.to_string()])
            .await?;
        if answer == Value::Nil {
            return Ok(None);
        }
        parse_exhausted_spray(&answer)
            .map(Some)
            .ok_or_else(|| GateUnavailable(format!("unexpected answer {answer:?}")))
    }

    /// Whether Redis answers a PING now (for `/readyz`).
    pub async fn ping(&self) -> bool {
        self.check().await.is_ok()
    }

    /// A PING now, and why it failed (refused, unknown host, a TLS refusal, a time-out).
    pub async fn check(&self) -> Result<(), GateUnavailable> {
        let ping = async {
            let cmd = redis::cmd("PING");
            let value = match &self.target {
                Target::Single(manager) => manager.clone().req_packed_command(&cmd).await?,
                Target::Cluster(cluster) => {
                    let mut connection = self
                        .cluster_connection(&cluster.client, &cluster.connection)
                        .await?;
                    connection.req_packed_command(&cmd).await?
                }
            };
            Ok::<_, RedisError>(value)
        };
        match tokio::time::timeout(CALL_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(GateUnavailable::from(error)),
            Err(_) => Err(GateUnavailable(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }
}

/// A spray whose every share is recorded, as the gate lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExhaustedSpray {
    pub owner: UserId,
    pub receive_until: DateTime<Utc>,
    pub shares: u32,
    /// Everyone the gate lists as a receiver: a superset of SQL's receivers (a holder
    /// whose slot was taken over keeps its entry).
    pub receivers: Vec<UserId>,
}

/// A script's answer element as text (Lua strings and integers both come back).
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A script's answer element as an integer.
fn number_of(value: &Value) -> Option<i64> {
    text_of(value)?.parse().ok()
}

fn parse_exhausted_spray(value: &Value) -> Option<ExhaustedSpray> {
    let Value::Array(parts) = value else { return None };
    let [owner, until, shares, Value::Array(receivers)] = parts.as_slice() else {
        return None;
    };
    Some(ExhaustedSpray {
        owner: UserId::from_stored(number_of(owner)?)?,
        receive_until: DateTime::from_timestamp_millis(number_of(until)?)?,
        shares: u32::try_from(number_of(shares)?).ok()?,
        receivers: receivers
            .iter()
            .map(|r| UserId::from_stored(number_of(r)?))
            .collect::<Option<Vec<_>>>()?,
    })
}

fn parse_verdict(value: &Value) -> Option<GateVerdict> {
    let Value::Array(parts) = value else { return None };
    let text = |i: usize| text_of(parts.get(i)?);
    let number = |i: usize| number_of(parts.get(i)?);
    let verdict = text(0)?;
    Some(match verdict.as_str() {
        "MISSING" => GateVerdict::Missing,
        "OWN" => GateVerdict::OwnSpray { spray_id: number(1)? },
        "ALREADY" => GateVerdict::AlreadyHeld {
            spray_id: number(1)?,
            slot: number(2)?,
        },
        "EXPIRED" => GateVerdict::Expired { spray_id: number(1)? },
        "EXHAUSTED" => GateVerdict::Exhausted {
            spray_id: number(1)?,
            shares: u32::try_from(number(2)?).ok()?,
            for_good: number(3)? == 1,
        },
        "SLOT" => GateVerdict::Slot {
            spray_id: number(1)?,
            slot: number(2)?,
            taken_over: number(3)? == 1,
        },
        _ => return None,
    })
}
