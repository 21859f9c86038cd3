//! The transaction of a MySQL batch (`store/spray_batch.rs`, `store/slot_batch.rs`,
//! `store/claim_batch.rs`), whose `BEGIN` travels with its first statements and whose
//! `COMMIT` can travel with its last: a round trip each saved.
//!
//! sqlx's `Transaction` sends `BEGIN` and `COMMIT` as round trips of their own, and a
//! batch is only a few round trips: a batch of new sprays was four (`BEGIN`, its rows, its
//! shares and DEBITs, `COMMIT`) and is now two. Measured side by side (BENCHMARKS.md), it
//! took MySQL creates from about 11,900/s to 12,900/s.
//!
//! What the folding must not change:
//!
//! - **A transaction left open is never handed to someone else.** sqlx does not know of a
//!   transaction begun by a statement, so a connection whose transaction did not end
//!   cleanly (an error, a panic, a future dropped) is closed instead of going back to the
//!   pool, and the server rolls its transaction back ([`Drop`]).
//! - **A refusal before the commit commits nothing.** MySQL runs a multi-statement in
//!   order and stops at the first that fails, so a statement refused (a unique key, a
//!   deadlock) means the `COMMIT` after it never ran: [`Ending::Refused`], with the
//!   transaction rolled back.
//! - **A lost answer to the commit is read back.** Any other failure of the round trip
//!   that holds the `COMMIT` (the connection dropped, the server killed, the `COMMIT`
//!   itself failing) may or may not have committed: the outcome is read back from what the
//!   batch wrote (`store/commit.rs`), as for a `COMMIT` sent alone.

use std::future::Future;

use sqlx::pool::PoolConnection;
use sqlx::{Executor, MySql, MySqlConnection, MySqlPool};

use chrono::{DateTime, Utc};

use super::commit::{Written, confirm_commit};
use super::multi_row::{Answered, run_together};
use super::mysql::portable::effect_recorded_in;
use super::{Effect, PendingKey, StoreError};

/// One batch's transaction on a pooled connection.
pub(super) struct BatchTransaction {
    connection: PoolConnection<MySql>,
    /// `BEGIN` has been sent and the transaction has not ended cleanly since.
    open: bool,
}

/// How a commit that did not succeed ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// A statement before the `COMMIT` was refused (its error): nothing was committed.
    Refused(sqlx::Error),
    /// The commit did not land, or whether it did could not be found out (503).
    Failed(StoreError),
}

impl From<Ending> for StoreError {
    /// What a batch answers for a commit that did not succeed: the refusal's error, or
    /// the failure's.
    fn from(ending: Ending) -> StoreError {
        match ending {
            Ending::Refused(e) => e.into(),
            Ending::Failed(e) => e,
        }
    }
}

impl BatchTransaction {
    /// A connection from `pool`; the transaction begins with the first statements.
    pub(super) async fn acquire(pool: &MySqlPool) -> Result<BatchTransaction, StoreError> {
        Ok(BatchTransaction {
            connection: pool.acquire().await?,
            open: false,
        })
    }

    /// Runs `statements` in one round trip (see `multi_row::run_together`), after `BEGIN`
    /// in the same round trip if the transaction has not begun.
    pub(super) async fn run(&mut self, statements: &[String]) -> Result<Vec<Answered>, sqlx::Error> {
        let begin = !self.open;
        let sent = self.with_begin(statements);
        let answered = run_together(&mut *self.connection, &sent)
            .await
            .map_err(|(_, e)| e)?;
        Ok(answered.into_iter().skip(usize::from(begin)).collect())
    }

    /// The connection, inside the transaction (begun now if it has not), for a statement
    /// of its own.
    pub(super) async fn connection(&mut self) -> Result<&mut MySqlConnection, StoreError> {
        if !self.open {
            self.open = true;
            self.connection.execute("BEGIN").await?;
        }
        Ok(&mut *self.connection)
    }

    /// Records `effect` on the pending idempotency row inside the transaction (see
    /// `effect_recorded_in`): true, without a statement, when there is no key.
    pub(super) async fn effect_recorded(
        &mut self,
        pending: Option<&PendingKey>,
        effect: &Effect,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if pending.is_none() {
            return Ok(true);
        }
        effect_recorded_in(self.connection().await?, pending, effect, now).await
    }

    /// Runs `statements` and `COMMIT` in one round trip (after `BEGIN` if the transaction
    /// has not begun). `first` is something the transaction wrote, read back with `landed`
    /// if the answer is lost (see the module doc).
    pub(super) async fn commit_after<F, Fut>(
        mut self,
        statements: &[String],
        first: &Written,
        landed: F,
    ) -> Result<(), Ending>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, StoreError>>,
    {
        let before = statements.len() + usize::from(!self.open);
        let mut sent = self.with_begin(statements);
        sent.push("COMMIT".to_owned());
        match run_together(&mut *self.connection, &sent).await {
            Ok(_) => {
                self.open = false;
                Ok(())
            }
            // Refused before the COMMIT was reached: it never ran.
            Err((answered, e @ sqlx::Error::Database(_))) if answered < before => {
                self.rollback().await;
                Err(Ending::Refused(e))
            }
            // The connection is left to be closed (`open` stays set).
            Err((_, e)) => confirm_commit(e.into(), first, landed)
                .await
                .map_err(Ending::Failed),
        }
    }

    /// Ends the transaction without keeping anything. A connection that cannot be rolled
    /// back is closed, which rolls it back.
    pub(super) async fn rollback(&mut self) {
        if self.open && self.connection.execute("ROLLBACK").await.is_ok() {
            self.open = false;
        }
    }

