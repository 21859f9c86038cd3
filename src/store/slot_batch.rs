//! Group commit of the gate's claims on MySQL: the slots the Redis gate hands out,
//! recorded many to a transaction by a few multi-row statements.
//!
//! On MySQL a claim's cost is its round trips, not its commit: InnoDB already lets
//! concurrent commits share one redo-log flush. A claim alone is six round trips (`BEGIN`,
//! the spray's shared lock, the point update, the share's amount, the CREDIT, `COMMIT`), so
//! savepoints (as `store/batch.rs` uses on SQLite) would only add two more per claim. A
//! batch here costs three round trips whatever it holds:
//!
//! 1. `BEGIN`, in the same round trip as 2 (see `store/batch_tx.rs`);
//! 2. in one round trip (`multi_row::run_together`), two reads known from the requests
//!    alone: the sprays' rows, read under the shared lock every claim takes (see
//!    `store/mysql.rs`: claims run side by side, a settlement waits for them), and the
//!    shares' rows, locked (`FOR UPDATE`, in primary-key order): from here no other
//!    transaction can take them;
//! 3. in one round trip, one `UPDATE` giving each share it can have to each claim, and
//!    one `INSERT` of every CREDIT;
//! 4. `COMMIT`, a round trip of its own: the rows the `UPDATE` changed are counted
//!    before anything is kept;
//!
//! and one statement more for each claim that carries an idempotency key (its kept effect,
//! in the same transaction as its money).
//!
//! Between 2 and 3 each claim is decided on the rows read under lock, in the order of the
//! batch, exactly as it would be decided alone after the claims before it had committed:
//! the spray gone, settled or closed at the claim's `now` is `Closed`; the share already
//! taken (in SQL, or by an earlier claim of the batch) is `Taken`; a user given another
//! share of the spray earlier in the batch is `AlreadyReceived`. The one fact not read
//! under lock is whether the user already holds a share of the spray from the SQL-only
//! path; then the unique key `shares_one_per_receiver` fails the `UPDATE`, and the batch is
//! rolled back and run again claim by claim, so that the one refusal cannot fail its
//! neighbours. A lost idempotency lease fails its claim alone (503, as it would alone): its
//! effect's update changed nothing, and its share is left out of the `UPDATE`.
//!
//! Nobody is answered before the commit is durable. A failed `COMMIT` is read back (see
//! `store/commit.rs`) by the first share the batch gave: the transaction is atomic, so all
//! of them landed or none did; if none did, every claim that was given a share is answered
//! 503 and its retry runs afresh, and the refusals stand.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::MySqlPool;

use super::batch_tx::BatchTransaction;
use super::commit::{TakenShare, Written};
use super::convert::{amount_from, millis, stored};
use super::error::{Unique, unique_violation};
use super::idempotency::lease_lost;
use super::multi_row::{Fallback, write_and_answer};
use super::queue::{KeyedBatchQueue, Linger, Reply};
use super::{Claim, Effect, PendingKey, SlotClaim, StoreError};
use crate::domain::Amount;

/// The most claims one batch holds: its statements stay far below MySQL's 65,535 bound
/// parameters, and its locks are held for a few milliseconds.
const MAX_BATCH: usize = 128;
/// Batch writers, each with a connection of its own, taking claims from one queue keyed by
/// their spray (`store/queue.rs`): batches of different sprays are written at once, by
/// whichever writers are free, and batches of one spray one after the other. Two batches of
/// one spray written at once were measured slower than one after the other: both insert
/// receivers into the same range of the unique key `shares_one_per_receiver`, whose
/// duplicate checks take next-key locks even at READ COMMITTED, so they waited on and
/// deadlocked with each other (with 4 writers taking from one queue, a 5,000-share spray:
/// 2,700 winners/s and 8 deadlocks, against 3,869 winners/s with one writer). Measured
/// again once batches locked their shares by primary key (2026-12-04, one spray's claims
/// spread over the 4 writers by slot): no deadlock, but 12,282 winners/s against
/// 14,000-16,000/s on one writer, in batches of 10.6 claims instead of 40: a batch costs
/// its round trips whatever it holds, so smaller ones cost more per claim. For the same
/// reason two writers rather than four (2026-12-06, the mixed workload of many sprays,
/// BENCHMARKS.md): a fifth more at the peak, and at the same offered rate a lower median
/// and the same p99.
const WRITERS: usize = 2;

