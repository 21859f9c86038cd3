//! The embedded store: one SQLite file in WAL mode with durable commits.
//!
//! SQLite allows one writer at a time. Rather than let many connections race for the
//! write lock and back off on `SQLITE_BUSY`, writes take turns (`SqliteStore::turn`), so
//! writers queue fairly and each transaction runs without contention: the money writes, many
//! to a commit on a rusqlite connection of their own (`store/sqlite_writes.rs`), and the
//! rest (idempotency rows, purges, migrations) through a sqlx pool of exactly one
//! connection. Reads use a separate pool and never wait for writers (WAL).
//!
//! A spray or a claim whose `COMMIT` fails is read back through the readers before anyone
//! is answered (see `store/commit.rs`): SQLite may report an error from a commit that
//! reached the disk (an I/O error while cleaning up after it, say).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

use super::ClaimSnapshot;
use super::batch::{GroupCommit, Landed, WriteOp};
use super::commit::finish;
use super::convert::millis;
use super::idempotency::{INSERT_PENDING_SQL, IdempotencyRow, Judgement, SELECT_ROW_SQL, TAKE_OVER_SQL};
use super::sqlite_reads::SqliteLookups;
use super::sqlite_writes::SqliteWrites;
use super::{
    Begin, Claim, ClaimOutcome, IdempotentRequest, NewSpray, PendingKey, PoolUse, SettleOutcome, SlotClaim,
    SprayLookup, Store, StoreError, StoredAnswer,
};
use crate::domain::{Amount, RoomId, SprayRecord, Token, UserId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a connection waits for SQLite's file lock (another process, a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The money writes (sprays, claims, settlements), many to a commit, on a connection of
    /// their own: see `store/batch.rs` and `store/sqlite_writes.rs`.
    batches: GroupCommit,
    /// The turn to write: held by a batch of money writes, or by a write through `writer`
    /// (idempotency rows, purges), so that the two connections never wait on each other's
    /// file lock (SQLite's busy handler would sleep, and a busy writer could starve the
    /// other). Tokio's mutex is fair: turns are taken in order of arrival.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The lookups of a spray, many to a batch on connections of their own: see
    /// `store/sqlite_reads.rs`.
    lookups: SqliteLookups,
}

/// A pool of at most `connections`, each handed out without a ping first (sqlx's
/// default): an embedded connection cannot be lost to the network, and the ping is a round
/// trip through the connection's worker thread on every lookup and every batch.
fn pool_options(connections: u32) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by a `sqlite://` URL.
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged, in WAL mode too,
            // so an acknowledged receipt survives kill -9 and power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let writer = pool_options(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| why_not_opened(options.get_filename(), e))?;
        let reader = pool_options(4).connect_lazy_with(options.read_only(true));
        SqliteStore::with_pools(writer, reader)
    }

    /// The store over its two pools, with the group commit started on a connection of its
    /// own to the same file (opened by the first batch).
    fn with_pools(writer: SqlitePool, reader: SqlitePool) -> Result<SqliteStore, StoreError> {
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let path = writer.connect_options().get_filename().to_path_buf();
        let money = SqliteWrites::new(path.clone(), BUSY_TIMEOUT);
        Ok(SqliteStore {
            batches: GroupCommit::start(money, turn.clone(), landed_through(reader.clone()))?,
            writer,
            reader,
            turn,
            lookups: SqliteLookups::start(path, BUSY_TIMEOUT),
        })
    }

    /// Opens an existing database file read-only (`spray audit`): never creates the file,
    /// never migrates, never sets a pragma that writes. The writer pool is never used.
    pub async fn connect_read_only(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(false)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT);
        let reader = pool_options(1).connect_with(options.clone()).await?;
        let writer = pool_options(1).connect_lazy_with(options);
        SqliteStore::with_pools(writer, reader)
    }

    /// The migrations this binary carries, to compare with those a store has applied.
    pub fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// A write transaction. IMMEDIATE takes the write lock up front, so the transaction
    /// never has to upgrade a read lock (which SQLite may refuse with SQLITE_BUSY).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Whether a write is in the database, read through a reader: a connection other than the
