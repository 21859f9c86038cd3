//! Group commit: many money writes in one transaction and one durable commit.
//!
//! A durable commit costs a flush to disk (SQLite `synchronous=FULL`) or a round trip and
//! a redo-log flush (MySQL), whatever the transaction holds; a claim or a new spray is a
//! few small statements. So writing each in a transaction of its own spends most of the
//! time committing. Here, writes that arrive while a batch is being written queue up, and
//! the next batch takes every one of them (up to [`MAX_BATCH`]): one `BEGIN`, each write
//! in its own savepoint, one `COMMIT`. Nothing waits on purpose for a batch to fill: under
//! light load a batch holds one write and costs what it did before, under heavy load the
//! batches grow by themselves (WeChat's red packets queue the claims of one packet in front
//! of the database for the same reason).
//!
//! What a batch keeps and answers:
//!
//! - Each write runs in a savepoint (but see `WriteOp::needs_savepoint`: a claim or a new
//!   spray without an idempotency key needs none). One that is refused (a rule, a taken token, a lost
//!   idempotency lease) or fails is rolled back to its savepoint alone; its neighbours go
//!   on. Its answer is the same as it would have been alone, because it ran on the same
//!   state: every write before it in the batch, exactly as if they had committed first.
//! - Nobody is answered before the commit that holds their write is durable. A commit
//!   that fails is read back (see `store/commit.rs`) by the first write it held: a
//!   transaction is atomic, so all of them landed or none did. When none did (or it cannot
//!   be known), every write the batch kept is answered 503, and nothing was written; a
//!   retry (with its idempotency key) then runs afresh, exactly once.
//! - If the transaction itself breaks (a savepoint cannot be released or rolled back: the
//!   database rolled the whole transaction back, as MySQL does on a deadlock; or a write
//!   without a savepoint fails), every write of the batch is answered 503 and none is kept.

use async_trait::async_trait;

use super::commit::{TakenShare, Written, commit_and_confirm};
use super::queue::{BatchQueues, Reply};
use super::{Claim, ClaimOutcome, NewSpray, PendingKey, SettleOutcome, SlotClaim, StoreError};
use crate::domain::ReceiveRefusal;

/// The most writes one transaction holds. A batch this size holds its write lock for a
/// few milliseconds; more would only make the first write of the batch wait longer.
pub(super) const MAX_BATCH: usize = 128;

/// One money write, as a batch runs it.
#[derive(Clone)]
pub(super) enum WriteOp {
    /// `Store::insert_spray`.
    Spray {
        spray: NewSpray,
        idempotency: Option<PendingKey>,
    },
    /// `Store::claim_share`: the SQL-only claim.
    ClaimShare {
        claim: Claim,
        idempotency: Option<PendingKey>,
    },
    /// `Store::claim_slot`: the gate's point update.
    ClaimSlot {
        claim: Claim,
        spray_id: i64,
        slot: i64,
        idempotency: Option<PendingKey>,
    },
    /// `Store::settle_spray`.
    Settle {
        spray_id: i64,
        now: chrono::DateTime<chrono::Utc>,
    },
}

impl WriteOp {
    /// Whether the write must run in a savepoint of its own: whether it can change a row
    /// and then still be refused or fail by itself. A claim or a new spray without an
    /// idempotency key cannot: every rule that refuses it is decided by reads, or by the one
    /// statement that takes its share or inserts its row, which changes nothing when it
    /// refuses (a failed statement is rolled back alone; for a taken token see
    /// `insert_spray_row_in` in `store/sqlite.rs`). So it runs without one, two statements
    /// fewer, and an error in it (only the database can cause one) breaks off the whole
    /// batch, 503 to all, as a broken savepoint does. A settlement and any keyed write (a
    /// lost lease after the money) keep theirs.
    fn needs_savepoint(&self) -> bool {
        !matches!(
            self,
            WriteOp::ClaimShare {
                idempotency: None,
                ..
            } | WriteOp::ClaimSlot {
                idempotency: None,
                ..
            } | WriteOp::Spray {
                idempotency: None,
                ..
            }
        )
    }
}

/// What a write did inside its savepoint.
#[derive(Debug, Clone, Copy)]
pub(super) enum WriteOutcome {
    Sprayed(i64),
    Claimed(Result<TakenShare, ReceiveRefusal>),
    ClaimedSlot(SlotClaim),
    Settled(SettleOutcome),
}

