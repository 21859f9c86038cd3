//! The MySQL 8 / MariaDB 10.6+ store, for several instances on one database.
//!
//! Every transaction runs at READ COMMITTED: the rules rely on constraints and on locking
//! reads, not on snapshots, and READ COMMITTED takes no gap locks, so concurrent claims on
//! one spray do not deadlock on the index ranges between rows.
//!
//! A claim locks one free share with `FOR UPDATE SKIP LOCKED`: a thousand members racing
//! for one spray each lock a different row instead of queueing on the first free one.
//!
//! Claims and settlement meet on the spray row. Every transaction that gives a share away
//! first reads the spray's `settled_at` under a shared lock (`LOCK IN SHARE MODE`, which
//! MariaDB and MySQL both accept) and refuses a settled spray; the settlement takes the
//! same row exclusively (`FOR UPDATE`). Shared locks do not block one another, so claims
//! still run side by side; but a claim that locked the row before the settlement commits
//! before the settlement can read the free shares (and its share is not refunded), and a
//! claim that comes after the settlement waits for it and then sees it settled. Locks are
//! always taken spray row first, then shares, so claims and settlements cannot deadlock.
//!
//! A spray or a claim whose `COMMIT` loses its acknowledgement is read back on a new
//! connection before anyone is answered (see `store/commit.rs`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySql, MySqlPool};

