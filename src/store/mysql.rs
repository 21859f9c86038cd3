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
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySql, MySqlPool};

use super::ClaimSnapshot;
use super::commit::{TakenShare, Written, commit_and_confirm};
use super::convert::{ReceiptRow, SPRAY_COLUMNS, SprayRow, amount_from, millis, stored};
use super::error::is_unique_violation;
use super::idempotency::{INSERT_PENDING_SQL, IdempotencyRow, Judgement, SELECT_ROW_SQL, TAKE_OVER_SQL};
use super::{
    Begin, Claim, ClaimOutcome, IdempotencySlot, IdempotencyWrite, IdempotentRequest, NewSpray,
    SettleOutcome, SlotClaim, SprayKey, Store, StoreError, StoredAnswer,
};
use crate::domain::{Amount, ReceiveRefusal, RoomId, SprayRecord, Token, UserId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/mysql");

/// How long an instance waits for another one's migrations at start-up.
const MIGRATION_LOCK_WAIT_SECONDS: i64 = 120;
/// A transaction that loses a deadlock or a lock wait is run this many times in all.
/// Deadlocks are normal in InnoDB when many transactions insert the same unique key at
/// once (forty sprayers drawing one token); a short random pause spreads the retries.
const ATTEMPTS: u32 = 6;
/// How long reading back a commit's outcome waits for a row lock: the transaction that
/// holds it is one whose session the server has not yet seen end. The attempt is then
/// repeated (see `store/commit.rs`), so this only bounds one attempt.
const READ_BACK_LOCK_WAIT_SECONDS: u32 = 5;

pub struct MySqlStore {
    pool: MySqlPool,
}

impl MySqlStore {
    /// Connects to the database named by a `mysql://` URL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<MySqlStore, StoreError> {
        let options = MySqlConnectOptions::from_str(url)?;
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Fail fast when the database is gone: the caller answers 503 and retries.
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(MySqlStore { pool })
    }

    async fn try_insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Committed only if every write succeeded; rolled back explicitly otherwise, so
        // no transaction stays open on a pooled connection.
        let written = match insert_in(&mut tx, spray).await {
            Ok(spray_id) => portable::complete_in(&mut tx, idempotency, spray.total_amount, spray.created_at)
                .await
                .map(|()| spray_id),
            Err(e) => Err(e),
        };
        match written {
            Ok(spray_id) => {
                let written = Written::Spray {
                    id: spray_id,
                    room: spray.room.as_str().to_owned(),
                    token: spray.token.as_str().to_owned(),
                    owner: spray.owner.get(),
                    created_at: millis(spray.created_at),
                };
                commit_and_confirm(tx, &written, || self.landed(&written)).await?;
                Ok(spray_id)
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// Whether `written` is in the database, read on a connection of its own rather than
    /// one from the pool: pooled connections may be as dead as the one whose commit
    /// failed, or all busy.
    async fn landed(&self, written: &Written) -> Result<bool, StoreError> {
        use sqlx::{ConnectOptions, Connection};
        let mut conn = self.pool.connect_options().connect().await?;
        let found = async {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET SESSION innodb_lock_wait_timeout = {READ_BACK_LOCK_WAIT_SECONDS}"
            )))
            .execute(&mut conn)
            .await?;
            portable::landed(&mut conn, written).await
        }
        .await;
        let _ = conn.close().await;
        found
    }

    /// Commits a claim that took `taken`, reading it back if the acknowledgement is lost.
    async fn commit_claim(
        &self,
        tx: sqlx::Transaction<'static, MySql>,
        claim: &Claim,
        taken: TakenShare,
    ) -> Result<(), StoreError> {
        let written = Written::Share {
            spray_id: taken.spray_id,
            slot: taken.slot,
            user: claim.user.get(),
            received_at: millis(claim.now),
        };
        commit_and_confirm(tx, &written, || self.landed(&written)).await
    }

    /// One claim transaction: committed when a share was taken, rolled back otherwise.
    /// The rollback is explicit: a transaction merely dropped would stay open on its pooled
    /// connection (holding metadata locks) until the connection is next used.
    async fn try_claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcome = match Self::claim_in(&mut tx, claim).await {
            Ok(Ok(taken)) => portable::complete_in(&mut tx, idempotency, taken.amount, claim.now)
                .await
                .map(|()| Ok(taken)),
            other => other,
        };
        match outcome {
            Ok(Ok(taken)) => {
                self.commit_claim(tx, claim, taken).await?;
                Ok(ClaimOutcome::Received(taken.amount))
            }
            Ok(Err(refusal)) => {
                tx.rollback().await?;
                Ok(ClaimOutcome::Refused(refusal))
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// The gate's point update: the spray row first, under the same shared lock as every
    /// claim (see the module doc), then the one share, then the kept answer.
    async fn try_claim_slot(
        &self,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<SlotClaim, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcome = async {
            if lock_unsettled(&mut tx, spray_id).await?.is_none() {
                return Ok(SlotClaim::Closed);
            }
            match portable::claim_slot_in(&mut tx, claim, spray_id, slot).await? {
                SlotClaim::Received(amount) => {
                    portable::complete_in(&mut tx, idempotency, amount, claim.now).await?;
                    Ok(SlotClaim::Received(amount))
                }
                other => Ok(other),
            }
        }
        .await;
        match outcome {
            Ok(SlotClaim::Received(amount)) => {
                let taken = TakenShare {
                    spray_id,
                    slot,
                    amount,
                };
                self.commit_claim(tx, claim, taken).await?;
                Ok(SlotClaim::Received(amount))
            }
            other => {
                tx.rollback().await?;
                other
            }
        }
    }

    /// The claim inside the caller's transaction: the share it took (the slot is kept, so
    /// that the share can be found again if the commit's acknowledgement is lost), or the
    /// rule that refused it.
    async fn claim_in(
        tx: &mut sqlx::Transaction<'static, MySql>,
        claim: &Claim,
    ) -> Result<Result<TakenShare, ReceiveRefusal>, StoreError> {
        // Rules 1 to 4, in the contract's order.
        let (spray_id, recipient_count) = match portable::receive_rules_in(tx, claim).await? {
            Ok(spray) => spray,
            Err(refusal) => return Ok(Err(refusal)),
        };
        // Rule 4 again, under the spray row's shared lock (see the module doc): a settled
        // spray is closed, even to a claim whose `now` is still inside the window.
        if lock_unsettled(tx, spray_id).await?.is_none() {
            return Ok(Err(ReceiveRefusal::Expired));
        }

        // Rule 5: lock a free share nobody else holds. SKIP LOCKED may miss shares that
        // in-flight claims hold and may yet give back (rollback), so "none" is confirmed
        // by a plain read of the committed free shares before the spray is called
        // exhausted. If some are still free, in-flight claims hold them: this transaction
        // is a conflict and runs again shortly, when they have committed or rolled back.
        // (A waiting `FOR UPDATE` here deadlocked with those claims' index updates.)
        let free = sqlx::query_as::<_, (i64, i64)>(
            "SELECT slot, amount FROM shares WHERE spray_id = ? AND receiver_id IS NULL
             ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(spray_id)
        .fetch_optional(&mut **tx)
        .await?;
        if free.is_none() {
            let still_free = sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM shares WHERE spray_id = ? AND receiver_id IS NULL",
            )
            .bind(spray_id)
            .fetch_one(&mut **tx)
            .await?;
            if still_free > 0 {
                return Err(StoreError::Conflict(
                    "every free share is held by a claim in flight".into(),
                ));
            }
        }
        let Some((slot, amount)) = free else {
            let shares = u32::try_from(recipient_count).unwrap_or(u32::MAX);
            return Ok(Err(ReceiveRefusal::Exhausted { shares }));
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
            Ok(done) if done.rows_affected() == 1 => {}
            // We hold the row lock, so this cannot happen; if it does, start over.
            Ok(_) => return Err(StoreError::Conflict("a locked share was taken".into())),
            // The same user won a share in a transaction that committed meanwhile.
            Err(e) if is_unique_violation(&e) => {
                return Ok(Err(ReceiveRefusal::AlreadyReceived));
            }
            Err(e) => return Err(e.into()),
        }
        let amount = amount_from(amount)?;

        sqlx::query("INSERT INTO ledger (spray_id, kind, user_id, amount, at) VALUES (?, 'CREDIT', ?, ?, ?)")
            .bind(spray_id)
            .bind(claim.user.get())
            .bind(stored(amount)?)
            .bind(millis(claim.now))
            .execute(&mut **tx)
            .await?;

        Ok(Ok(TakenShare {
            spray_id,
            slot,
            amount,
        }))
    }
}

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
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<i64, StoreError> {
        retrying!(self.try_insert_spray(spray, idempotency))
    }

    async fn claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<ClaimOutcome, StoreError> {
        retrying!(self.try_claim_share(claim, idempotency))
    }

    async fn find_spray(&self, key: &SprayKey) -> Result<Option<SprayRecord>, StoreError> {
        let (filter, token) = match key {
            SprayKey::Room(_, token) => ("room_id = ?", token),
            SprayKey::Owner(_, token) => ("owner_id = ?", token),
        };
        let sql = format!(
            "SELECT {SPRAY_COLUMNS} FROM sprays WHERE {filter} AND token = ? ORDER BY id DESC LIMIT 1"
        );
        let query = sqlx::query_as::<_, SprayRow>(sqlx::AssertSqlSafe(sql));
        let query = match key {
            SprayKey::Room(room, _) => query.bind(room.as_str().to_owned()),
            SprayKey::Owner(owner, _) => query.bind(owner.get()),
        };
        let Some(row) = query
            .bind(token.as_str().to_owned())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        // The spray row changes only when it is settled, and no receipt is added after
        // that: a row read unsettled is answered from the clock and the receipts, a row
        // read settled from receipts that can no longer change. Either way one read of
        // the receipts is a consistent view.
        let receipts = sqlx::query_as::<_, ReceiptRow>(
            "SELECT receiver_id, amount, received_at FROM shares
             WHERE spray_id = ? AND receiver_id IS NOT NULL ORDER BY received_at, slot",
        )
        .bind(row.id)
        .fetch_all(&self.pool)
        .await?;
        row.into_record(receipts).map(Some)
    }

    async fn count(&self, sql: &'static str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await?)
    }

    async fn close(&self) {
        self.pool.close().await;
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
        idempotency: Option<&IdempotencyWrite>,
    ) -> Result<SlotClaim, StoreError> {
        retrying!(self.try_claim_slot(claim, spray_id, slot, idempotency))
    }

    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError> {
        portable::share_of(&self.pool, spray_id, user).await
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
                Ok(_) => return Ok(Begin::Run(request.slot())),
                Err(e) if is_unique_violation(&e) => {}
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
                        return Ok(Begin::Run(request.slot()));
                    }
                }
            }
        }
        // Other requests under this key keep changing the row: one of them is running.
        Ok(Begin::InProgress)
    }

    async fn finish_idempotent(
        &self,
        slot: &IdempotencySlot,
        answer: &StoredAnswer,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        Ok(portable::complete_row(&self.pool, slot, answer, now).await? == 1)
    }

    async fn release_idempotent(&self, slot: &IdempotencySlot) -> Result<(), StoreError> {
        portable::release_row(&self.pool, slot).await
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
        match outcome {
            Ok(SettleOutcome::Refunded(_) | SettleOutcome::Completed) => tx.commit().await?,
            _ => tx.rollback().await?,
        }
        outcome
    }
}

