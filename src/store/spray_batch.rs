//! Group commit of new sprays on MySQL: many sprays to a transaction, written by a few
//! multi-row statements.
//!
//! A spray alone is six round trips (`BEGIN`, its row, its shares, its DEBIT, `COMMIT`, and
//! the pings sqlx adds around a pooled connection), and MariaDB's CPU, not the disk, was
//! the bound: about 700 µs of it per spray on this machine, most of it spent per statement.
//! A batch costs the same two round trips whatever it holds (`store/batch_tx.rs` sends
//! `BEGIN` and `COMMIT` with the statements around them):
//!
//! 1. `BEGIN`, one `INSERT` of every spray's row and one `SELECT` of their ids, by the
//!    unique key each row now holds (`multi_row::run_together`);
//! 2. one `INSERT` of every share (one per 500 shares), one of every DEBIT, and `COMMIT`;
//!
//! and, before 1, one statement for each spray that carries an idempotency key (its kept
//! effect; a lost lease fails that spray alone, 503, as it would alone, and it is left
//! out), with a `BEGIN` of its own.
//!
//! A new spray can be refused by one rule only: its token is taken among the live sprays
//! of its room or of its sprayer. Then the unique key fails the whole `INSERT`, the batch
//! is rolled back and run again spray by spray (`SprayWriter::spray_alone`, which makes a
//! spray whose lookup window has closed give the token up, and answers `TokenTaken` to the
//! one spray that still collides), so that one refusal cannot fail its neighbours.
//!
//! Nobody is answered before the commit is durable. A failed `COMMIT` is read back (see
//! `store/commit.rs`) by the batch's first spray: the transaction is atomic, so all of them
//! landed or none did; if none did, every spray of the batch is answered 503, nothing of it
//! was written, and a retry (with its idempotency key) runs afresh, exactly once.

use std::fmt::Write as _;
use std::sync::Arc;

use sqlx::MySqlPool;

use super::batch_tx::{BatchTransaction, Ending};
use super::commit::Written;
use super::convert::{millis, share_rows, stored};
use super::error::unique_violation;
use super::idempotency::lease_lost;
use super::multi_row::{Fallback, hex, write_and_answer};
use super::queue::{BatchQueue, Linger, Reply};
use super::{Effect, NewSpray, PendingKey, StoreError};

/// The most sprays one batch holds: its statements stay a few tens of kilobytes.
const MAX_BATCH: usize = 64;
/// Batch writers, each with a connection of its own, taking new sprays from one queue,
/// whichever is free: while one batch is written, the next fills up. Two, measured against
/// four and eight (2026-12-06, BENCHMARKS.md): more writers write smaller batches, and a
/// batch costs its round trips and its commit whatever it holds, so four gave 7-13% fewer
/// creates at the peak and no better tails at half of it, and eight fewer still.
const WRITERS: usize = 2;
/// Rows per multi-row `INSERT` of shares: a statement of a few kilobytes.
const SHARES_PER_INSERT: usize = 500;

/// One new spray: `Store::insert_spray`'s arguments.
#[derive(Debug, Clone)]
pub(super) struct SprayRequest {
    pub(super) spray: NewSpray,
    pub(super) idempotency: Option<PendingKey>,
}

/// How a batch is written: by the multi-row statements of this module, with the spray-by-
/// spray way and the read-back supplied by the backend.
#[async_trait::async_trait]
pub(super) trait SprayWriter: Send + Sync + 'static {
    fn pool(&self) -> &MySqlPool;

    /// One spray alone, in a transaction of its own (retried on conflicts): the way a
    /// batch with a taken token is written instead. Its id.
    async fn spray_alone(&self, request: &SprayRequest) -> Result<i64, StoreError>;

    /// Whether `written` is in the database, read on a connection of its own.
    async fn landed(&self, written: Written) -> Result<bool, StoreError>;

    /// Sends a batch's `last` statements with its `COMMIT`; `first` is what its first spray
    /// wrote, read back if the commit's answer is lost. (Tests make it fail.)
    async fn commit(&self, tx: BatchTransaction, last: &[String], first: &Written) -> Result<(), Ending> {
        tx.commit_after(last, first, || self.landed(first.clone())).await
    }
}

/// The queue in front of the batch writers.
pub(super) struct SprayBatches(BatchQueue<SprayRequest, i64>);

impl SprayBatches {
    /// Starts [`WRITERS`] tasks, taking batches off one queue. They end when the
    /// `SprayBatches` is dropped.
    pub(super) fn start<W: SprayWriter>(writer: W) -> SprayBatches {
        let writer = Arc::new(writer);
        SprayBatches(BatchQueue::start(
            WRITERS,
            MAX_BATCH,
            Linger::WhileBusy,
            move |batch| {
                let writer = writer.clone();
                async move { write_batch(writer.as_ref(), batch).await }
            },
        ))
    }