use super::ClaimSnapshot;
use super::claim_batch::{ClaimBatches, ClaimRequest};
use super::commit::{TakenShare, Written, finish, finish_confirming};
use super::convert::{amount_from, millis, stored};
use super::error::{Unique, unique_violation};
use super::idempotency::{INSERT_PENDING_SQL, IdempotencyRow, Judgement, SELECT_ROW_SQL, TAKE_OVER_SQL};
use super::lookup_batch::LookupBatches;
use super::slot_batch::{SlotBatches, SlotRequest, SlotWriter};
use super::spray_batch::{SprayBatches, SprayRequest, SprayWriter};
use super::{
    Begin, Claim, ClaimOutcome, IdempotentRequest, NewSpray, PendingKey, PoolUse, SettleOutcome, SlotClaim,
    SprayLookup, Store, StoreError, StoredAnswer,
};
use crate::domain::{Amount, ReceiveRefusal, RoomId, SprayRecord, Token, UserId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/mysql");

/// How long an instance waits for another one's migrations at start-up.
const MIGRATION_LOCK_WAIT_SECONDS: i64 = 120;
/// A transaction that loses a deadlock or a lock wait is run this many times in all.
/// Deadlocks are normal in InnoDB when many transactions insert the same unique key at
/// once (forty sprayers drawing one token); a short random pause spreads the retries.
pub(super) const ATTEMPTS: u32 = 6;
/// How long reading back a commit's outcome waits for a row lock: the transaction that
/// holds it is one whose session the server has not yet seen end. The attempt is then
/// repeated (see `store/commit.rs`), so this only bounds one attempt.
const READ_BACK_LOCK_WAIT_SECONDS: u32 = 5;

/// A pooled connection idle at least this long is pinged before it is used (see
/// `MySqlStore::connect`).
const IDLE_BEFORE_PING: Duration = Duration::from_millis(500);

/// Runs `attempt` again when it lost a deadlock or a lock wait, a bounded number of times.
macro_rules! retrying {
    ($attempt:expr) => {{
        let mut tries = 1;
        loop {
            match $attempt.await {
                Err(StoreError::Conflict(cause)) if tries < ATTEMPTS => {
                    tracing::debug!(%cause, tries, "transaction conflict, retrying");
                    let pause = rand::random_range(1..=10u64) * u64::from(tries);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    tries += 1;
                }
                Err(StoreError::Conflict(cause)) => break Err(StoreError::Unavailable(cause)),
                other => break other,
            }
        }
    }};
}

pub struct MySqlStore {
    pool: MySqlPool,
    /// The SQL-only claims, written in batches (see `store/claim_batch.rs`).
    claims: ClaimBatches,
    /// The gate's claims, recorded in batches (see `store/slot_batch.rs`).
    slots: SlotBatches,
    /// New sprays, written in batches (see `store/spray_batch.rs`).
    sprays: SprayBatches,
    /// Lookups, read many to a statement (see `store/lookup_batch.rs`).
    lookups: LookupBatches,
}

impl MySqlStore {
    /// Connects to the database named by a `mysql://` URL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<MySqlStore, StoreError> {
        let options = MySqlConnectOptions::from_str(url)?;
        // One connection first, alone: a pool retries a failed connection until its
        // acquire time-out and then reports only the time-out, while this reports why
        // (refused, unknown host, access denied, no such database, a TLS refusal).
        {
            use sqlx::{ConnectOptions, Connection};
            let first = tokio::time::timeout(Duration::from_secs(10), options.connect())
                .await
                .map_err(|_| StoreError::Unavailable("no answer within 10s".into()))?
                .map_err(|e| {
                    // rustls says only "invalid peer certificate: UnknownIssuer".
                    let text = e.to_string();
                    if text.contains("certificate") {
                        StoreError::Config(format!(
                            "the TLS handshake with {}:{} failed: {text} (ssl-ca must name the CA that signed the server's certificate)",
                            options.get_host(),
                            options.get_port()
                        ))
                    } else {
                        StoreError::from(e)
                    }
                })?;
            let _ = first.close().await;
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Fail fast when the database is gone: the caller answers 503 and retries.
            .acquire_timeout(Duration::from_secs(5))
            // sqlx pings every connection it hands out, and again every one given back.
            // The ping on the way back stays (it also flushes a rollback); the one on the
            // way out is skipped for a connection that was in use moments ago, as
            // HikariCP does: under load that ping was one more round trip per operation
            // (a lookup is one statement), for a connection the release ping had just
            // tested. A connection idle longer is pinged, and dropped if dead.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        use sqlx::Connection;
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let one_by_one = OneByOne {
            pool: pool.clone(),
            free_from: Arc::new(FreeShareHints::default()),
        };
        Ok(MySqlStore {
            slots: SlotBatches::start(one_by_one.clone()),
            sprays: SprayBatches::start(one_by_one.clone()),
            claims: ClaimBatches::start(one_by_one),
            lookups: LookupBatches::start(pool.clone()),
            pool,
        })
    }

    /// A one-by-one writer on this store's pool (with search hints of its own), for tests
    /// of a batch built by hand.
    #[cfg(test)]
    pub(super) fn one_by_one(&self) -> OneByOne {
        OneByOne {
            pool: self.pool.clone(),
            free_from: Arc::default(),
        }
    }

    /// The migrations this binary carries, to compare with those a store has applied.
    pub fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }
}

/// Whether `written` is in the database, read on a connection of its own rather than one
/// from the pool: pooled connections may be as dead as the one whose commit failed, or all
/// busy.
pub(super) async fn landed_on(pool: &MySqlPool, written: Written) -> Result<bool, StoreError> {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = pool.connect_options().connect().await?;
    let found = async {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET SESSION innodb_lock_wait_timeout = {READ_BACK_LOCK_WAIT_SECONDS}"
        )))
        .execute(&mut conn)
        .await?;
        portable::landed(&mut conn, &written).await
    }
    .await;
    let _ = conn.close().await;
    found
}

/// The gate's claims and new sprays one at a time, for a batch that one of them would fail
/// (see `store/slot_batch.rs` and `store/spray_batch.rs`), and the read-back of a batch's
/// commit.
#[derive(Clone)]
pub(super) struct OneByOne {
    pool: MySqlPool,
    /// Where the SQL-only claim starts looking for a free share, per spray.
    free_from: Arc<FreeShareHints>,
}

#[async_trait]
impl SprayWriter for OneByOne {
    fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn spray_alone(&self, request: &SprayRequest) -> Result<i64, StoreError> {
        retrying!(self.try_insert_spray(&request.spray, request.idempotency.as_ref()))
    }

