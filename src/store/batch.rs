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
//! The batches are written by a thread of their own, which runs each on the backend's
//! connection (`BatchWriter`, SQLite's in `store/sqlite_writes.rs`) and answers every
//! caller from there: no crossing of threads per statement, none between batches.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::commit::{TakenShare, Written, confirm_commit};
use super::queue::{QUEUE, Reply, ask};
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
    /// fewer, and an error in it (the database's, or a free share that the update to take
    /// it then did not find free, which the write lock rules out) breaks off the whole
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
/// it, and ends it. Called on the writer's thread, a whole batch at a time (see
/// `store/sqlite_writes.rs` for why).
pub(super) trait BatchWriter: Send + 'static {
    /// Begins a write transaction.
    fn begin(&mut self) -> Result<(), StoreError>;

    /// Runs `op` in the transaction (inside a savepoint the batch has opened, if it needs
    /// one).
    fn run(&mut self, op: &WriteOp) -> Result<WriteOutcome, StoreError>;

    /// Runs a statement without arguments in the transaction (the savepoints).
    fn execute(&mut self, statement: &str) -> Result<(), StoreError>;

    /// Commits the transaction; when that fails, the transaction is over all the same.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Rolls the transaction back, if one is open.
    fn rollback(&mut self);
}

/// Whether `written` is in the database, read on a connection other than the writer's.
pub(super) type Landed =
    Arc<dyn Fn(Written) -> Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send>> + Send + Sync>;

/// The queue in front of a backend's writer: [`GroupCommit::write`] queues one write and
/// waits for the batch that holds it to be committed.
///
/// The writer runs on an OS thread of its own, which takes every write waiting the moment
/// it finishes a batch, and answers each caller from there. Before, each batch crossed
/// from a queue task to a task of its own to a blocking thread and back, and each crossing
/// waited its turn behind the HTTP tasks on the runtime's worker threads: under the create
/// workload the writer was idle 40% of the time between batches, against 27% on its own
/// thread (see BENCHMARKS.md for what that did to throughput and tails).
pub(super) struct GroupCommit {
    queue: mpsc::Sender<(WriteOp, Reply<WriteOutcome>)>,
}

impl GroupCommit {
    /// Starts the thread that writes the batches of `writer`, one at a time, each while it
    /// holds `turn` (the database's one write lock, shared with the backend's other
    /// writes). `landed` reads a write back after a failed commit, on the runtime this is
    /// called on. The thread ends when the `GroupCommit` is dropped.
    pub(super) fn start<W: BatchWriter>(
        writer: W,
        turn: Arc<tokio::sync::Mutex<()>>,
        landed: Landed,
    ) -> Result<GroupCommit, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Other(format!("the batch writer needs a Tokio runtime: {e}")))?;
        let (queue, waiting) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("spray-writer".into())
            .spawn(move || write_batches(writer, waiting, &turn, &landed, &runtime))
            .map_err(|e| StoreError::Other(format!("the batch writer's thread could not start: {e}")))?;
        Ok(GroupCommit { queue })
    }

    /// Queues `op` and waits for its answer, given once the batch holding it is durable.
    pub(super) async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        ask(&self.queue, op).await
    }
}

/// The writer's thread: waits for a write, takes every one waiting with it (up to
/// [`MAX_BATCH`]) and writes them as one batch, until the queue is closed.
fn write_batches<W: BatchWriter>(
    mut writer: W,
    mut waiting: mpsc::Receiver<(WriteOp, Reply<WriteOutcome>)>,
    turn: &tokio::sync::Mutex<()>,
    landed: &Landed,
    runtime: &tokio::runtime::Handle,
) {
    while let Some(first) = waiting.blocking_recv() {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH
            && let Ok(next) = waiting.try_recv()
        {
            batch.push(next);
        }
        let _turn = turn.blocking_lock();
        write_batch(&mut writer, batch, landed, runtime);
    }
}

/// A write that has run: its outcome and whether its savepoint was kept.
struct Ran {
    outcome: Result<WriteOutcome, StoreError>,
    kept: bool,
}

/// How a batch ended on the writer's thread.
enum Ended {
    /// Committed, or rolled back with nothing to keep: each write's outcome stands.
    Done(Vec<Ran>),
    /// The transaction broke (before its commit): nothing of it is kept, every write is
    /// answered 503.
    Broke(StoreError),
    /// The commit failed: whether it landed is read back by `written` (when the batch
    /// wrote something that can be found again) before anyone is answered.
    CommitFailed {
        ran: Vec<Ran>,
        failed: StoreError,
        written: Option<Written>,
    },
}