/// One claim of a slot the gate handed out: `Store::claim_slot`'s arguments.
#[derive(Debug, Clone)]
pub(super) struct SlotRequest {
    pub(super) claim: Claim,
    pub(super) spray_id: i64,
    pub(super) slot: i64,
    pub(super) idempotency: Option<PendingKey>,
}

/// How a batch is written: by the multi-row statements of this module, with the claim-by-
/// claim way and the read-back supplied by the backend.
#[async_trait::async_trait]
pub(super) trait SlotWriter: Send + Sync + 'static {
    fn pool(&self) -> &MySqlPool;

    /// One claim alone, in a transaction of its own (retried on conflicts): the way a
    /// batch that one claim would fail is written instead.
    async fn claim_alone(&self, request: &SlotRequest) -> Result<SlotClaim, StoreError>;

    /// Whether `written` is in the database, read on a connection of its own.
    async fn landed(&self, written: Written) -> Result<bool, StoreError>;
}

/// The queue in front of the batch writers.
pub(super) struct SlotBatches(KeyedBatchQueue<SlotRequest, SlotClaim>);

impl SlotBatches {
    /// Starts [`WRITERS`] tasks, taking batches off one queue. They end when the
    /// `SlotBatches` is dropped.
    pub(super) fn start<W: SlotWriter>(writer: W) -> SlotBatches {
        let writer = Arc::new(writer);
        SlotBatches(KeyedBatchQueue::start(
            WRITERS,
            MAX_BATCH,
            Linger::WhileBusy,
            move |batch| {
                let writer = writer.clone();
                async move { write_batch(writer.as_ref(), batch).await }
            },
        ))
    }

    /// Queues the claim behind the other claims of its spray and waits for its answer,
    /// given once the batch holding it is durable.
    pub(super) async fn claim(&self, request: SlotRequest) -> Result<SlotClaim, StoreError> {
        self.0.send(request.spray_id.unsigned_abs(), request).await
    }
}

/// Writes one batch and answers every claim in it.
async fn write_batch<W: SlotWriter>(writer: &W, batch: Vec<(SlotRequest, Reply<SlotClaim>)>) {
    let (requests, replies): (Vec<SlotRequest>, Vec<Reply<SlotClaim>>) = batch.into_iter().unzip();
    write_and_answer(
        replies,
        || write_once(writer, &requests),
        |i| writer.claim_alone(&requests[i]),
    )
    .await;
}

/// What the batch decided for one claim before writing.
enum Decided {
    /// Given its share: `amount` is what it receives.
    Give { amount: Amount },
    /// Answered without a write.
    Answer(Result<SlotClaim, StoreError>),
}

/// One try at writing the batch in one transaction (see the module doc).
async fn write_once<W: SlotWriter>(
    writer: &W,
    requests: &[SlotRequest],
) -> Result<Vec<Result<SlotClaim, StoreError>>, Fallback> {
    let failed = |e: StoreError| Fallback::Failed(e);
    let mut tx = BatchTransaction::acquire(writer.pool()).await.map_err(failed)?;
    let decided = match decide_in(&mut tx, requests).await {
        Ok(decided) => decided,
        Err(e) => {
            tx.rollback().await;
            return Err(failed(e));
        }
    };
    let given: Vec<(&SlotRequest, Amount)> = requests
        .iter()
        .zip(&decided)
        .filter_map(|(request, decided)| match decided {
            Decided::Give { amount } => Some((request, *amount)),
            Decided::Answer(_) => None,
        })
        .collect();
    give_and_commit(tx, &given, |what| writer.landed(what)).await?;
    Ok(decided.into_iter().map(answer_of).collect())
}