    async fn landed(&self, written: Written) -> Result<bool, StoreError> {
        landed_on(&self.pool, written).await
    }
}

#[async_trait]
impl SlotWriter for OneByOne {
    fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn claim_alone(&self, request: &SlotRequest) -> Result<SlotClaim, StoreError> {
        retrying!(self.try_claim_slot(request))
    }

    async fn landed(&self, written: Written) -> Result<bool, StoreError> {
        landed_on(&self.pool, written).await
    }
}

impl OneByOne {
    /// Where the SQL-only claim starts looking for a free share, per spray.
    pub(super) fn hints(&self) -> &FreeShareHints {
        &self.free_from
    }

    /// One SQL-only claim alone, in a transaction of its own (retried on conflicts): what
    /// a claim batch does not decide by itself (see `store/claim_batch.rs`).
    pub(super) async fn claim_alone(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        retrying!(self.try_claim_share(&request.claim, request.idempotency.as_ref()))
    }

    async fn try_claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let free_from = |spray_id| self.free_from.start(spray_id);
        let outcome = portable::claim_share_in(&mut tx, claim, idempotency, &free_from).await;
        let written = |taken: &Result<TakenShare, _>| taken.as_ref().ok().map(|t| Written::share(t, claim));
        Ok(
            match finish_confirming(tx, outcome, written, |w| landed_on(&self.pool, w)).await? {
                Ok(taken) => {
                    self.free_from.taken(taken.spray_id, taken.slot);
                    ClaimOutcome::Received(taken.amount)
                }
                Err(refusal) => ClaimOutcome::Refused(refusal),
            },
        )
    }

    /// The pool (the batch traits each have a `pool` too; this one needs none in scope).
    pub(super) fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn try_insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&PendingKey>,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcome = portable::spray_in(&mut tx, spray, idempotency).await;
        finish_confirming(
            tx,
            outcome,
            |id| Some(Written::spray(*id, spray)),
            |w| landed_on(&self.pool, w),
        )
        .await
    }

    /// The gate's point update: the spray row first, under the same shared lock as every
    /// claim (see the module doc), then the one share, then the kept effect.
    async fn try_claim_slot(&self, request: &SlotRequest) -> Result<SlotClaim, StoreError> {
        let SlotRequest {
            claim,
            spray_id,
            slot,
            idempotency,
        } = request;
        let (spray_id, slot) = (*spray_id, *slot);
        let mut tx = self.pool.begin().await?;
        let outcome =
            portable::claim_given_slot_in(&mut tx, claim, spray_id, slot, idempotency.as_ref()).await;
        let written = |outcome: &SlotClaim| match *outcome {
            SlotClaim::Received(amount) => Some(Written::share(
                &TakenShare {
                    spray_id,
                    slot,
                    amount,
                },
                claim,
            )),
            _ => None,
        };
        finish_confirming(tx, outcome, written, |w| landed_on(&self.pool, w)).await
    }
}