    /// Queues the spray and waits for its id, given once the batch holding it is durable.
    pub(super) async fn insert(&self, request: SprayRequest) -> Result<i64, StoreError> {
        self.0.send(request).await
    }
}

/// Writes one batch and answers every spray in it.
async fn write_batch<W: SprayWriter>(writer: &W, batch: Vec<(SprayRequest, Reply<i64>)>) {
    let (requests, replies): (Vec<SprayRequest>, Vec<Reply<i64>>) = batch.into_iter().unzip();
    write_and_answer(
        replies,
        || write_once(writer, &requests),
        |i| writer.spray_alone(&requests[i]),
    )
    .await;
}

/// One try at writing the batch in one transaction (see the module doc): each spray's id,
/// or its error.
async fn write_once<W: SprayWriter>(
    writer: &W,
    requests: &[SprayRequest],
) -> Result<Vec<Result<i64, StoreError>>, Fallback> {
    let failed = |e: StoreError| Fallback::Failed(e);
    let mut tx = BatchTransaction::acquire(writer.pool()).await.map_err(failed)?;
    let (written, last) = match write_in(&mut tx, requests).await {
        Ok(Some(written)) => written,
        Ok(None) => {
            tx.rollback().await;
            return Err(Fallback::OneByOne);
        }
        Err(e) => {
            tx.rollback().await;
            return Err(failed(e));
        }
    };
    let first = requests
        .iter()
        .zip(&written)
        .find_map(|(request, answer)| answer.as_ref().ok().map(|id| Written::spray(*id, &request.spray)));
    match first {
        Some(first) => writer
            .commit(tx, &last, &first)
            .await
            .map_err(|ended| failed(ended.into()))?,
        // Every spray lost its idempotency lease: nothing to keep.
        None => tx.rollback().await,
    }
    Ok(written)
}

/// The batch's first statements, in `tx`: each spray's id or error, and the statements
/// that go with the `COMMIT` (its shares and DEBITs); or `None` when a token was taken
/// (the transaction is then to be rolled back).
#[allow(clippy::type_complexity)]
async fn write_in(
    tx: &mut BatchTransaction,
    requests: &[SprayRequest],
) -> Result<Option<(Vec<Result<i64, StoreError>>, Vec<String>)>, StoreError> {
    // The kept effects first: a spray whose lease is lost is left out of the rows.
    let mut kept = Vec::with_capacity(requests.len());
    for request in requests {
        let spray = &request.spray;
        let effect = Effect::Sprayed(spray.created());
        let recorded = tx
            .effect_recorded(request.idempotency.as_ref(), &effect, spray.created_at)
            .await?;
        kept.push(recorded);
    }
    let sprays: Vec<&NewSpray> = requests
        .iter()
        .zip(&kept)
        .filter(|(_, kept)| **kept)
        .map(|(request, _)| &request.spray)
        .collect();
    let (mut ids, mut last) = (Vec::new(), Vec::new());
    if !sprays.is_empty() {
        let Some(inserted) = insert_rows_in(tx, &sprays).await? else {
            return Ok(None);
        };
        ids = inserted;
        last = shares_and_debits(&sprays, &ids)?;
    }
    let mut ids = ids.into_iter();
    let answers = kept
        .into_iter()
        .map(|kept| match kept {
            true => ids
                .next()
                .ok_or_else(|| StoreError::Other("a batch lost a spray's id".into())),
            false => Err(lease_lost()),
        })
        .collect();
    Ok(Some((answers, last)))
}