/// The spray, its shares and the DEBIT, inside the caller's transaction.
async fn insert_in(tx: &mut sqlx::Transaction<'static, MySql>, spray: &NewSpray) -> Result<i64, StoreError> {
    let now = millis(spray.created_at);

    // Sprays past their lookup window give up the token (see the migration). Two
    // statements, so that each uses its own unique index.
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
    .bind(now)
    .bind(millis(spray.receive_until))
    .bind(millis(spray.lookup_until))
    .execute(&mut **tx)
    .await;
    let spray_id = match inserted {
        Ok(done) => i64::try_from(done.last_insert_id()).map_err(|e| StoreError::Other(e.to_string()))?,
        Err(e) if is_unique_violation(&e) => return Err(StoreError::TokenTaken),
        Err(e) => return Err(e.into()),
    };

    portable::insert_shares_and_debit_in(tx, spray_id, spray).await?;
    Ok(spray_id)
}

/// The SQL that is the same for every backend (see `store/portable.rs`).
mod portable {
    super::super::portable::portable_sql_functions!(
        db = sqlx::MySql,
        lock = " FOR UPDATE",
        share_lock = " LOCK IN SHARE MODE"
    );
}

/// Locks the spray row in share mode and reads whether it is settled (see the module
/// doc). `Some(())` when the spray is there and unsettled: the caller may give a share
/// away, and no settlement can commit until the caller's transaction ends. `None` when it
/// is settled, or gone (a spray is purged only once settled).
///
/// Every transaction that gives a share away must call this before touching the shares.
pub(crate) async fn lock_unsettled(
    tx: &mut sqlx::Transaction<'static, MySql>,
    spray_id: i64,
) -> Result<Option<()>, StoreError> {
    let settled_at =
        sqlx::query_scalar::<_, Option<i64>>("SELECT settled_at FROM sprays WHERE id = ? LOCK IN SHARE MODE")
            .bind(spray_id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(matches!(settled_at, Some(None)).then_some(()))
}