/// Rule 5 of the SQL-only claim, in the caller's transaction: lock a free share nobody else
/// holds and take it. Its slot and amount, or the rule that refuses.
///
/// The search walks the primary key from `free_from`, the highest slot this instance has
/// seen taken: below it every share was taken or held by a claim in flight. Walking the
/// free shares' unique key instead (`receiver_id IS NULL`) cost more with every share
/// taken, since InnoDB keeps a taken share's old entry there, delete-marked, until purge
/// catches up: winners on a 50,000-share spray fell from 445/s to 145/s by the end.
///
/// SKIP LOCKED may miss shares that in-flight claims hold and may yet give back (rollback),
/// and one given back below the hint is behind the walk, so "none" is confirmed by a plain
/// count of the committed free shares before the spray is called exhausted. If some are
/// free, the walk runs again from slot 0; if that finds none either, in-flight claims hold
/// them: this transaction is a conflict and runs again shortly, when they have committed or
/// rolled back. (A waiting `FOR UPDATE` here deadlocked with those claims' index updates.)
async fn take_free_share_in(
    tx: &mut sqlx::Transaction<'static, MySql>,
    claim: &Claim,
    spray_id: i64,
    shares: u32,
    free_from: i64,
) -> Result<Result<(i64, Amount), ReceiveRefusal>, StoreError> {
    let mut free = first_free_share_in(tx, spray_id, free_from).await?;
    if free.is_none() {
        if committed_free_shares_in(tx, spray_id).await? == 0 {
            return Ok(Err(ReceiveRefusal::Exhausted { shares }));
        }
        if free_from > 0 {
            free = first_free_share_in(tx, spray_id, 0).await?;
        }
    }
    let Some((slot, amount)) = free else {
        return Err(StoreError::Conflict(
            "every free share is held by a claim in flight".into(),
        ));
    };
    let claimed = sqlx::query(
        "UPDATE shares SET receiver_id = ?, received_at = ?
         WHERE spray_id = ? AND slot = ? AND receiver_id IS NULL",
    )
    .bind(claim.user.get())
    .bind(millis(claim.now))
    .bind(spray_id)
    .bind(slot)
    .execute(&mut **tx)
    .await;
    match claimed {
        Ok(done) if done.rows_affected() == 1 => Ok(Ok((slot, amount_from(amount)?))),
        // We hold the row lock, so this cannot happen; if it does, start over.
        Ok(_) => Err(StoreError::Conflict("a locked share was taken".into())),
        // The same user won a share in a transaction that committed meanwhile.
        Err(e) if unique_violation(&e) == Some(Unique::SharesOnePerReceiver) => {
            Ok(Err(ReceiveRefusal::AlreadyReceived))
        }
        Err(e) => Err(e.into()),
    }
}

/// Up to `count` free shares of the spray from slot `from` on that no other transaction
/// holds, locked, in slot order: `(slot, amount)`. Walks the primary key (see
/// `take_free_share_in`); the SQL-only claim takes one, a claim batch as many as it needs.
pub(super) async fn free_shares_in(
    connection: &mut sqlx::MySqlConnection,
    spray_id: i64,
    from: i64,
    count: usize,
) -> Result<Vec<(i64, i64)>, StoreError> {
    Ok(sqlx::query_as::<_, (i64, i64)>(
        "SELECT slot, amount FROM shares FORCE INDEX (PRIMARY)
         WHERE spray_id = ? AND slot >= ? AND receiver_id IS NULL
         ORDER BY slot LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(spray_id)
    .bind(from)
    .bind(u64::try_from(count).unwrap_or(u64::MAX))
    .fetch_all(connection)
    .await?)
}

/// The first free share from slot `from` on that no other claim holds, locked.
async fn first_free_share_in(
    tx: &mut sqlx::Transaction<'static, MySql>,
    spray_id: i64,
    from: i64,
) -> Result<Option<(i64, i64)>, StoreError> {
    Ok(free_shares_in(tx, spray_id, from, 1).await?.into_iter().next())
}

/// How many of the spray's shares are free as committed, held or not: a plain read, which
/// SKIP LOCKED cannot give (see `take_free_share_in`).
pub(super) async fn committed_free_shares_in(
    connection: &mut sqlx::MySqlConnection,
    spray_id: i64,
) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM shares WHERE spray_id = ? AND receiver_id IS NULL",
        )
        .bind(spray_id)
        .fetch_one(connection)
        .await?,
    )
}

/// Per spray, the highest slot this instance has seen a claim take: a hint of where free
/// shares start, never trusted (see `take_free_share_in`). Bounded: past
/// [`FreeShareHints::MOST`] sprays it starts afresh, which costs a longer walk, nothing else.
#[derive(Default)]
pub(super) struct FreeShareHints(std::sync::Mutex<std::collections::HashMap<i64, i64>>);

impl FreeShareHints {
    const MOST: usize = 10_000;