/// Whether a write's savepoint is kept, and how to find the write again after a lost
/// commit.
enum Keep {
    /// Rolled back to its savepoint: a refusal, or nothing to change.
    No,
    /// Kept; `Some` names what it wrote, to be read back if the commit fails.
    Yes(Option<Written>),
}

impl WriteOutcome {
    fn keep(&self, op: &WriteOp) -> Keep {
        match (self, op) {
            (WriteOutcome::Sprayed(id), WriteOp::Spray { spray, .. }) => {
                Keep::Yes(Some(Written::spray(*id, spray)))
            }
            (WriteOutcome::Claimed(Ok(taken)), WriteOp::ClaimShare { claim, .. }) => {
                Keep::Yes(Some(Written::share(taken, claim)))
            }
            (
                WriteOutcome::ClaimedSlot(SlotClaim::Received(amount)),
                WriteOp::ClaimSlot {
                    claim,
                    spray_id,
                    slot,
                    ..
                },
            ) => Keep::Yes(Some(Written::share(
                &TakenShare {
                    spray_id: *spray_id,
                    slot: *slot,
                    amount: *amount,
                },
                claim,
            ))),
            // A settlement is not read back: nobody is answered, and the next sweeper pass
            // settles the spray or finds it settled (the update is conditional).
            (WriteOutcome::Settled(SettleOutcome::Refunded(_) | SettleOutcome::Completed), _) => {
                Keep::Yes(None)
            }
            _ => Keep::No,
        }
    }
}

/// A backend's side of group commit: how it begins a write transaction, runs one write in
/// it and reads a write back.
#[async_trait]
pub(super) trait BatchWriter: Send + Sync + 'static {
    type Db: sqlx::Database;

    /// Begins a write transaction.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, Self::Db>, StoreError>;

    /// Runs `op` in `tx` (inside a savepoint the batch has opened).
    async fn run(
        &self,
        tx: &mut sqlx::Transaction<'static, Self::Db>,
        op: &WriteOp,
    ) -> Result<WriteOutcome, StoreError>;

    /// Runs a statement without arguments in `tx` (the savepoints).
    async fn execute(
        &self,
        tx: &mut sqlx::Transaction<'static, Self::Db>,
        statement: &'static str,
    ) -> Result<(), StoreError>;

    /// Whether `written` is in the database, read on a connection of its own.
    async fn landed(&self, written: Written) -> Result<bool, StoreError>;
}

/// The queue in front of a backend's writer: [`GroupCommit::write`] queues one write and
/// waits for the batch that holds it to be committed.
pub(super) struct GroupCommit(BatchQueues<WriteOp, WriteOutcome>);

impl GroupCommit {
    /// Starts the task that writes the batches of `writer`, one at a time. It ends when
    /// the `GroupCommit` is dropped.
    pub(super) fn start<W: BatchWriter>(writer: W) -> GroupCommit {
        let writer = std::sync::Arc::new(writer);
        GroupCommit(BatchQueues::start(1, MAX_BATCH, move |batch| {
            let writer = writer.clone();
            async move { write_batch(writer.as_ref(), batch).await }
        }))
    }

    /// Queues `op` and waits for its answer, given once the batch holding it is durable.
    pub(super) async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.0.send(op).await
    }
}

/// A write that has run: its reply, its outcome and whether its savepoint was kept.
struct Ran {
    reply: Reply<WriteOutcome>,
    outcome: Result<WriteOutcome, StoreError>,
    kept: bool,
}