    /// `statements`, after `BEGIN` if the transaction has not begun; it counts as begun
    /// from here, whatever the round trip's fate.
    fn with_begin(&mut self, statements: &[String]) -> Vec<String> {
        let mut sent = Vec::with_capacity(statements.len() + 2);
        if !self.open {
            self.open = true;
            sent.push("BEGIN".to_owned());
        }
        sent.extend_from_slice(statements);
        sent
    }
}

impl Drop for BatchTransaction {
    fn drop(&mut self) {
        if self.open {
            self.connection.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slot_batch::tests::Fixture;

    fn share() -> Written {
        Written::Share {
            spray_id: -1,
            slot: 0,
            user: 1,
            received_at: 0,
        }
    }

    async fn marks(pool: &MySqlPool) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM batch_tx_marks")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// A table of its own in the fixture's database, and a pool of one connection: the
    /// connection a dropped transaction left behind is the one the next caller would get.
    async fn one_connection(fx: &Fixture) -> MySqlPool {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&fx.url())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE batch_tx_marks (n INT PRIMARY KEY) ENGINE=InnoDB")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    /// A transaction that has inserted mark 1 and not committed, and its connection's id.
    async fn one_mark_inserted(pool: &MySqlPool) -> (BatchTransaction, u64) {
        let mut tx = BatchTransaction::acquire(pool).await.unwrap();
        tx.run(&["INSERT INTO batch_tx_marks VALUES (1)".to_owned()])
            .await
            .unwrap();
        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(tx.connection().await.unwrap())
            .await
            .unwrap();
        (tx, id)
    }

    #[tokio::test]
    async fn a_transaction_dropped_before_its_commit_keeps_nothing_and_its_connection_is_not_reused() {
        let fx = Fixture::new(1).await;
        let pool = one_connection(&fx).await;
        let (tx, id) = one_mark_inserted(&pool).await;
        drop(tx);
        // The next caller does not find itself inside the abandoned transaction.
        let mut next = pool.acquire().await.unwrap();
        let (other, open): (u64, u64) = sqlx::query_as("SELECT CONNECTION_ID(), @@in_transaction")
            .fetch_one(&mut *next)
            .await
            .unwrap();
        assert_ne!(other, id, "the abandoned connection went back to the pool");
        assert_eq!(open, 0);
        drop(next);
        assert_eq!(marks(&pool).await, 0, "nothing of it was kept");
        pool.close().await;
        fx.drop_database().await;
    }

    #[tokio::test]
    async fn statements_and_commit_in_one_round_trip_keep_everything() {
        let fx = Fixture::new(1).await;
        let pool = one_connection(&fx).await;
        let mut tx = BatchTransaction::acquire(&pool).await.unwrap();
        let answered = tx
            .run(&[
                "INSERT INTO batch_tx_marks VALUES (1), (2)".to_owned(),
                "SELECT @@in_transaction".to_owned(),
            ])
            .await
            .unwrap();
        assert_eq!(answered.len(), 2, "BEGIN's own answer is not the caller's");
        assert_eq!(answered[0].affected, 2);
        assert_eq!(answered[1].read::<(u64,)>().unwrap(), vec![(1,)]);
        let landed = || async { panic!("a commit that succeeded is not read back") };
        tx.commit_after(
            &["INSERT INTO batch_tx_marks VALUES (3)".to_owned()],
            &share(),
            landed,
        )
        .await
        .unwrap();
        assert_eq!(marks(&pool).await, 3);
        // The connection went back to the pool outside any transaction.
        let open: u64 = sqlx::query_scalar("SELECT @@in_transaction")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(open, 0);
        pool.close().await;
        fx.drop_database().await;
    }

    #[tokio::test]
    async fn a_statement_refused_before_the_commit_commits_nothing() {
        let fx = Fixture::new(1).await;
        let pool = one_connection(&fx).await;
        let mut tx = BatchTransaction::acquire(&pool).await.unwrap();
        tx.run(&["INSERT INTO batch_tx_marks VALUES (1)".to_owned()])
            .await
            .unwrap();
        let landed = || async { panic!("a refusal before the commit is not read back") };
        let ended = tx
            .commit_after(
                &[
                    "INSERT INTO batch_tx_marks VALUES (2)".to_owned(),
                    // The primary key refuses it: the COMMIT after it must not run.
                    "INSERT INTO batch_tx_marks VALUES (1)".to_owned(),
                ],
                &share(),
                landed,
            )
            .await;
        match ended {
            Err(Ending::Refused(sqlx::Error::Database(e))) => assert!(e.is_unique_violation(), "{e}"),
            other => panic!("expected the refusal, got {other:?}"),
        }
        assert_eq!(
            marks(&pool).await,
            0,
            "neither the first round trip nor the second was kept"
        );
        pool.close().await;
        fx.drop_database().await;
    }

    #[tokio::test]
    async fn a_commit_whose_connection_dies_is_read_back() {
        let fx = Fixture::new(1).await;
        let pool = one_connection(&fx).await;
        let (tx, id) = one_mark_inserted(&pool).await;
        let other = fx.writer();
        sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
            .execute(other.pool())
            .await
            .unwrap();
        let asked = std::sync::atomic::AtomicU32::new(0);
        let landed = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok(false) }
        };
        let ended = tx
            .commit_after(
                &["INSERT INTO batch_tx_marks VALUES (2)".to_owned()],
                &share(),
                landed,
            )
            .await;
        assert!(
            matches!(ended, Err(Ending::Failed(StoreError::Unavailable(_)))),
            "{ended:?}"
        );
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the outcome was read back"
        );
        assert_eq!(marks(&pool).await, 0);
        pool.close().await;
        fx.drop_database().await;
    }
}