    pub(super) fn start(&self, spray_id: i64) -> i64 {
        self.0
            .lock()
            .map_or(0, |hints| hints.get(&spray_id).copied().unwrap_or(0))
    }

    pub(super) fn taken(&self, spray_id: i64, slot: i64) {
        if let Ok(mut hints) = self.0.lock() {
            if hints.len() >= Self::MOST && !hints.contains_key(&spray_id) {
                hints.clear();
            }
            let hint = hints.entry(spray_id).or_insert(0);
            *hint = (*hint).max(slot);
        }
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // Instances starting together must apply each migration once. sqlx's migrator
        // takes `GET_LOCK(name, -1)`, but MariaDB answers a negative timeout with NULL at
        // once instead of waiting, so the migrators would race (seen here: a duplicate key
        // in _sqlx_migrations). Hold a lock of our own, with a real timeout, on the one
        // connection the migrator then uses.
        let mut conn = self.pool.acquire().await?;
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('spray_migrations', ?)")
            .bind(MIGRATION_LOCK_WAIT_SECONDS)
            .fetch_one(&mut *conn)
            .await?;
        if locked != Some(1) {
            return Err(StoreError::Unavailable(
                "another instance is still migrating the database".into(),
            ));
        }
        // `run_direct` is sqlx's own way around `Acquire` lifetimes on a borrowed connection.
        let migrated = MIGRATOR.run_direct(None, &mut *conn, false).await;
        sqlx::query("SELECT RELEASE_LOCK('spray_migrations')")
            .execute(&mut *conn)
            .await?;
        migrated?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&PendingKey>,
    ) -> Result<i64, StoreError> {
        let request = SprayRequest {
            spray: spray.clone(),
            idempotency: idempotency.cloned(),
        };
        self.sprays.insert(request).await
    }