/// Writes one batch (see the module doc) and answers each of its writes. Called on the
/// writer's thread, not on the runtime: a failed commit is read back on `runtime`.
///
/// A batch that panics (a bug) breaks off like any other: answered 503, nothing of it kept
/// (the transaction it left open is rolled back), and the writer goes on with the next.
pub(super) fn write_batch<W: BatchWriter>(
    writer: &mut W,
    batch: Vec<(WriteOp, Reply<WriteOutcome>)>,
    landed: &Landed,
    runtime: &tokio::runtime::Handle,
) {
    let (ops, replies): (Vec<WriteOp>, Vec<Reply<WriteOutcome>>) = batch.into_iter().unzip();
    crate::telemetry::metrics::record_batch(ops.len());
    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(&mut *writer, &ops)))
        .unwrap_or_else(|_| {
            writer.rollback();
            Ended::Broke(StoreError::Other("the batch writer panicked".into()))
        });
    let answers: Vec<Result<WriteOutcome, StoreError>> = match ended {
        Ended::Done(ran) => ran.into_iter().map(|r| r.outcome).collect(),
        Ended::Broke(cause) => {
            tracing::warn!(error = %cause, "a batch of writes broke off; answering all of it 503");
            replies.iter().map(|_| Err(unavailable(&cause))).collect()
        }
        Ended::CommitFailed { ran, failed, written } => {
            let committed = match written {
                Some(what) => runtime.block_on(confirm_commit(failed, &what, || landed(what.clone()))),
                None => Err(failed),
            };
            match committed {
                Ok(()) => ran.into_iter().map(|r| r.outcome).collect(),
                // A refusal stands as it was decided; only what was to be kept is lost.
                Err(e) => ran
                    .into_iter()
                    .map(|r| if r.kept { Err(unavailable(&e)) } else { r.outcome })
                    .collect(),
            }
        }
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// Runs `ops` as one transaction on the writer's thread: see the module doc.
fn run_batch<W: BatchWriter>(writer: &mut W, ops: &[WriteOp]) -> Ended {
    if let Err(e) = writer.begin() {
        writer.rollback();
        return Ended::Broke(e);
    }
    let mut ran = Vec::with_capacity(ops.len());
    let mut written: Option<Written> = None;
    for op in ops {
        match run_one(writer, op) {
            Ok((outcome, keep)) => {
                let kept = match keep {
                    Keep::Yes(what) => {
                        written = written.or(what);
                        true
                    }
                    Keep::No => false,
                };
                ran.push(Ran { outcome, kept });
            }
            Err(e) => {
                writer.rollback();
                return Ended::Broke(e);
            }
        }
    }
    if !ran.iter().any(|r| r.kept) {
        // Nothing to keep: every write was refused or failed, and was rolled back.
        writer.rollback();
        return Ended::Done(ran);
    }
    match writer.commit() {
        Ok(()) => Ended::Done(ran),
        Err(failed) => Ended::CommitFailed { ran, failed, written },
    }
}

/// Runs one write of a batch: its outcome and whether it is kept, or the error that breaks
/// off the whole batch.
fn run_one<W: BatchWriter>(
    writer: &mut W,
    op: &WriteOp,
) -> Result<(Result<WriteOutcome, StoreError>, Keep), StoreError> {
    if !op.needs_savepoint() {
        // Refused without a write, or kept: any error breaks off the batch.
        return match writer.run(op) {
            Ok(done) => {
                let keep = done.keep(op);
                Ok((Ok(done), keep))
            }
            // The one refusal carried as an error: decided before anything was written.
            Err(StoreError::TokenTaken) => Ok((Err(StoreError::TokenTaken), Keep::No)),
            Err(e) => Err(e),
        };
    }
    writer.execute("SAVEPOINT w")?;
    let outcome = writer.run(op);
    let keep = match &outcome {
        Ok(done) => done.keep(op),
        Err(_) => Keep::No,
    };
    if matches!(keep, Keep::No) {
        writer.execute("ROLLBACK TO SAVEPOINT w")?;
    }
    writer.execute("RELEASE SAVEPOINT w")?;
    Ok((outcome, keep))
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