/// Gives each share of `given` to its claimant, writes every CREDIT and commits `tx`,
/// reading the first share back with `landed` if the commit's answer is lost (see
/// `store/commit.rs`). Rolls `tx` back when there is nothing to give, when a claimant
/// already held a share of the spray (`OneByOne`) or when anything fails.
pub(super) async fn give_and_commit<F, Fut>(
    mut tx: BatchTransaction,
    given: &[(&SlotRequest, Amount)],
    landed: F,
) -> Result<(), Fallback>
where
    F: Fn(Written) -> Fut,
    Fut: std::future::Future<Output = Result<bool, StoreError>>,
{
    let Some(&(first, amount)) = given.first() else {
        tx.rollback().await;
        return Ok(());
    };
    match give_in(&mut tx, given).await {
        Ok(true) => {}
        Ok(false) => {
            tx.rollback().await;
            return Err(Fallback::OneByOne);
        }
        Err(e) => {
            tx.rollback().await;
            return Err(Fallback::Failed(e));
        }
    }
    let what = Written::share(
        &TakenShare {
            spray_id: first.spray_id,
            slot: first.slot,
            amount,
        },
        &first.claim,
    );
    // The COMMIT alone, not with the UPDATE before it: the counts that UPDATE answers are
    // checked before anything is kept (see `give_in`).
    tx.commit_after(&[], &what, || landed(what.clone()))
        .await
        .map_err(|ended| Fallback::Failed(ended.into()))
}

fn answer_of(decided: Decided) -> Result<SlotClaim, StoreError> {
    match decided {
        Decided::Give { amount } => Ok(SlotClaim::Received(amount)),
        Decided::Answer(answer) => answer,
    }
}

/// Locks the batch's sprays (shared) and shares (exclusive), decides each claim, and
/// records the effect of each keyed claim that is given its share.
async fn decide_in(tx: &mut BatchTransaction, requests: &[SlotRequest]) -> Result<Vec<Decided>, StoreError> {
    // The sprays under the shared lock, and the shares locked, in one round trip: both
    // statements are known from the requests alone.
    let mut spray_ids: Vec<i64> = requests.iter().map(|r| r.spray_id).collect();
    spray_ids.sort_unstable();
    spray_ids.dedup();
    let ids = spray_ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let sprays_sql =
        format!("SELECT id, receive_until, settled_at FROM sprays WHERE id IN ({ids}) LOCK IN SHARE MODE");
    let keys = share_keys(requests.iter().map(|r| (r.spray_id, r.slot)));
    let shares_sql = format!(
        "SELECT spray_id, slot, amount, receiver_id FROM shares WHERE {keys} ORDER BY spray_id, slot FOR UPDATE"
    );
    let answered = tx.run(&[sprays_sql, shares_sql]).await?;
    let [spray_rows, share_rows] = answered.as_slice() else {
        return Err(StoreError::Other("a batch's reads had no answer".into()));
    };
    // (receive_until, settled) by spray id.
    let sprays: HashMap<i64, (i64, bool)> = spray_rows
        .read::<(i64, i64, Option<i64>)>()?
        .into_iter()
        .map(|(id, until, settled)| (id, (until, settled.is_some())))
        .collect();
    // (amount, taken) by (spray, slot).
    let mut shares: HashMap<(i64, i64), (i64, bool)> = share_rows
        .read::<(i64, i64, i64, Option<i64>)>()?
        .into_iter()
        .map(|(spray, slot, amount, receiver)| ((spray, slot), (amount, receiver.is_some())))
        .collect();

    // Each claim in order, as if the ones before it had committed.
    let mut receivers: HashSet<(i64, i64)> = HashSet::new();
    let mut decided = Vec::with_capacity(requests.len());
    for request in requests {
        let now = millis(request.claim.now);
        let open = sprays
            .get(&request.spray_id)
            .is_some_and(|&(until, settled)| !settled && until > now);
        let share = shares.get_mut(&(request.spray_id, request.slot));
        let verdict = match share {
            _ if !open => Decided::Answer(Ok(SlotClaim::Closed)),
            // The spray is there but the slot is not: a gate that names a slot the spray
            // never had is stale; SQL alone will decide.
            None => Decided::Answer(Ok(SlotClaim::Taken)),
            Some((_, true)) => Decided::Answer(Ok(SlotClaim::Taken)),
            Some(_) if receivers.contains(&(request.spray_id, request.claim.user.get())) => {
                Decided::Answer(Ok(SlotClaim::AlreadyReceived))
            }
            Some((amount, taken)) => {
                let amount = amount_from(*amount)?;
                let effect = Effect::Received(amount);
                let pending = request.idempotency.as_ref();
                match tx.effect_recorded(pending, &effect, request.claim.now).await? {
                    true => {
                        *taken = true;
                        receivers.insert((request.spray_id, request.claim.user.get()));
                        Decided::Give { amount }
                    }
                    false => Decided::Answer(Err(lease_lost())),
                }
            }
        };
        decided.push(verdict);
    }
    Ok(decided)
}