/// The sprays' rows, and their ids in the same order; `None` if a token is taken.
///
/// The ids are read back by the unique key each new row holds (room, token, live), not
/// computed from `LAST_INSERT_ID()`: MySQL 8's default auto-increment lock mode does not
/// promise one statement consecutive ids.
async fn insert_rows_in(
    tx: &mut BatchTransaction,
    sprays: &[&NewSpray],
) -> Result<Option<Vec<i64>>, StoreError> {
    let mut rows = String::new();
    let mut keys = String::new();
    for (i, spray) in sprays.iter().enumerate() {
        let separator = if i == 0 { "" } else { ", " };
        let (room, token) = (hex(spray.room.as_str()), hex(spray.token.as_str()));
        let recipient_count = spray.shares.len();
        let _ = write!(
            rows,
            "{separator}({room}, {token}, {}, '{}', {}, {recipient_count}, {}, {}, {})",
            spray.owner.get(),
            spray.mode.as_str(),
            stored(spray.total_amount)?,
            millis(spray.created_at),
            millis(spray.receive_until),
            millis(spray.lookup_until),
        );
        let _ = write!(keys, "{separator}({room}, {token}, 1)");
    }
    let insert = format!(
        "INSERT INTO sprays (room_id, token, owner_id, mode, total_amount, recipient_count,
                             created_at, receive_until, lookup_until)
         VALUES {rows}"
    );
    // Every id the statement gave is at least its first one (`LAST_INSERT_ID()`, which the
    // SELECT reads in the same session), and the live key (room, token) is unique: these
    // rows are exactly the batch's. Both in one round trip; the SELECT runs only if the
    // INSERT did.
    let select = format!(
        "SELECT id, room_id, token FROM sprays
         WHERE id >= LAST_INSERT_ID() AND (room_id, token, token_live) IN ({keys})"
    );
    let found: Vec<(i64, String, String)> = match tx.run(&[insert, select]).await {
        Ok(answered) => match answered.as_slice() {
            [_, selected] => selected.read()?,
            _ => return Err(StoreError::Other("a batch's sprays had no answer".into())),
        },
        Err(e) if unique_violation(&e).is_some_and(|u| u.is_token_taken()) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let by_key: std::collections::HashMap<(&str, &str), i64> = found
        .iter()
        .map(|(id, room, token)| ((room.as_str(), token.as_str()), *id))
        .collect();
    let ids = sprays
        .iter()
        .map(|spray| {
            by_key
                .get(&(spray.room.as_str(), spray.token.as_str()))
                .copied()
                .ok_or_else(|| StoreError::Other("a spray just inserted was not found".into()))
        })
        .collect::<Result<Vec<i64>, StoreError>>()?;
    Ok(Some(ids))
}

/// The statements of every spray's shares, in order of receipt, and of every sprayer's
/// DEBIT: they need nothing back, so they go with the `COMMIT`.
fn shares_and_debits(sprays: &[&NewSpray], ids: &[i64]) -> Result<Vec<String>, StoreError> {
    // Integers only, formatted from `i64` (see `fetch_text` in `store/multi_row.rs`).
    let mut shares = Vec::new();
    let mut debits = Vec::with_capacity(sprays.len());
    for (spray, id) in sprays.iter().zip(ids) {
        for (slot, amount) in share_rows(&spray.shares)? {
            shares.push(format!("({id}, {slot}, {amount})"));
        }
        debits.push(format!(
            "({id}, 'DEBIT', {}, {}, {})",
            spray.owner.get(),
            stored(spray.total_amount)?,
            millis(spray.created_at)
        ));
    }
    let mut inserts: Vec<String> = shares
        .chunks(SHARES_PER_INSERT)
        .map(|chunk| {
            format!(
                "INSERT INTO shares (spray_id, slot, amount) VALUES {}",
                chunk.join(", ")
            )
        })
        .collect();
    inserts.push(format!(
        "INSERT INTO ledger (spray_id, kind, user_id, amount, at) VALUES {}",
        debits.join(", ")
    ));
    Ok(inserts)
}

#[cfg(test)]
mod tests {
    use crate::store::queue::as_one_batch;
    use chrono::TimeDelta;

    use super::*;
    use crate::domain::{Amount, Endpoint, Fingerprint, IdempotencyKey, RoomId, SplitMode, Token, UserId};
    use crate::store::mysql::OneByOne;
    use crate::store::slot_batch::tests::Fixture;
    use crate::store::{Begin, IdempotentRequest, Kept, SprayLookup, Store};

    /// A spray of `shares` uneven shares (1, 2, …) in `room` under `token` by `owner`, made
    /// when the fixture's spray was.
    fn spray(fx: &Fixture, room: &str, token: &str, owner: i64, shares: u64) -> SprayRequest {
        let amounts: Vec<Amount> = (1..=shares).map(Amount::new).collect();
        SprayRequest {
            spray: NewSpray {
                token: Token::parse(token).unwrap(),
                room: RoomId::parse(room).unwrap(),
                owner: UserId::from_stored(owner).unwrap(),
                mode: SplitMode::Random,
                total_amount: Amount::new(shares * (shares + 1) / 2),
                shares: amounts,
                created_at: fx.now,
                receive_until: fx.now + TimeDelta::minutes(10),
                lookup_until: fx.now + TimeDelta::days(7),
            },
            idempotency: None,
        }
    }