    async fn claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        let request = ClaimRequest {
            claim: claim.clone(),
            idempotency: idempotency.cloned(),
        };
        self.claims.claim(request).await
    }

    async fn find_spray(&self, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
        self.lookups.find(key.clone()).await
    }

    async fn count(&self, sql: &'static str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await?)
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn pool_use(&self) -> PoolUse {
        let open = self.pool.size();
        PoolUse {
            backend: "mysql",
            open,
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(open),
        }
    }

    async fn claim_snapshot(
        &self,
        room: &RoomId,
        token: &Token,
    ) -> Result<Option<ClaimSnapshot>, StoreError> {
        portable::claim_snapshot(&self.pool, room, token).await
    }

    async fn claim_slot(
        &self,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&PendingKey>,
    ) -> Result<SlotClaim, StoreError> {
        let request = SlotRequest {
            claim: claim.clone(),
            spray_id,
            slot,
            idempotency: idempotency.cloned(),
        };
        self.slots.claim(request).await
    }

    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError> {
        portable::share_of(&self.pool, spray_id, user).await
    }

    async fn slot_holder(&self, spray_id: i64, slot: i64) -> Result<Option<UserId>, StoreError> {
        portable::slot_holder(&self.pool, spray_id, slot).await
    }

    async fn unsettled_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<Vec<i64>, StoreError> {
        portable::unsettled_sprays(&self.pool, closed_by, limit).await
    }

    async fn settle_spray(&self, spray_id: i64, now: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        retrying!(self.try_settle_spray(spray_id, now))
    }

    async fn purge_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        // Shares go with their spray (ON DELETE CASCADE); the ledger has no foreign key and
        // stays. Only settled sprays: their money is fully accounted for in the ledger.
        retrying!(async {
            let done = sqlx::query(
                "DELETE FROM sprays WHERE settled_at IS NOT NULL AND lookup_until <= ?
                 ORDER BY lookup_until, id LIMIT ?",
            )
            .bind(millis(closed_by))
            .bind(limit)
            .execute(&self.pool)
            .await?;
            Ok::<u64, StoreError>(done.rows_affected())
        })
    }

    async fn begin_idempotent(&self, request: &IdempotentRequest) -> Result<Begin, StoreError> {
        let now = millis(request.now);
        // Each step is its own autocommit statement; a step that finds the row changed by
        // another request since the last one starts over, a bounded number of times.
        for _ in 0..ATTEMPTS {
            let inserted = sqlx::query(INSERT_PENDING_SQL)
                .bind(request.user.get())
                .bind(request.endpoint.as_str())
                .bind(request.key.as_str())
                .bind(request.fingerprint.as_bytes().as_slice())
                .bind(request.lease)
                .bind(now)
                .bind(now)
                .execute(&self.pool)
                .await;
            match inserted {
                Ok(_) => return Ok(Begin::Run(request.pending())),
                Err(e) if unique_violation(&e) == Some(Unique::IdempotencyKey) => {}
                Err(e) => return Err(e.into()),
            }
            // The key is taken. The duplicate-key check waited for any transaction that
            // held the row (an effect completing it), so this read sees its outcome.
            let existing = sqlx::query_as::<_, IdempotencyRow>(SELECT_ROW_SQL)
                .bind(request.user.get())
                .bind(request.endpoint.as_str())
                .bind(request.key.as_str())
                .fetch_optional(&self.pool)
                .await?;
            let Some(row) = existing else {
                continue; // released or purged meanwhile: try inserting again
            };
            match row.judge(request)? {
                Judgement::Answer(answer) => return Ok(answer),
                Judgement::TakeOver { lease } => {
                    let taken = sqlx::query(TAKE_OVER_SQL)
                        .bind(request.lease)
                        .bind(now)
                        .bind(request.user.get())
                        .bind(request.endpoint.as_str())
                        .bind(request.key.as_str())
                        .bind(lease)
                        .execute(&self.pool)
                        .await?;
                    if taken.rows_affected() == 1 {
                        return Ok(Begin::Run(request.pending()));
                    }
                }
            }
        }
        // Other requests under this key keep changing the row: one of them is running.
        Ok(Begin::InProgress)
    }

    async fn finish_idempotent(
        &self,
        pending: &PendingKey,
        answer: &StoredAnswer,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        Ok(portable::complete_row(&self.pool, pending, answer, now).await? == 1)
    }

    async fn release_idempotent(&self, pending: &PendingKey) -> Result<(), StoreError> {
        portable::release_row(&self.pool, pending).await
    }

    async fn purge_idempotency(&self, touched_before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency WHERE touched_at < ? ORDER BY touched_at LIMIT ?")
            .bind(millis(touched_before))
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

impl MySqlStore {
    /// One settlement transaction: committed when it settled the spray, rolled back
    /// explicitly otherwise (see try_claim_share). A commit whose acknowledgement is lost
    /// is not read back: nobody is answered, and settling is a conditional update, so the
    /// next sweeper pass finds the spray settled (it landed) or settles it (it did not).
    async fn try_settle_spray(&self, spray_id: i64, now: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcome = portable::settle_in(&mut tx, spray_id, now).await;
        finish(tx, outcome, |o| {
            matches!(o, SettleOutcome::Refunded(_) | SettleOutcome::Completed)
        })
        .await
    }
}

/// A new spray's row, in the caller's transaction (its id from AUTO_INCREMENT, never
/// reused). Its id.
///
/// The row is inserted first, and only if its token is taken are the sprays past their
/// lookup window made to give it up (see the migration) before a second try: a spray
/// nearly always draws a free token, so it costs one statement instead of three. (A
/// duplicate key rolls back the failed statement only, not the transaction.)
async fn insert_spray_row_in(
    tx: &mut sqlx::Transaction<'static, MySql>,
    spray: &NewSpray,
) -> Result<i64, StoreError> {
    match insert_spray_row_once(tx, spray).await {
        Err(StoreError::TokenTaken) => {
            release_expired_token_in(tx, spray).await?;
            insert_spray_row_once(tx, spray).await
        }
        other => other,
    }
}

/// Sprays under the new spray's token whose lookup window has closed give it up. Two
/// statements, so that each uses its own unique index.
async fn release_expired_token_in(
    tx: &mut sqlx::Transaction<'static, MySql>,
    spray: &NewSpray,
) -> Result<(), StoreError> {
    let now = millis(spray.created_at);
    for (column, scope) in [("room_id", 0), ("owner_id", 1)] {
        let sql = format!(
            "UPDATE sprays SET token_live = NULL
                 WHERE {column} = ? AND token = ? AND token_live = 1 AND lookup_until <= ?"
        );
        let query = sqlx::query(sqlx::AssertSqlSafe(sql));
        let query = if scope == 0 {
            query.bind(spray.room.as_str())
        } else {
            query.bind(spray.owner.get())
        };
        query
            .bind(spray.token.as_str())
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn insert_spray_row_once(
    tx: &mut sqlx::Transaction<'static, MySql>,
    spray: &NewSpray,
) -> Result<i64, StoreError> {
    let recipient_count = i64::try_from(spray.shares.len()).map_err(|e| StoreError::Other(e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO sprays (room_id, token, owner_id, mode, total_amount, recipient_count,
                                 created_at, receive_until, lookup_until)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(spray.room.as_str())
    .bind(spray.token.as_str())
    .bind(spray.owner.get())
    .bind(spray.mode.as_str())
    .bind(stored(spray.total_amount)?)
    .bind(recipient_count)
    .bind(millis(spray.created_at))
    .bind(millis(spray.receive_until))
    .bind(millis(spray.lookup_until))
    .execute(&mut **tx)
    .await;
    match inserted {
        Ok(done) => i64::try_from(done.last_insert_id()).map_err(|e| StoreError::Other(e.to_string())),
        Err(e) if unique_violation(&e).is_some_and(Unique::is_token_taken) => Err(StoreError::TokenTaken),
        Err(e) => Err(e.into()),
    }
}

/// The SQL that is the same for every backend (see `store/portable.rs`).
pub(super) mod portable {
    super::super::portable::portable_sql_functions!(
        db = sqlx::MySql,
        lock = " FOR UPDATE",
        share_lock = " LOCK IN SHARE MODE",
        insert_spray_row = super::insert_spray_row_in,
        take_free_share = super::take_free_share_in,
    );
}

#[cfg(test)]
mod tests {
    use super::super::slot_batch::tests::Fixture;
    use super::*;

    /// The SQL-only claim starts its search at the highest slot it has seen taken; a share
    /// given back below that (a claim that held it rolled back) must still be found.
    #[tokio::test]
    async fn a_share_given_back_below_the_search_hint_is_still_found() {
        let fx = Fixture::new(2).await;
        // Another claim holds slot 0, in a transaction of its own.
        let mut holder = fx.writer().pool().begin().await.unwrap();
        sqlx::query("SELECT slot FROM shares WHERE spray_id = ? AND slot = 0 FOR UPDATE")
            .bind(fx.spray_id)
            .fetch_one(&mut *holder)
            .await
            .unwrap();
        let first = fx.store.claim_share(&fx.claim(31), None).await.unwrap();
        assert_eq!(first, ClaimOutcome::Received(Amount::new(5)));
        assert_eq!(
            fx.taken().await,
            (vec![(1, 31)], 1),
            "slot 1 taken, past the held slot 0"
        );
        // The holder rolls back: slot 0 is free again, below where the search now starts.
        holder.rollback().await.unwrap();
        let second = fx.store.claim_share(&fx.claim(32), None).await.unwrap();
        assert_eq!(second, ClaimOutcome::Received(Amount::new(5)));
        let third = fx.store.claim_share(&fx.claim(33), None).await.unwrap();
        assert_eq!(
            third,
            ClaimOutcome::Refused(ReceiveRefusal::Exhausted { shares: 2 })
        );
        assert_eq!(fx.taken().await, (vec![(0, 32), (1, 31)], 2));
        fx.drop_database().await;
    }
}