/// Gives each share its claimant and writes every CREDIT: two statements. False if one of
/// the claimants already held a share of the spray (nothing changed then).
async fn give_in(tx: &mut BatchTransaction, given: &[(&SlotRequest, Amount)]) -> Result<bool, StoreError> {
    use std::fmt::Write as _;
    let keys = share_keys(given.iter().map(|(r, _)| (r.spray_id, r.slot)));
    let (mut receivers, mut times, mut credits) = (String::new(), String::new(), String::new());
    for (i, (request, amount)) in given.iter().enumerate() {
        let (spray, slot) = (request.spray_id, request.slot);
        let (user, at) = (request.claim.user.get(), millis(request.claim.now));
        let _ = write!(
            receivers,
            " WHEN spray_id = {spray} AND slot = {slot} THEN {user}"
        );
        let _ = write!(times, " WHEN spray_id = {spray} AND slot = {slot} THEN {at}");
        let separator = if i == 0 { "" } else { ", " };
        let _ = write!(
            credits,
            "{separator}({spray}, 'CREDIT', {user}, {}, {at})",
            stored(*amount)?
        );
    }
    let update = format!(
        "UPDATE shares SET receiver_id = CASE{receivers} END, received_at = CASE{times} END
         WHERE receiver_id IS NULL AND ({keys})"
    );
    // The CREDITs of the shares just given: their receivers and times as the UPDATE wrote
    // them, their amounts as read under lock. Written as values, not `INSERT … SELECT`
    // from the shares: MySQL's default auto-increment lock mode holds a table-level lock
    // on `ledger` to the end of every `INSERT … SELECT` (its row count is not known in
    // advance), so every batch's CREDITs and every new spray's DEBIT, from every writer
    // and instance, queued behind one another. Measured in the mixed workload (MariaDB's
    // slow log): such CREDIT inserts of one row took 15 to 50 ms.
    let credit = format!("INSERT INTO ledger (spray_id, kind, user_id, amount, at) VALUES {credits}");
    // Both in one round trip: MySQL stops at the first that fails, so the CREDITs are
    // never written without their shares.
    let answered = match tx.run(&[update, credit]).await {
        Ok(answered) => answered,
        // The UPDATE failed as a whole (InnoDB undoes the one statement).
        Err(e) if unique_violation(&e) == Some(Unique::SharesOnePerReceiver) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let [updated, credited] = answered.as_slice() else {
        return Err(StoreError::Other("a batch's writes had no answer".into()));
    };
    if updated.affected != u64::try_from(given.len()).unwrap_or(u64::MAX) {
        // The rows are locked and were read free: this cannot happen. Write nothing.
        return Err(StoreError::Other(format!(
            "a batch gave {} of {} locked free shares",
            updated.affected,
            given.len()
        )));
    }
    if credited.affected != updated.affected {
        return Err(StoreError::Other(format!(
            "a batch credited {} of {} shares",
            credited.affected,
            given.len()
        )));
    }
    Ok(true)
}

/// `(spray_id = 1 AND slot IN (3, 4)) OR …`, one group per spray: ranges of the primary
/// key, which MySQL reads (and locks) in key order. Integers only (see [`fetch_text`]).
fn share_keys(keys: impl Iterator<Item = (i64, i64)>) -> String {
    let mut by_spray: Vec<(i64, i64)> = keys.collect();
    by_spray.sort_unstable();
    by_spray.dedup();
    let mut groups: Vec<String> = Vec::new();
    for chunk in by_spray.chunk_by(|a, b| a.0 == b.0) {
        let slots = chunk
            .iter()
            .map(|(_, slot)| slot.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        groups.push(format!("(spray_id = {} AND slot IN ({slots}))", chunk[0].0));
    }
    groups.join(" OR ")
}

#[cfg(test)]
pub(super) mod tests {
    use crate::store::queue::as_one_batch;
    use chrono::{DateTime, TimeDelta, Utc};
    use sqlx::Connection;

    use super::*;
    use crate::domain::{Amount, Endpoint, IdempotencyKey, RoomId, SplitMode, Token, UserId};
    use crate::store::mysql::MySqlStore;
    use crate::store::{ClaimOutcome, NewSpray, Store};

    /// A migrated MySQL store in a fresh database, its name, and one spray of `shares`
    /// shares of 5 by user 1 (id, and the time it was made at).
    pub(crate) struct Fixture {
        pub(crate) store: MySqlStore,
        database: String,
        admin: String,
        pub(crate) spray_id: i64,
        pub(crate) now: DateTime<Utc>,
    }

    impl Fixture {
        pub(crate) async fn new(shares: u64) -> Fixture {
            let admin = std::env::var("SPRAY_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
            let database = format!("spray_u_{:016x}", rand::random::<u64>());
            let mut conn = sqlx::MySqlConnection::connect(&admin)
                .await
                .expect("MariaDB at SPRAY_TEST_MYSQL_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
                .execute(&mut conn)
                .await
                .unwrap();
            let _ = conn.close().await;
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
            let store = MySqlStore::connect(&format!("{base}/{database}"), 8)
                .await
                .unwrap();
            store.migrate().await.unwrap();
            let now = DateTime::parse_from_rfc3339("2024-02-21T09:33:10.123Z")
                .unwrap()
                .with_timezone(&Utc);
            let spray = NewSpray {
                token: Token::parse("ABC").unwrap(),
                room: RoomId::parse("ROOM").unwrap(),
                owner: UserId::from_stored(1).unwrap(),
                mode: SplitMode::Even,
                total_amount: Amount::new(5 * shares),
                shares: vec![Amount::new(5); usize::try_from(shares).unwrap()],
                created_at: now,
                receive_until: now + TimeDelta::minutes(10),
                lookup_until: now + TimeDelta::days(7),
            };
            let spray_id = store.insert_spray(&spray, None).await.unwrap();
            Fixture {
                store,
                database,
                admin,
                spray_id,
                now,
            }
        }

        pub(crate) fn claim(&self, user: i64) -> Claim {
            Claim {
                room: RoomId::parse("ROOM").unwrap(),
                token: Token::parse("ABC").unwrap(),
                user: UserId::from_stored(user).unwrap(),
                now: self.now,
            }
        }

        fn slot(&self, user: i64, slot: i64) -> SlotRequest {
            SlotRequest {
                claim: self.claim(user),
                spray_id: self.spray_id,
                slot,
                idempotency: None,
            }
        }

        /// The URL of the fixture's database.
        pub(crate) fn url(&self) -> String {
            let base = self
                .admin
                .rsplit_once('/')
                .map_or(self.admin.as_str(), |(base, _)| base);
            format!("{base}/{}", self.database)
        }

        pub(crate) fn writer(&self) -> crate::store::mysql::OneByOne {
            self.store.one_by_one()
        }

        /// `(slot, receiver)` of every share taken, and the number of CREDITs.
        pub(crate) async fn taken(&self) -> (Vec<(i64, i64)>, i64) {
            let pool = self.writer();
            let taken = sqlx::query_as::<_, (i64, i64)>(
                "SELECT slot, receiver_id FROM shares WHERE receiver_id IS NOT NULL ORDER BY slot",
            )
            .fetch_all(pool.pool())
            .await
            .unwrap();
            let credits = self
                .store
                .count("SELECT COUNT(*) FROM ledger WHERE kind = 'CREDIT'")
                .await
                .unwrap();
            (taken, credits)
        }

        pub(crate) async fn drop_database(self) {
            self.store.close().await;
            let mut conn = sqlx::MySqlConnection::connect(&self.admin).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {}", self.database)))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }

    /// Runs `requests` as one batch, and their answers in order.
    async fn one_batch<W: SlotWriter>(
        writer: &W,
        requests: Vec<SlotRequest>,
    ) -> Vec<Result<SlotClaim, StoreError>> {
        as_one_batch(|batch| write_batch(writer, batch), requests).await
    }

    fn received(answer: &Result<SlotClaim, StoreError>) -> bool {
        matches!(answer, Ok(SlotClaim::Received(a)) if *a == Amount::new(5))
    }

    #[tokio::test]
    async fn each_claim_of_a_batch_is_decided_as_alone_and_a_refusal_leaves_its_neighbours_committed() {
        let fx = Fixture::new(6).await;
        let mut lost = fx.slot(13, 2);
        lost.idempotency = Some(PendingKey {
            user: UserId::from_stored(13).unwrap(),
            endpoint: Endpoint::Receive,
            key: IdempotencyKey::parse("gone").unwrap(),
            lease: 1,
        });
        let mut late = fx.slot(14, 3);
        late.claim.now = fx.now + TimeDelta::minutes(10);
        let mut foreign = fx.slot(16, 0);
        foreign.spray_id = fx.spray_id + 1000;
        let answers = one_batch(
            &fx.writer(),
            vec![
                fx.slot(11, 0),
                // The share the claim before took.
                fx.slot(12, 0),
                // A second share to the same user.
                fx.slot(11, 1),
                // A lost idempotency lease.
                lost,
                // The window closed at this claim's time.
                late,
                // A spray that does not exist.
                foreign,
                // A slot the spray does not have.
                fx.slot(17, 9),
                fx.slot(15, 4),
            ],
        )
        .await;
        assert!(received(&answers[0]), "{:?}", answers[0]);
        assert!(matches!(answers[1], Ok(SlotClaim::Taken)), "{:?}", answers[1]);
        assert!(
            matches!(answers[2], Ok(SlotClaim::AlreadyReceived)),
            "{:?}",
            answers[2]
        );
        assert!(
            matches!(answers[3], Err(StoreError::Unavailable(_))),
            "{:?}",
            answers[3]
        );
        assert!(matches!(answers[4], Ok(SlotClaim::Closed)), "{:?}", answers[4]);
        assert!(matches!(answers[5], Ok(SlotClaim::Closed)), "{:?}", answers[5]);
        assert!(matches!(answers[6], Ok(SlotClaim::Taken)), "{:?}", answers[6]);
        assert!(received(&answers[7]), "{:?}", answers[7]);
        assert_eq!(fx.taken().await, (vec![(0, 11), (4, 15)], 2));
        fx.drop_database().await;
    }

    #[tokio::test]
    async fn a_claimant_who_already_holds_a_share_sends_the_batch_claim_by_claim() {
        let fx = Fixture::new(4).await;
        // User 21 takes slot 0 through the SQL-only claim, which the gate did not see.
        let sql_only = fx.store.claim_share(&fx.claim(21), None).await.unwrap();
        assert_eq!(sql_only, ClaimOutcome::Received(Amount::new(5)));
        let batch = vec![fx.slot(22, 1), fx.slot(21, 2), fx.slot(23, 3)];
        // As one batch the unique key refuses it...
        assert!(matches!(
            write_once(&fx.writer(), &batch).await,
            Err(Fallback::OneByOne)
        ));
        assert_eq!(
            fx.taken().await,
            (vec![(0, 21)], 1),
            "nothing of the refused batch is kept"
        );
        // ...so it is written claim by claim, and only user 21 is refused.
        let answers = one_batch(&fx.writer(), batch).await;
        assert!(received(&answers[0]), "{:?}", answers[0]);
        assert!(
            matches!(answers[1], Ok(SlotClaim::AlreadyReceived)),
            "{:?}",
            answers[1]
        );
        assert!(received(&answers[2]), "{:?}", answers[2]);
        assert_eq!(fx.taken().await, (vec![(0, 21), (1, 22), (3, 23)], 3));
        fx.drop_database().await;
    }

    /// Claims sent at once through the store share batches, and every share is given once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_share_batches_and_every_share_is_given_once() {
        const SHARES: i64 = 200;
        let fx = std::sync::Arc::new(Fixture::new(SHARES.unsigned_abs()).await);
        let mut claims = tokio::task::JoinSet::new();
        // Two claims for each slot, by different users: one of each pair must lose.
        for slot in 0..SHARES {
            for user in [1000 + slot, 2000 + slot] {
                let fx = fx.clone();
                claims.spawn(async move {
                    let claim = fx.claim(user);
                    fx.store.claim_slot(&claim, fx.spray_id, slot, None).await
                });
            }
        }
        let mut winners = 0;
        while let Some(answer) = claims.join_next().await {
            match answer.unwrap() {
                Ok(SlotClaim::Received(_)) => winners += 1,
                Ok(SlotClaim::Taken) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners, SHARES);
        let (taken, credits) = fx.taken().await;
        assert_eq!((i64::try_from(taken.len()).unwrap(), credits), (SHARES, SHARES));
        std::sync::Arc::into_inner(fx).unwrap().drop_database().await;
    }
}