/// Writes one batch: see the module doc.
pub(super) async fn write_batch<W: BatchWriter>(writer: &W, batch: Vec<(WriteOp, Reply<WriteOutcome>)>) {
    let size = batch.len();
    let mut tx = match writer.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch.into_iter().map(|(_, reply)| reply), &e),
    };
    let mut ran = Vec::with_capacity(size);
    let mut written: Option<Written> = None;
    let mut replies = batch.into_iter();
    while let Some((op, reply)) = replies.next() {
        if !op.needs_savepoint() {
            // Refused without a write, or kept: any error breaks off the batch.
            match writer.run(&mut tx, &op).await {
                Ok(done) => {
                    let kept = match done.keep(&op) {
                        Keep::Yes(what) => {
                            written = written.or(what);
                            true
                        }
                        Keep::No => false,
                    };
                    ran.push(Ran {
                        reply,
                        outcome: Ok(done),
                        kept,
                    });
                }
                // The one refusal carried as an error: decided before anything was written.
                Err(StoreError::TokenTaken) => ran.push(Ran {
                    reply,
                    outcome: Err(StoreError::TokenTaken),
                    kept: false,
                }),
                Err(e) => return abort(tx, ran, reply, replies, &e).await,
            }
            continue;
        }
        if let Err(e) = writer.execute(&mut tx, "SAVEPOINT w").await {
            return abort(tx, ran, reply, replies, &e).await;
        }
        let outcome = writer.run(&mut tx, &op).await;
        let keep = match &outcome {
            Ok(done) => done.keep(&op),
            Err(_) => Keep::No,
        };
        let ended = match keep {
            Keep::Yes(what) => {
                written = written.or(what);
                writer
                    .execute(&mut tx, "RELEASE SAVEPOINT w")
                    .await
                    .map(|()| true)
            }
            Keep::No => match writer.execute(&mut tx, "ROLLBACK TO SAVEPOINT w").await {
                Ok(()) => writer
                    .execute(&mut tx, "RELEASE SAVEPOINT w")
                    .await
                    .map(|()| false),
                Err(e) => Err(e),
            },
        };
        match ended {
            Ok(kept) => ran.push(Ran { reply, outcome, kept }),
            Err(e) => return abort(tx, ran, reply, replies, &e).await,
        }
    }
    let kept = ran.iter().filter(|r| r.kept).count();
    crate::telemetry::metrics::record_batch(size);
    let committed = if kept == 0 {
        // Nothing to keep: every write was refused or failed, and was rolled back.
        tx.rollback().await.map_err(StoreError::from)
    } else {
        match &written {
            Some(what) => commit_and_confirm(tx, what, || writer.landed(what.clone())).await,
            None => tx.commit().await.map_err(StoreError::from),
        }
    };
    match committed {
        Ok(()) => {
            for r in ran {
                let _ = r.reply.send(r.outcome);
            }
        }
        Err(e) => {
            for r in ran {
                // A refusal stands as it was decided; only what was to be kept is lost.
                let answer = if r.kept { Err(unavailable(&e)) } else { r.outcome };
                let _ = r.reply.send(answer);
            }
        }
    }
}

/// The transaction broke in the middle of a batch: nothing of it is kept, and every write,
/// run or not, is answered 503.
async fn abort<DB: sqlx::Database>(
    tx: sqlx::Transaction<'static, DB>,
    ran: Vec<Ran>,
    current: Reply<WriteOutcome>,
    rest: impl Iterator<Item = (WriteOp, Reply<WriteOutcome>)>,
    cause: &StoreError,
) {
    tracing::warn!(error = %cause, "a batch of writes broke off; answering all of it 503");
    let _ = tx.rollback().await;
    let replies = ran
        .into_iter()
        .map(|r| r.reply)
        .chain(std::iter::once(current))
        .chain(rest.map(|(_, reply)| reply));
    fail_all(replies, cause);
}

fn fail_all(replies: impl Iterator<Item = Reply<WriteOutcome>>, cause: &StoreError) {
    for reply in replies {
        let _ = reply.send(Err(unavailable(cause)));
    }
}

/// The 503 each write of a batch that was not written is answered with, one per caller:
/// nothing of it was written.
pub(super) fn unavailable(cause: &StoreError) -> StoreError {
    match cause {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        other => StoreError::Unavailable(format!("a batch of writes was not committed: {other}")),
    }
}

/// What each `Store` method that writes money expects back; any other outcome would be a
/// bug in the batch's routing, answered as an error rather than a panic.
pub(super) fn mismatch() -> StoreError {
    StoreError::Other("a write came back with an outcome of another kind".into())
}

impl WriteOutcome {
    pub(super) fn sprayed(self) -> Result<i64, StoreError> {
        match self {
            WriteOutcome::Sprayed(id) => Ok(id),
            _ => Err(mismatch()),
        }
    }

    pub(super) fn claimed(self) -> Result<ClaimOutcome, StoreError> {
        match self {
            WriteOutcome::Claimed(Ok(taken)) => Ok(ClaimOutcome::Received(taken.amount)),
            WriteOutcome::Claimed(Err(refusal)) => Ok(ClaimOutcome::Refused(refusal)),
            _ => Err(mismatch()),
        }
    }

    pub(super) fn claimed_slot(self) -> Result<SlotClaim, StoreError> {
        match self {
            WriteOutcome::ClaimedSlot(outcome) => Ok(outcome),
            _ => Err(mismatch()),
        }
    }

    pub(super) fn settled(self) -> Result<SettleOutcome, StoreError> {
        match self {
            WriteOutcome::Settled(outcome) => Ok(outcome),
            _ => Err(mismatch()),
        }
    }
}
