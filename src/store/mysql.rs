//! The MySQL 8 / MariaDB 10.6+ store, for several instances on one database.
//!
//! Every transaction runs at READ COMMITTED: the rules rely on constraints and on locking
//! reads, not on snapshots, and READ COMMITTED takes no gap locks, so concurrent claims on
//! one spray do not deadlock on the index ranges between rows.
//!
//! A claim locks one free share with `FOR UPDATE SKIP LOCKED`: a thousand members racing
//! for one spray each lock a different row instead of queueing on the first free one.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySql, MySqlPool, QueryBuilder};

use super::convert::{
    ReceiptRow, SPRAY_COLUMNS, SprayRow, amount_from, millis, share_rows, stored, time_from, user_from,
};
use super::error::is_unique_violation;
use super::{Claim, ClaimOutcome, NewSpray, SlotClaim, SprayKey, Store, StoreError};
use crate::domain::rules::{ReceiveFacts, check_receive};
use crate::domain::{Amount, ReceiveRefusal, RoomId, SprayRecord, Token, UserId};
use crate::gate::GateSnapshot;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/mysql");

/// Rows per multi-row INSERT of shares.
const SHARES_PER_INSERT: usize = 500;
/// How long an instance waits for another one's migrations at start-up.
const MIGRATION_LOCK_WAIT_SECONDS: i64 = 120;
/// A transaction that loses a deadlock or a lock wait is run this many times in all.
/// Deadlocks are normal in InnoDB when many transactions insert the same unique key at
/// once (forty sprayers drawing one token); a short random pause spreads the retries.
const ATTEMPTS: u32 = 6;

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

    async fn try_insert_spray(&self, spray: &NewSpray) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Committed only if every write succeeded; rolled back explicitly otherwise, so
        // no transaction stays open on a pooled connection.
        match insert_in(&mut tx, spray).await {
            Ok(()) => Ok(tx.commit().await?),
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// One claim transaction: committed when a share was taken, rolled back otherwise.
    /// The rollback is explicit: a transaction merely dropped would stay open on its pooled
    /// connection (holding metadata locks) until the connection is next used.
    async fn try_claim_share(&self, claim: &Claim) -> Result<ClaimOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcome = Self::claim_in(&mut tx, claim).await;
        match outcome {
            Ok(ClaimOutcome::Received(_)) => tx.commit().await?,
            _ => tx.rollback().await?,
        }
        outcome
    }

    async fn claim_in(
        tx: &mut sqlx::Transaction<'static, MySql>,
        claim: &Claim,
    ) -> Result<ClaimOutcome, StoreError> {
        // Rule 1: the spray must exist in the caller's room; the newest holder of the
        // token in the room is the live one, if any is live.
        let spray = sqlx::query_as::<_, (i64, i64, i64, i64)>(
            "SELECT id, owner_id, receive_until, recipient_count FROM sprays
             WHERE room_id = ? AND token = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(claim.room.as_str())
        .bind(claim.token.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let Some((spray_id, owner_id, receive_until, recipient_count)) = spray else {
            return Ok(ClaimOutcome::Refused(ReceiveRefusal::NotFound));
        };

        let already_received =
            sqlx::query_scalar::<_, i64>("SELECT amount FROM shares WHERE spray_id = ? AND receiver_id = ?")
                .bind(spray_id)
                .bind(claim.user.get())
                .fetch_optional(&mut **tx)
                .await?
                .map(amount_from)
                .transpose()?;

        // Rules 2 to 4, in the contract's order.
        let facts = ReceiveFacts {
            owner: user_from(owner_id)?,
            receive_until: time_from(receive_until)?,
            already_received,
        };
        if let Err(refusal) = check_receive(&facts, claim.user, claim.now) {
            return Ok(ClaimOutcome::Refused(refusal));
        }

        // Rule 5: lock a free share nobody else holds. SKIP LOCKED may miss shares that
        // in-flight claims hold and may yet give back (rollback), so "none" is confirmed
        // by a waiting locking read before the spray is called exhausted.
        let mut free = sqlx::query_as::<_, (i64, i64)>(
            "SELECT slot, amount FROM shares WHERE spray_id = ? AND receiver_id IS NULL
             ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(spray_id)
        .fetch_optional(&mut **tx)
        .await?;
        if free.is_none() {
            free = sqlx::query_as::<_, (i64, i64)>(
                "SELECT slot, amount FROM shares WHERE spray_id = ? AND receiver_id IS NULL
                 ORDER BY slot LIMIT 1 FOR UPDATE",
            )
            .bind(spray_id)
            .fetch_optional(&mut **tx)
            .await?;
        }
        let Some((slot, amount)) = free else {
            let shares = u32::try_from(recipient_count).unwrap_or(u32::MAX);
            return Ok(ClaimOutcome::Refused(ReceiveRefusal::Exhausted { shares }));
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
                return Ok(ClaimOutcome::Refused(ReceiveRefusal::AlreadyReceived));
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

        Ok(ClaimOutcome::Received(amount))
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

    async fn insert_spray(&self, spray: &NewSpray) -> Result<(), StoreError> {
        retrying!(self.try_insert_spray(spray))
    }

    async fn claim_share(&self, claim: &Claim) -> Result<ClaimOutcome, StoreError> {
        retrying!(self.try_claim_share(claim))
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
        // The spray row never changes after creation; the answer is derived from the
        // receipts alone, so one read of them is a consistent view.
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

    async fn gate_snapshot(&self, room: &RoomId, token: &Token) -> Result<Option<GateSnapshot>, StoreError> {
        gate_sql::gate_snapshot(&self.pool, room, token).await
    }

    async fn claim_slot(&self, claim: &Claim, spray_id: i64, slot: i64) -> Result<SlotClaim, StoreError> {
        gate_sql::claim_slot(&self.pool, claim, spray_id, slot).await
    }

    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError> {
        gate_sql::share_of(&self.pool, spray_id, user).await
    }
}

/// The spray, its shares and the DEBIT, inside the caller's transaction.
async fn insert_in(tx: &mut sqlx::Transaction<'static, MySql>, spray: &NewSpray) -> Result<(), StoreError> {
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

    for chunk in share_rows(&spray.shares)?.chunks(SHARES_PER_INSERT) {
        let mut insert = QueryBuilder::<MySql>::new("INSERT INTO shares (spray_id, slot, amount) ");
        insert.push_values(chunk, |mut row, (slot, amount)| {
            row.push_bind(spray_id).push_bind(*slot).push_bind(*amount);
        });
        insert.build().execute(&mut **tx).await?;
    }

    sqlx::query("INSERT INTO ledger (spray_id, kind, user_id, amount, at) VALUES (?, 'DEBIT', ?, ?, ?)")
        .bind(spray_id)
        .bind(spray.owner.get())
        .bind(stored(spray.total_amount)?)
        .bind(now)
        .execute(&mut **tx)
        .await?;

    Ok(())
}

/// The SQL side of the Redis gate, shared with the other backends.
mod gate_sql {
    super::super::gate_sql::gate_sql_functions!(db = sqlx::MySql, begin = "BEGIN");
}