    /// Runs `requests` as one batch, and their answers in order.
    async fn one_batch<W: SprayWriter>(
        writer: &W,
        requests: Vec<SprayRequest>,
    ) -> Vec<Result<i64, StoreError>> {
        as_one_batch(|batch| write_batch(writer, batch), requests).await
    }

    /// A pending row that does not exist: its lease counts as lost.
    fn lost_lease(user: i64) -> PendingKey {
        PendingKey {
            user: UserId::from_stored(user).unwrap(),
            endpoint: Endpoint::Spray,
            key: IdempotencyKey::parse("gone").unwrap(),
            lease: 1,
        }
    }

    async fn count(fx: &Fixture, sql: &'static str) -> i64 {
        fx.store.count(sql).await.unwrap()
    }

    #[tokio::test]
    async fn each_spray_of_a_batch_is_written_whole_and_a_lost_lease_fails_it_alone() {
        let fx = Fixture::new(1).await;
        let mut lost = spray(&fx, "R2", "LST", 4, 3);
        lost.idempotency = Some(lost_lease(4));
        let answers = one_batch(
            &fx.writer(),
            vec![
                // A room id with a quote and a backslash, as SQL would read them.
                spray(&fx, r"it's\", "QQQ", 2, 3),
                lost,
                spray(&fx, "R2", "ABC", 3, 600),
            ],
        )
        .await;
        let first = *answers[0].as_ref().unwrap();
        assert!(
            matches!(answers[1], Err(StoreError::Unavailable(_))),
            "{:?}",
            answers[1]
        );
        let third = *answers[2].as_ref().unwrap();
        assert!(first > fx.spray_id && third > first, "{answers:?}");

        // Each id names its own spray, with all of its shares, summing to its amount.
        let quoted = SprayLookup::Owner(UserId::from_stored(2).unwrap(), Token::parse("QQQ").unwrap());
        let record = fx.store.find_spray(&quoted).await.unwrap().unwrap();
        assert_eq!(
            (record.room.as_str(), record.total_amount),
            (r"it's\", Amount::new(6))
        );
        let shares_of = |id: i64| {
            let pool = fx.writer();
            async move {
                sqlx::query_as::<_, (i64, i64)>(
                    "SELECT COUNT(*), CAST(SUM(amount) AS SIGNED) FROM shares WHERE spray_id = ?",
                )
                .bind(id)
                .fetch_one(pool.pool())
                .await
                .unwrap()
            }
        };
        assert_eq!(shares_of(first).await.0, 3);
        assert_eq!(shares_of(third).await, (600, 180_300));
        assert_eq!(
            count(&fx, "SELECT COUNT(*) FROM sprays").await,
            3,
            "the lost lease wrote nothing"
        );
        assert_eq!(
            count(&fx, "SELECT COUNT(*) FROM ledger WHERE kind = 'DEBIT'").await,
            3
        );
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        fx.drop_database().await;
    }

    #[tokio::test]
    async fn a_taken_token_sends_the_batch_spray_by_spray_and_refuses_only_that_spray() {
        let fx = Fixture::new(1).await;
        // The fixture's spray holds ABC in ROOM.
        let batch = vec![
            spray(&fx, "R1", "XYZ", 2, 2),
            spray(&fx, "ROOM", "ABC", 3, 2),
            spray(&fx, "R3", "XYZ", 4, 2),
        ];
        assert!(matches!(
            write_once(&fx.writer(), &batch).await,
            Err(Fallback::OneByOne)
        ));
        assert_eq!(
            count(&fx, "SELECT COUNT(*) FROM sprays").await,
            1,
            "nothing of the refused batch is kept"
        );
        let answers = one_batch(&fx.writer(), batch).await;
        assert!(answers[0].is_ok(), "{:?}", answers[0]);
        assert!(
            matches!(answers[1], Err(StoreError::TokenTaken)),
            "{:?}",
            answers[1]
        );
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        assert_eq!(count(&fx, "SELECT COUNT(*) FROM sprays").await, 3);
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        fx.drop_database().await;
    }

    /// A writer whose commits fail: the batch's connection is killed from another one
    /// right before its `COMMIT`, so the server rolls the transaction back.
    struct CommitFails(OneByOne);

    #[async_trait::async_trait]
    impl SprayWriter for CommitFails {
        fn pool(&self) -> &MySqlPool {
            self.0.pool()
        }

        async fn spray_alone(&self, request: &SprayRequest) -> Result<i64, StoreError> {
            self.0.spray_alone(request).await
        }

        async fn landed(&self, written: Written) -> Result<bool, StoreError> {
            SprayWriter::landed(&self.0, written).await
        }

        async fn commit(
            &self,
            mut tx: BatchTransaction,
            last: &[String],
            first: &Written,
        ) -> Result<(), Ending> {
            let connection = tx.connection().await.map_err(Ending::Failed)?;
            let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                .fetch_one(connection)
                .await
                .map_err(|e| Ending::Failed(e.into()))?;
            sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                .execute(self.pool())
                .await
                .map_err(|e| Ending::Failed(e.into()))?;
            tx.commit_after(last, first, || SprayWriter::landed(&self.0, first.clone()))
                .await
        }
    }

    #[tokio::test]
    async fn a_batch_whose_commit_fails_answers_503_to_all_and_a_keyed_retry_succeeds_once() {
        let fx = Fixture::new(1).await;
        let keyed = spray(&fx, "R1", "KEY", 2, 4);
        let request = IdempotentRequest {
            user: UserId::from_stored(2).unwrap(),
            endpoint: Endpoint::Spray,
            key: IdempotencyKey::parse("k1").unwrap(),
            fingerprint: Fingerprint::of(&serde_json::json!({"amount": 10, "count": 4}), Some("R1")),
            now: fx.now,
            abandoned_before: fx.now - TimeDelta::seconds(10),
            lease: 1,
        };
        let Begin::Run(pending) = fx.store.begin_idempotent(&request).await.unwrap() else {
            panic!("a new key runs");
        };
        let mut first = keyed.clone();
        first.idempotency = Some(pending.clone());
        let answers = one_batch(
            &CommitFails(fx.writer()),
            vec![first, spray(&fx, "R2", "XYZ", 3, 2)],
        )
        .await;
        for answer in &answers {
            assert!(matches!(answer, Err(StoreError::Unavailable(_))), "{answers:?}");
        }
        assert_eq!(
            count(&fx, "SELECT COUNT(*) FROM sprays").await,
            1,
            "nothing of the batch was written"
        );
        assert_eq!(count(&fx, "SELECT COUNT(*) FROM ledger").await, 1);

        // What the HTTP layer does after a 503: release the key, so the retry runs afresh.
        fx.store.release_idempotent(&pending).await.unwrap();
        let retry = IdempotentRequest {
            lease: 2,
            ..request.clone()
        };
        let Begin::Run(pending) = fx.store.begin_idempotent(&retry).await.unwrap() else {
            panic!("the retry runs");
        };
        fx.store.insert_spray(&keyed.spray, Some(&pending)).await.unwrap();
        let again = IdempotentRequest { lease: 3, ..request };
        match fx.store.begin_idempotent(&again).await.unwrap() {
            Begin::Replay(kept) => assert_eq!(kept, Kept::Effect(Effect::Sprayed(keyed.spray.created()))),
            other => panic!("the second retry replays, got {other:?}"),
        }
        assert_eq!(
            count(&fx, "SELECT COUNT(*) FROM sprays").await,
            2,
            "sprayed exactly once"
        );
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        fx.drop_database().await;
    }

    /// Sprays sent at once through the store share batches; of those that draw the same
    /// token in one room exactly one is written, and every other one is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sprays_share_batches_and_a_taken_token_refuses_only_its_own() {
        const SPRAYS: i64 = 300;
        const SAME_TOKEN: i64 = 20;
        let fx = Arc::new(Fixture::new(1).await);
        let mut sprays = tokio::task::JoinSet::new();
        for n in 0..SPRAYS {
            let request = if n < SAME_TOKEN {
                spray(&fx, "CROWD", "TOK", 100 + n, 3)
            } else {
                spray(&fx, &format!("R{n}"), "TOK", 100 + n, 3)
            };
            let fx = fx.clone();
            sprays.spawn(async move { (n, fx.store.insert_spray(&request.spray, None).await) });
        }
        let (mut written, mut crowd_written) = (0, 0);
        while let Some(joined) = sprays.join_next().await {
            match joined.unwrap() {
                (n, Ok(_)) => {
                    written += 1;
                    if n < SAME_TOKEN {
                        crowd_written += 1;
                    }
                }
                (n, Err(StoreError::TokenTaken)) if n < SAME_TOKEN => {}
                (n, other) => panic!("spray {n}: unexpected {other:?}"),
            }
        }
        assert_eq!(crowd_written, 1, "one spray holds the token in the crowded room");
        assert_eq!(written, SPRAYS - SAME_TOKEN + 1);
        assert_eq!(count(&fx, "SELECT COUNT(*) FROM sprays").await, written + 1);
        assert_eq!(count(&fx, "SELECT COUNT(*) FROM shares").await, 3 * written + 1);
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        Arc::into_inner(fx).unwrap().drop_database().await;
    }
}