/// writer whose commit failed, which sees every committed transaction.
fn landed_through(reader: SqlitePool) -> Landed {
    Arc::new(move |written| {
        let reader = reader.clone();
        Box::pin(async move { portable::landed(&reader, &written).await })
    })
}

/// SQLite says only "unable to open database file" (code 14); the operator needs the
/// path and the reason, found out here without writing anything.
fn why_not_opened(path: &std::path::Path, error: sqlx::Error) -> StoreError {
    let is_cantopen = matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("14"));
    if !is_cantopen {
        return StoreError::from(error);
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let reason = if path.is_dir() {
        "it is a directory".to_owned()
    } else if path.exists() {
        match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Err(e) => e.to_string(),
            Ok(_) => "SQLite cannot open it (its -wal or -shm file, or the directory?)".to_owned(),
        }
    } else if !parent.is_dir() {
        format!("the directory {} does not exist", parent.display())
    } else {
        format!(
            "it does not exist and cannot be created in {} (is the directory writable by this user?)",
            parent.display()
        )
    };
    StoreError::Config(format!(
        "cannot open the SQLite file {}: {reason}",
        path.display()
    ))
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let _turn = self.turn.lock().await;
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn insert_spray(
        &self,
        spray: &NewSpray,
        idempotency: Option<&PendingKey>,
    ) -> Result<i64, StoreError> {
        let op = WriteOp::Spray {
            spray: spray.clone(),
            idempotency: idempotency.cloned(),
        };
        self.batches.write(op).await?.sprayed()
    }

    async fn claim_share(
        &self,
        claim: &Claim,
        idempotency: Option<&PendingKey>,
    ) -> Result<ClaimOutcome, StoreError> {
        let op = WriteOp::ClaimShare {
            claim: claim.clone(),
            idempotency: idempotency.cloned(),
        };
        self.batches.write(op).await?.claimed()
    }

    async fn find_spray(&self, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
        self.lookups.find(key).await
    }

    async fn count(&self, sql: &'static str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.reader).await?)
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    fn pool_use(&self) -> PoolUse {
        // The writer and the readers together: one pool as an operator sees it.
        let open = self.writer.size().saturating_add(self.reader.size());
        let idle = self.writer.num_idle().saturating_add(self.reader.num_idle());
        PoolUse {
            backend: "sqlite",
            open,
            idle: u32::try_from(idle).unwrap_or(open),
        }
    }

    async fn claim_snapshot(
        &self,
        room: &RoomId,
        token: &Token,
    ) -> Result<Option<ClaimSnapshot>, StoreError> {
        portable::claim_snapshot(&self.reader, room, token).await
    }

    async fn claim_slot(
        &self,
        claim: &Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<&PendingKey>,
    ) -> Result<SlotClaim, StoreError> {
        let op = WriteOp::ClaimSlot {
            claim: claim.clone(),
            spray_id,
            slot,
            idempotency: idempotency.cloned(),
        };
        self.batches.write(op).await?.claimed_slot()
    }

    async fn share_of(&self, spray_id: i64, user: UserId) -> Result<Option<Amount>, StoreError> {
        portable::share_of(&self.writer, spray_id, user).await
    }

    async fn slot_holder(&self, spray_id: i64, slot: i64) -> Result<Option<UserId>, StoreError> {
        portable::slot_holder(&self.writer, spray_id, slot).await
    }

    async fn unsettled_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<Vec<i64>, StoreError> {
        portable::unsettled_sprays(&self.reader, closed_by, limit).await
    }

    async fn settle_spray(&self, spray_id: i64, now: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        // Through the single writer like the claims: no claim runs while it does, and every
        // claim after it sees `settled_at` (see `portable::unsettled_in`).
        self.batches
            .write(WriteOp::Settle { spray_id, now })
            .await?
            .settled()
    }

    async fn purge_sprays(&self, closed_by: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        // Shares go with their spray (ON DELETE CASCADE); the ledger has no foreign key and
        // stays. Only settled sprays: their money is fully accounted for in the ledger.
        let _turn = self.turn.lock().await;
        let done = sqlx::query(
            "DELETE FROM sprays WHERE id IN
                 (SELECT id FROM sprays WHERE settled_at IS NOT NULL AND lookup_until <= ?
                  ORDER BY lookup_until, id LIMIT ?)",
        )
        .bind(millis(closed_by))
        .bind(limit)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn begin_idempotent(&self, request: &IdempotentRequest) -> Result<Begin, StoreError> {
        // One transaction on the single writer: the read and the insert or take-over that
        // follows it cannot interleave with another request's.
        let _turn = self.turn.lock().await;
        let mut tx = self.begin_write().await?;
        let begun = begin_in(&mut tx, request).await;
        finish(tx, begun, |b| matches!(b, Begin::Run(_))).await
    }

    async fn finish_idempotent(
        &self,
        pending: &PendingKey,
        answer: &StoredAnswer,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let _turn = self.turn.lock().await;
        Ok(portable::complete_row(&self.writer, pending, answer, now).await? == 1)
    }

    async fn release_idempotent(&self, pending: &PendingKey) -> Result<(), StoreError> {
        let _turn = self.turn.lock().await;
        portable::release_row(&self.writer, pending).await
    }

    async fn purge_idempotency(&self, touched_before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let _turn = self.turn.lock().await;
        let done = sqlx::query(
            "DELETE FROM idempotency WHERE rowid IN
                 (SELECT rowid FROM idempotency WHERE touched_at < ? ORDER BY touched_at LIMIT ?)",
        )
        .bind(millis(touched_before))
        .bind(limit)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

/// The SQL that is the same for every backend (see `store/portable.rs`).
mod portable {
    super::super::portable::portable_sql_functions!(db = sqlx::Sqlite, share_lock = "");
}

/// Begins an idempotent request inside the caller's transaction; see `Store::begin_idempotent`.
async fn begin_in(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    request: &IdempotentRequest,
) -> Result<Begin, StoreError> {
    let existing = sqlx::query_as::<_, IdempotencyRow>(SELECT_ROW_SQL)
        .bind(request.user.get())
        .bind(request.endpoint.as_str())
        .bind(request.key.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    let now = millis(request.now);
    match existing.map(|row| row.judge(request)).transpose()? {
        None => {
            sqlx::query(INSERT_PENDING_SQL)
                .bind(request.user.get())
                .bind(request.endpoint.as_str())
                .bind(request.key.as_str())
                .bind(request.fingerprint.as_bytes().as_slice())
                .bind(request.lease)
                .bind(now)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            Ok(Begin::Run(request.pending()))
        }
        Some(Judgement::Answer(answer)) => Ok(answer),
        Some(Judgement::TakeOver { lease }) => {
            // Under the single writer nothing can change the row between the read and
            // this update, but the condition keeps the take-over honest on its own.
            let taken = sqlx::query(TAKE_OVER_SQL)
                .bind(request.lease)
                .bind(now)
                .bind(request.user.get())
                .bind(request.endpoint.as_str())
                .bind(request.key.as_str())
                .bind(lease)
                .execute(&mut **tx)
                .await?;
            if taken.rows_affected() == 1 {
                Ok(Begin::Run(request.pending()))
            } else {
                Ok(Begin::InProgress)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::domain::{ReceiveRefusal, SplitMode};
    use crate::store::batch::{BatchWriter, WriteOutcome, write_batch};
    use crate::store::commit::Written;
    use crate::store::error::{Unique, unique_violation};
    use crate::store::{Effect, Kept};

    /// A migrated store on a fresh file, and the time the tests run at.
    async fn fresh_store() -> (tempfile::TempDir, SqliteStore, DateTime<Utc>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("spray.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let now = DateTime::parse_from_rfc3339("2024-02-21T09:33:10.123Z")
            .unwrap()
            .with_timezone(&Utc);
        (dir, store, now)
    }

    async fn landed(store: &SqliteStore, written: Written) -> Result<bool, StoreError> {
        portable::landed(&store.reader, &written).await
    }

    /// The read-back after a failed commit must find exactly what each transaction wrote,
    /// and nothing else (on MySQL the fault tests show it through a proxy).
    #[tokio::test]
    async fn what_a_spray_and_a_claim_wrote_is_found_again_and_nothing_else() {
        let (_dir, store, now) = fresh_store().await;
        let (room, token, owner) = (
            RoomId::parse("ROOM").unwrap(),
            Token::parse("ABC").unwrap(),
            UserId::from_stored(1).unwrap(),
        );
        let spray = NewSpray {
            token: token.clone(),
            room: room.clone(),
            owner,
            mode: SplitMode::Even,
            total_amount: Amount::new(10),
            shares: vec![Amount::new(5), Amount::new(5)],
            created_at: now,
            receive_until: now + TimeDelta::minutes(10),
            lookup_until: now + TimeDelta::days(7),
        };
        let id = store.insert_spray(&spray, None).await.unwrap();
        let sprayed = |id, token: &str, created_at| Written::Spray {
            id,
            room: "ROOM".into(),
            token: token.into(),
            owner: 1,
            created_at,
        };
        assert!(landed(&store, sprayed(id, "ABC", millis(now))).await.unwrap());
        assert!(!landed(&store, sprayed(id + 1, "ABC", millis(now))).await.unwrap());
        assert!(!landed(&store, sprayed(id, "XYZ", millis(now))).await.unwrap());
        assert!(!landed(&store, sprayed(id, "ABC", millis(now) + 1)).await.unwrap());

        let claim = Claim {
            room,
            token,
            user: UserId::from_stored(2).unwrap(),
            now,
        };
        let received = store.claim_share(&claim, None).await.unwrap();
        assert_eq!(received, ClaimOutcome::Received(Amount::new(5)));
        let share = |slot, user| Written::Share {
            spray_id: id,
            slot,
            user,
            received_at: millis(now),
        };
        assert!(landed(&store, share(0, 2)).await.unwrap());
        assert!(!landed(&store, share(1, 2)).await.unwrap());
        assert!(!landed(&store, share(0, 3)).await.unwrap());
        let other = Claim {
            user: UserId::from_stored(3).unwrap(),
            ..claim.clone()
        };
        let through_gate = store.claim_slot(&other, id, 1, None).await.unwrap();
        assert_eq!(through_gate, SlotClaim::Received(Amount::new(5)));
        assert!(landed(&store, share(1, 3)).await.unwrap());
        store.close().await;
    }

    /// A store on a fresh file, with one spray of three shares of 5 by user 1 in room
    /// `ROOM` under the token `ABC`; the claim of `user` on it at the same time.
    async fn store_with_a_spray() -> (tempfile::TempDir, SqliteStore, impl Fn(i64) -> Claim) {
        let (dir, store, now) = fresh_store().await;
        store.insert_spray(&spray_at(now, "ABC", 1), None).await.unwrap();
        let claim = move |user| Claim {
            room: RoomId::parse("ROOM").unwrap(),
            token: Token::parse("ABC").unwrap(),
            user: UserId::from_stored(user).unwrap(),
            now,
        };
        (dir, store, claim)
    }

    /// The database itself refuses a second share of one spray to one user: the gated
    /// path writes the slot the gate chose without looking first, so only the unique
    /// index `shares_one_per_receiver` stands between a stale gate and a double payment.
    #[tokio::test]
    async fn the_database_refuses_a_second_share_to_one_receiver() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let id: i64 = sqlx::query_scalar("SELECT id FROM sprays")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        let first = store.claim_slot(&claim(3), id, 0, None).await.unwrap();
        assert_eq!(first, SlotClaim::Received(Amount::new(5)));
        let second = store.claim_slot(&claim(3), id, 1, None).await.unwrap();
        assert_eq!(second, SlotClaim::AlreadyReceived);
        let other = store.claim_slot(&claim(4), id, 1, None).await.unwrap();
        assert_eq!(other, SlotClaim::Received(Amount::new(5)));
        assert_eq!(receivers(&store).await, [3, 4]);
        assert_eq!(credits(&store).await, 2);

        // Straight SQL too, as a bug in any path would write it.
        let twice =
            sqlx::query("UPDATE shares SET receiver_id = 3, received_at = 1 WHERE spray_id = ? AND slot = 2")
                .bind(id)
                .execute(&store.writer)
                .await
                .unwrap_err();
        assert_eq!(unique_violation(&twice), Some(Unique::SharesOnePerReceiver));
        store.close().await;
    }

    fn spray_at(now: DateTime<Utc>, token: &str, owner: i64) -> NewSpray {
        NewSpray {
            token: Token::parse(token).unwrap(),
            room: RoomId::parse("ROOM").unwrap(),
            owner: UserId::from_stored(owner).unwrap(),
            mode: SplitMode::Even,
            total_amount: Amount::new(15),
            shares: vec![Amount::new(5); 3],
            created_at: now,
            receive_until: now + TimeDelta::minutes(10),
            lookup_until: now + TimeDelta::days(7),
        }
    }

    fn claim_op(claim: Claim, idempotency: Option<PendingKey>) -> WriteOp {
        WriteOp::ClaimShare { claim, idempotency }
    }

    /// Runs `ops` as one batch through `writer`, and their answers in order.
    async fn one_batch(
        store: &SqliteStore,
        writer: impl BatchWriter,
        ops: Vec<WriteOp>,
    ) -> Vec<Result<WriteOutcome, StoreError>> {
        one_batch_through(store, &Arc::new(std::sync::Mutex::new(writer)), ops).await
    }

    /// Runs `ops` as one batch through `writer` on a thread outside the runtime, as the
    /// writer's own thread does, and their answers in order.
    async fn one_batch_through<W: BatchWriter>(
        store: &SqliteStore,
        writer: &Arc<std::sync::Mutex<W>>,
        ops: Vec<WriteOp>,
    ) -> Vec<Result<WriteOutcome, StoreError>> {
        let (writer, landed) = (writer.clone(), landed_through(store.reader.clone()));
        let runtime = tokio::runtime::Handle::current();
        let write = |batch| async move {
            tokio::task::spawn_blocking(move || {
                let mut writer = writer.lock().expect("a writer no batch left poisoned");
                write_batch(&mut *writer, batch, &landed, &runtime);
            })
            .await
            .expect("the batch's thread");
        };
        super::super::queue::as_one_batch(write, ops).await
    }

    async fn receivers(store: &SqliteStore) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT receiver_id FROM shares WHERE receiver_id IS NOT NULL ORDER BY receiver_id",
        )
        .fetch_all(&store.reader)
        .await
        .unwrap()
    }

    async fn credits(store: &SqliteStore) -> i64 {
        store
            .count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
            .await
            .unwrap()
    }

    /// A money writer of its own on the store's file.
    fn writer_of(store: &SqliteStore) -> SqliteWrites {
        let path = store.writer.connect_options().get_filename().to_path_buf();
        SqliteWrites::new(path, BUSY_TIMEOUT)
    }

    /// Every write of a batch answered 503, and nothing of it in the store.
    async fn assert_503_to_all_and_nothing_kept(
        store: &SqliteStore,
        answers: &[Result<WriteOutcome, StoreError>],
    ) {
        for answer in answers {
            assert!(matches!(answer, Err(StoreError::Unavailable(_))), "{answers:?}");
        }
        assert_eq!(
            receivers(store).await,
            Vec::<i64>::new(),
            "nothing of the batch is kept"
        );
        assert_eq!(credits(store).await, 0);
        assert!(crate::audit::run(store).await.unwrap().is_clean());
    }

    /// A pending row that does not exist: its lease counts as lost, which fails the write
    /// it is part of.
    fn lost_lease(user: i64) -> PendingKey {
        PendingKey {
            user: UserId::from_stored(user).unwrap(),
            endpoint: crate::domain::Endpoint::Receive,
            key: crate::domain::IdempotencyKey::parse("gone").unwrap(),
            lease: 1,
        }
    }

    #[tokio::test]
    async fn a_refused_or_failed_write_in_a_batch_leaves_its_neighbours_committed() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let now = claim(2).now;
        let answers = one_batch(
            &store,
            writer_of(&store),
            vec![
                claim_op(claim(2), None),
                // Refused by a rule: the sprayer.
                claim_op(claim(1), None),
                // Refused on what the batch wrote before it: user 2 holds a share now.
                claim_op(claim(2), None),
                // Fails (its idempotency lease is lost) after taking a share: rolled back.
                claim_op(claim(3), Some(lost_lease(3))),
                // Fails on a named constraint: the token is taken in the room.
                WriteOp::Spray {
                    spray: spray_at(now, "ABC", 9),
                    idempotency: None,
                },
                claim_op(claim(4), None),
            ],
        )
        .await;
        let outcomes: Vec<_> = answers
            .into_iter()
            .map(|a| a.map(|o| format!("{o:?}")).map_err(|e| e.to_string()))
            .collect();
        assert!(
            outcomes[0].as_ref().unwrap().starts_with("Claimed(Ok("),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1].as_deref(), Ok("Claimed(Err(OwnSpray))"));
        assert_eq!(outcomes[2].as_deref(), Ok("Claimed(Err(AlreadyReceived))"));
        assert!(outcomes[3].is_err(), "{outcomes:?}");
        assert!(
            outcomes[4].as_ref().is_err_and(|e| e.contains("token")),
            "{outcomes:?}"
        );
        assert!(
            outcomes[5].as_ref().unwrap().starts_with("Claimed(Ok("),
            "{outcomes:?}"
        );

        assert_eq!(
            receivers(&store).await,
            vec![2, 4],
            "user 3's share was rolled back alone"
        );
        assert_eq!(credits(&store).await, 2);
        assert_eq!(store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 1);
        assert!(crate::audit::run(&store).await.unwrap().is_clean());
    }

    /// A token held by a spray still inside its lookup window refuses a new spray without a
    /// write (the expired spray that also holds it keeps it); held only by an expired spray,
    /// it is given up and the new spray written.
    #[tokio::test]
    async fn a_taken_token_is_refused_before_anything_is_written() {
        let (_dir, store, now) = fresh_store().await;
        let mut expired = spray_at(now - TimeDelta::days(8), "ABC", 1);
        expired.room = RoomId::parse("R1").unwrap();
        store.insert_spray(&expired, None).await.unwrap();
        let mut live = spray_at(now, "ABC", 2);
        live.room = RoomId::parse("R2").unwrap();
        store.insert_spray(&live, None).await.unwrap();
        let token_holders = || async {
            store
                .count("SELECT COUNT(*) FROM sprays WHERE token_live = 1")
                .await
                .unwrap()
        };

        // In R1 by user 2: the expired spray holds the room's key, the live one user 2's.
        let mut refused = spray_at(now, "ABC", 2);
        refused.room = RoomId::parse("R1").unwrap();
        // In R1 by user 3: only the expired spray stands in the way.
        let mut written = spray_at(now, "ABC", 3);
        written.room = RoomId::parse("R1").unwrap();
        let spray_op = |spray: NewSpray| WriteOp::Spray {
            spray,
            idempotency: None,
        };
        let answers = one_batch(&store, writer_of(&store), vec![spray_op(refused)]).await;
        assert!(matches!(answers[0], Err(StoreError::TokenTaken)), "{answers:?}");
        assert_eq!(token_holders().await, 2, "the expired spray kept its token");
        let answers = one_batch(&store, writer_of(&store), vec![spray_op(written)]).await;
        assert!(answers[0].is_ok(), "{answers:?}");
        assert_eq!(token_holders().await, 2, "the expired spray gave it up");
        assert_eq!(store.count("SELECT COUNT(*) FROM sprays").await.unwrap(), 3);
        assert!(crate::audit::run(&store).await.unwrap().is_clean());
    }

    /// What a [`Faulty`] writer breaks.
    enum Fault {
        /// User 3's claim fails after it took its share (the database failing mid-write):
        /// that claim runs without a savepoint (no idempotency key).
        AfterUser3TookAShare,
        /// The real `COMMIT` is refused: every transaction also writes a share of a spray
        /// that does not exist, under a foreign-key check deferred to `COMMIT`, so nothing
        /// of the transaction is written.
        Commit,
        /// User 3's claim panics after it took its share (a bug), its transaction open.
        PanicAfterUser3TookAShare,
    }

    /// The store's batch writer with one fault injected.
    struct Faulty(SqliteWrites, Fault);

    impl BatchWriter for Faulty {
        fn begin(&mut self) -> Result<(), StoreError> {
            self.0.begin()?;
            if let Fault::Commit = self.1 {
                self.0.execute("PRAGMA defer_foreign_keys = ON")?;
                self.0
                    .execute("INSERT INTO shares (spray_id, slot, amount) VALUES (-1, 0, 1)")?;
            }
            Ok(())
        }

        fn run(&mut self, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
            let done = self.0.run(op)?;
            match (&self.1, op) {
                (Fault::AfterUser3TookAShare, WriteOp::ClaimShare { claim, .. }) if claim.user.get() == 3 => {
                    Err(StoreError::Unavailable(
                        "injected after the share was taken".into(),
                    ))
                }
                (Fault::PanicAfterUser3TookAShare, WriteOp::ClaimShare { claim, .. })
                    if claim.user.get() == 3 =>
                {
                    panic!("injected after the share was taken")
                }
                _ => Ok(done),
            }
        }

        fn execute(&mut self, statement: &str) -> Result<(), StoreError> {
            self.0.execute(statement)
        }

        fn commit(&mut self) -> Result<(), StoreError> {
            self.0.commit()
        }

        fn rollback(&mut self) {
            self.0.rollback();
        }
    }

    #[tokio::test]
    async fn a_write_without_a_savepoint_that_fails_breaks_off_its_batch_and_nothing_is_kept() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let answers = one_batch(
            &store,
            Faulty(writer_of(&store), Fault::AfterUser3TookAShare),
            vec![
                claim_op(claim(2), None),
                claim_op(claim(3), None),
                claim_op(claim(4), None),
            ],
        )
        .await;
        assert_503_to_all_and_nothing_kept(&store, &answers).await;
    }

    /// The writer's own thread, not a harness: a batch that panics on it is answered 503,
    /// and the thread lives on to write the next one.
    #[tokio::test]
    async fn the_writers_thread_outlives_a_batch_that_panics() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let batches = GroupCommit::start(
            Faulty(writer_of(&store), Fault::PanicAfterUser3TookAShare),
            store.turn.clone(),
            landed_through(store.reader.clone()),
        )
        .unwrap();
        let panicked = batches.write(claim_op(claim(3), None)).await;
        assert!(
            matches!(panicked, Err(StoreError::Unavailable(_))),
            "{panicked:?}"
        );

        let next = batches.write(claim_op(claim(2), None)).await;
        assert!(matches!(next, Ok(WriteOutcome::Claimed(Ok(_)))), "{next:?}");
        assert_eq!(receivers(&store).await, vec![2]);
        assert!(crate::audit::run(&store).await.unwrap().is_clean());
    }

    #[tokio::test]
    async fn a_batch_that_panics_answers_503_to_all_keeps_nothing_and_the_next_batch_is_written() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let writer = Arc::new(std::sync::Mutex::new(Faulty(
            writer_of(&store),
            Fault::PanicAfterUser3TookAShare,
        )));
        let batch = |users: Vec<i64>| {
            let ops = users
                .into_iter()
                .map(|user| claim_op(claim(user), None))
                .collect();
            one_batch_through(&store, &writer, ops)
        };
        let answers = batch(vec![2, 3, 4]).await;
        assert_503_to_all_and_nothing_kept(&store, &answers).await;

        // The writer goes on: the transaction the panic left open was rolled back.
        let answers = batch(vec![2, 4]).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Ok(WriteOutcome::Claimed(Ok(_))))),
            "{answers:?}"
        );
        assert_eq!(receivers(&store).await, vec![2, 4]);
        assert_eq!(credits(&store).await, 2);
        assert!(crate::audit::run(&store).await.unwrap().is_clean());
    }

    #[tokio::test]
    async fn a_batch_whose_commit_fails_answers_503_to_all_and_a_keyed_retry_succeeds_once() {
        let (_dir, store, claim) = store_with_a_spray().await;
        let now = claim(2).now;
        let request = IdempotentRequest {
            user: UserId::from_stored(2).unwrap(),
            endpoint: crate::domain::Endpoint::Receive,
            key: crate::domain::IdempotencyKey::parse("k1").unwrap(),
            fingerprint: crate::domain::Fingerprint::of(&serde_json::json!({"token": "ABC"}), Some("ROOM")),
            now,
            abandoned_before: now - TimeDelta::seconds(10),
            lease: 1,
        };
        let Begin::Run(pending) = store.begin_idempotent(&request).await.unwrap() else {
            panic!("a new key runs");
        };

        let answers = one_batch(
            &store,
            Faulty(writer_of(&store), Fault::Commit),
            vec![
                claim_op(claim(2), Some(pending.clone())),
                claim_op(claim(3), None),
                claim_op(claim(1), None),
            ],
        )
        .await;
        assert!(
            matches!(answers[0], Err(StoreError::Unavailable(_))),
            "{:?}",
            answers[0]
        );
        assert!(
            matches!(answers[1], Err(StoreError::Unavailable(_))),
            "{:?}",
            answers[1]
        );
        assert!(
            matches!(
                answers[2],
                Ok(WriteOutcome::Claimed(Err(ReceiveRefusal::OwnSpray)))
            ),
            "a refusal stands: {:?}",
            answers[2]
        );
        assert_eq!(
            receivers(&store).await,
            Vec::<i64>::new(),
            "nothing of the batch was written"
        );
        assert_eq!(credits(&store).await, 0);

        // What the HTTP layer does after a 503: release the key, so the retry runs afresh.
        store.release_idempotent(&pending).await.unwrap();
        let retry = IdempotentRequest {
            lease: 2,
            ..request.clone()
        };
        let Begin::Run(pending) = store.begin_idempotent(&retry).await.unwrap() else {
            panic!("the retry runs");
        };
        let received = store.claim_share(&claim(2), Some(&pending)).await.unwrap();
        assert_eq!(received, ClaimOutcome::Received(Amount::new(5)));
        let again = IdempotentRequest { lease: 3, ..request };
        match store.begin_idempotent(&again).await.unwrap() {
            Begin::Replay(kept) => assert_eq!(kept, Kept::Effect(Effect::Received(Amount::new(5)))),
            other => panic!("the second retry replays, got {other:?}"),
        }
        assert_eq!(receivers(&store).await, vec![2], "paid exactly once");
        assert_eq!(credits(&store).await, 1);
        assert!(crate::audit::run(&store).await.unwrap().is_clean());
    }
}
