//! SQLite's money writes (sprays, claims, settlements), run by the group commit
//! (`store/batch.rs`) on a rusqlite connection of their own, a whole batch at a time.
//!
//! Why not through sqlx like everything else: sqlx's SQLite driver runs each connection
//! on a worker thread and hands it every statement over a channel, and every answer back.
//! A claim is four statements, so eight thread wake-ups; profiled under the winners
//! workload (`perf`), the worker thread spent more time in futex calls and task switches
//! than in SQLite, and the runtime's threads a quarter of theirs waking it. Here a batch of
//! up to `MAX_BATCH` writes crosses threads once, and each statement is a plain call into
//! SQLite on a cached prepared statement (see BENCHMARKS.md for the figures).
//!
//! The connection is the store's only writer of money; the few other writes (idempotency
//! rows, purges, migrations) stay on sqlx's writer connection, and the two take turns
//! (`SqliteStore::turn`), so they never wait on each other's file lock. Durability is the
//! same as sqlx's writer: WAL, `synchronous=FULL` (a commit is on disk before anyone is
//! answered), foreign keys on.
//!
//! The statements are those of `store/portable.rs` for SQLite, with two fewer round trips
//! per claim: the spray, the caller's share and whether the spray is settled are read in
//! one statement, and the share taken is read back by `RETURNING`.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::batch::{BatchWriter, WriteOp, WriteOutcome};
use super::commit::TakenShare;
use super::convert::{amount_from, millis, share_rows, stored, sum_amounts, time_from, user_from};
use super::error::{Unique, sqlite_unique_violation};
use super::idempotency::{RECORD_EFFECT_SQL, lease_lost};
use super::portable::{CREDIT_SQL, DEBIT_SQL, REFUND_SQL, SETTLE_SQL};
use super::{Claim, Effect, NewSpray, PendingKey, SettleOutcome, SlotClaim, StoreError};
use crate::domain::{Amount, ReceiveFacts, ReceiveRefusal};

/// Distinct statements this writer prepares; all stay compiled.
const STATEMENTS: usize = 32;

/// The money writer: the SQLite file, and its connection once opened. The connection is
/// opened by the first batch (a store opened read-only never writes, and never opens it).
pub(super) struct SqliteWrites {
    path: PathBuf,
    busy_timeout: Duration,
    connection: Option<Connection>,
}

impl SqliteWrites {
    pub(super) fn new(path: PathBuf, busy_timeout: Duration) -> SqliteWrites {
        SqliteWrites {
            path,
            busy_timeout,
            connection: None,
        }
    }

    fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.connection.is_none() {
            let connection = Connection::open(&self.path)?;
            // WAL is the file's (set by the store when it opened it); the rest is per
            // connection. FULL: a commit is on disk before it is acknowledged.
            connection.pragma_update(None, "synchronous", "FULL")?;
            connection.pragma_update(None, "foreign_keys", "ON")?;
            connection.busy_timeout(self.busy_timeout)?;
            connection.set_prepared_statement_cache_capacity(STATEMENTS);
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| StoreError::Other("the SQLite writer is not open".into()))
    }
}

impl BatchWriter for SqliteWrites {
    /// IMMEDIATE takes the write lock up front, so the transaction never has to upgrade a
    /// read lock (which SQLite may refuse with SQLITE_BUSY).
    fn begin(&mut self) -> Result<(), StoreError> {
        self.execute("BEGIN IMMEDIATE")
    }

    fn run(&mut self, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        // The single writer orders every write, settlements included, and each sees all
        // the writes before it (in this batch or committed).
        let db = self.connection()?;
        Ok(match op {
            WriteOp::Spray { spray, idempotency } => {
                WriteOutcome::Sprayed(spray_in(db, spray, idempotency.as_ref())?)
            }
            WriteOp::ClaimShare { claim, idempotency } => {
                WriteOutcome::Claimed(claim_share_in(db, claim, idempotency.as_ref())?)
            }
            WriteOp::ClaimSlot {
                claim,
                spray_id,
                slot,
                idempotency,
            } => WriteOutcome::ClaimedSlot(claim_given_slot_in(
                db,
                claim,
                *spray_id,
                *slot,
                idempotency.as_ref(),
            )?),
            WriteOp::Settle { spray_id, now } => WriteOutcome::Settled(settle_in(db, *spray_id, *now)?),
        })
    }

    fn execute(&mut self, statement: &str) -> Result<(), StoreError> {
        self.connection()?.prepare_cached(statement)?.execute([])?;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let committed = self.execute("COMMIT");
        if committed.is_err() {
            // A refused COMMIT (SQLITE_BUSY, a deferred constraint) leaves the transaction
            // open: end it, so that the connection starts the next batch clean.
            self.rollback();
        }
        committed
    }

    fn rollback(&mut self) {
        if let Some(db) = self.connection.as_mut()
            && !db.is_autocommit()
            && let Err(e) = db.execute_batch("ROLLBACK")
        {
            tracing::warn!(error = %e, "rolling back a batch of writes failed");
        }
    }
}

/// A new spray: its row, its shares, the sprayer's DEBIT and, with `idempotency`, the kept
/// effect. Its id.
fn spray_in(db: &Connection, spray: &NewSpray, idempotency: Option<&PendingKey>) -> Result<i64, StoreError> {
    let spray_id = insert_spray_row(db, spray)?;
    let mut share = db.prepare_cached("INSERT INTO shares (spray_id, slot, amount) VALUES (?, ?, ?)")?;
    for (slot, amount) in share_rows(&spray.shares)? {
        share.execute(params![spray_id, slot, amount])?;
    }
    db.prepare_cached(DEBIT_SQL)?.execute(params![
        spray_id,
        spray.owner.get(),
        stored(spray.total_amount)?,
        millis(spray.created_at)
    ])?;
    record_effect(
        db,
        idempotency,
        &Effect::Sprayed(spray.created()),
        spray.created_at,
    )?;
    Ok(spray_id)
}

/// A new spray's row under a fresh id. Its id.
///
/// The row is inserted first, and only if its token is taken are the sprays past their
/// lookup window made to give it up (see the migration) before a second try: a spray
/// nearly always draws a free token, so this saves a statement. (A constraint failure
/// rolls back the failed statement only, not the transaction.)
///
/// A spray still inside its lookup window that holds the token refuses the new one before
/// anything is written; otherwise only expired sprays hold it, and once they give it up
/// the second insert cannot be refused (the single writer changes nothing in between). So
/// a new spray is refused without a write, and needs no savepoint in a batch (see
/// `WriteOp::needs_savepoint`).
fn insert_spray_row(db: &Connection, spray: &NewSpray) -> Result<i64, StoreError> {
    match insert_spray_row_once(db, spray) {
        Err(StoreError::TokenTaken) => {
            let key = params![
                spray.token.as_str(),
                millis(spray.created_at),
                spray.room.as_str(),
                spray.owner.get()
            ];
            let held_by_live: i64 = db
                .prepare_cached(
                    "SELECT COUNT(*) FROM sprays
                     WHERE token = ? AND token_live = 1 AND lookup_until > ? AND (room_id = ? OR owner_id = ?)",
                )?
                .query_row(key, |row| row.get(0))?;
            if held_by_live > 0 {
                return Err(StoreError::TokenTaken);
            }
            db.prepare_cached(
                "UPDATE sprays SET token_live = NULL
                 WHERE token = ? AND token_live = 1 AND lookup_until <= ? AND (room_id = ? OR owner_id = ?)",
            )?
            .execute(key)?;
            insert_spray_row_once(db, spray)
        }
        other => other,
    }
}

fn insert_spray_row_once(db: &Connection, spray: &NewSpray) -> Result<i64, StoreError> {
    let recipient_count = i64::try_from(spray.shares.len()).map_err(|e| StoreError::Other(e.to_string()))?;
    // The id is never one a purged spray had: the ledger keeps every spray id ever used
    // (each spray's DEBIT), and a reused id would tie that old history to the new spray.
    // SQLite itself would hand out MAX(id) + 1 of the rows left, and the table has no
    // AUTOINCREMENT. The single writer makes reading the maximum and inserting atomic.
    //
    // The new id is read back with `last_insert_rowid`, not `RETURNING`: inside a
    // transaction SQLite gives a statement with `RETURNING` a statement journal, a copy of
    // every page the statement touches made before it writes. Without it the writer
    // spends about a fifth less CPU per new spray (BENCHMARKS.md).
    let inserted = db
        .prepare_cached(
            "INSERT INTO sprays (id, room_id, token, owner_id, mode, total_amount, recipient_count,
                                 created_at, receive_until, lookup_until)
             VALUES (max(COALESCE((SELECT MAX(id) FROM sprays), 0),
                         COALESCE((SELECT MAX(spray_id) FROM ledger), 0)) + 1,
                     ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            spray.room.as_str(),
            spray.token.as_str(),
            spray.owner.get(),
            spray.mode.as_str(),
            stored(spray.total_amount)?,
            recipient_count,
            millis(spray.created_at),
            millis(spray.receive_until),
            millis(spray.lookup_until),
        ]);
    match inserted {
        // `sprays.id` is the table's rowid (INTEGER PRIMARY KEY), and `last_insert_rowid`
        // is that of this connection's last successful INSERT: this one.
        Ok(_) => Ok(db.last_insert_rowid()),
        Err(e) if sqlite_unique_violation(&e).is_some_and(Unique::is_token_taken) => {
            Err(StoreError::TokenTaken)
        }
        Err(e) => Err(e.into()),
    }
}

/// The SQL-only claim: rules 1 to 4 in the contract's order, settlement (a settled spray
/// is closed, even to a claim whose `now` is still inside the window: it started before
/// the deadline and queued behind the settlement), rule 5 (the first free share), the
/// CREDIT and, with `idempotency`, the kept effect. The share taken, or the rule that
/// refused it.
fn claim_share_in(
    db: &Connection,
    claim: &Claim,
    idempotency: Option<&PendingKey>,
) -> Result<Result<TakenShare, ReceiveRefusal>, StoreError> {
    // Rule 1: the spray must exist in the caller's room. The newest spray with this token
    // in the room is the live one, if any is live. With it, in the same statement, the
    // share the caller already holds (rule 3) and whether it is settled.
    let spray = db
        .prepare_cached(
            "SELECT s.id, s.owner_id, s.receive_until, s.recipient_count, s.settled_at IS NOT NULL,
                    (SELECT amount FROM shares WHERE spray_id = s.id AND receiver_id = ?)
             FROM sprays s WHERE s.room_id = ? AND s.token = ? ORDER BY s.id DESC LIMIT 1",
        )?
        .query_row(
            params![claim.user.get(), claim.room.as_str(), claim.token.as_str()],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, bool>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((spray_id, owner_id, receive_until, recipient_count, settled, already_received)) = spray else {
        return Ok(Err(ReceiveRefusal::NotFound));
    };
    // Rules 2 to 4, decided by the domain.
    let facts = ReceiveFacts {
        owner: user_from(owner_id)?,
        receive_until: time_from(receive_until)?,
        already_received: already_received.map(amount_from).transpose()?,
    };
    if let Err(refusal) = crate::domain::rules::check_receive(&facts, claim.user, claim.now) {
        return Ok(Err(refusal));
    }
    if settled {
        return Ok(Err(ReceiveRefusal::Expired));
    }
    // Rule 5: the first free share (the index `shares_one_per_receiver` lists a spray's
    // free shares first, by slot), then taken by its key. Nobody else can take it in
    // between: the batch's `BEGIN IMMEDIATE` holds the file's write lock, against other
    // processes too (and were that ever broken, `receiver_id IS NULL` would change no row
    // and the claim would fail, 503, rather than pay twice). Two statements rather than
    // one `UPDATE ... WHERE slot = (SELECT MIN(slot) ...) RETURNING`, because an update
    // not planned as one row by its key, that may fail on a unique index, is one SQLite
    // may give a statement journal (a copy of each page it touches); that was why it was
    // tried, the journal was not traced. Measured: the server's CPU per SQLite winner 8%
    // lower (BENCHMARKS.md, 2026-12-07).
    let free = db
        .prepare_cached(
            "SELECT slot, amount FROM shares WHERE spray_id = ? AND receiver_id IS NULL ORDER BY slot LIMIT 1",
        )?
        .query_row(params![spray_id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((slot, units)) = free else {
        let shares = u32::try_from(recipient_count).unwrap_or(u32::MAX);
        return Ok(Err(ReceiveRefusal::Exhausted { shares }));
    };
    let taken = db
        .prepare_cached(
            "UPDATE shares SET receiver_id = ?, received_at = ?
             WHERE spray_id = ? AND slot = ? AND receiver_id IS NULL",
        )?
        .execute(params![claim.user.get(), millis(claim.now), spray_id, slot]);
    match taken {
        Ok(1) => {}
        Ok(changed) => {
            return Err(StoreError::Other(format!(
                "the free share {slot} of spray {spray_id} changed {changed} rows when taken"
            )));
        }
        Err(e) if sqlite_unique_violation(&e) == Some(Unique::SharesOnePerReceiver) => {
            return Ok(Err(ReceiveRefusal::AlreadyReceived));
        }
        Err(e) => return Err(e.into()),
    }
    let amount = amount_from(units)?;
    credit(db, spray_id, claim, amount)?;
    record_effect(db, idempotency, &Effect::Received(amount), claim.now)?;
    Ok(Ok(TakenShare {
        spray_id,
        slot,
        amount,
    }))
}

/// The gate's claim of one slot: settlement first, then the point update and its CREDIT,
/// then the kept effect.
fn claim_given_slot_in(
    db: &Connection,
    claim: &Claim,
    spray_id: i64,
    slot: i64,
    idempotency: Option<&PendingKey>,
) -> Result<SlotClaim, StoreError> {
    // A spray that is gone (purged) counts as settled: it was settled before it could be
    // purged.
    let settled_at: Option<Option<i64>> = db
        .prepare_cached("SELECT settled_at FROM sprays WHERE id = ?")?
        .query_row([spray_id], |row| row.get(0))
        .optional()?;
    if !matches!(settled_at, Some(None)) {
        return Ok(SlotClaim::Closed);
    }
    let now = millis(claim.now);
    let updated = db
        .prepare_cached(
            "UPDATE shares SET receiver_id = ?, received_at = ?
             WHERE spray_id = ? AND slot = ? AND receiver_id IS NULL
               AND EXISTS (SELECT 1 FROM sprays WHERE id = ? AND receive_until > ?)
             RETURNING amount",
        )?
        .query_row(
            params![claim.user.get(), now, spray_id, slot, spray_id, now],
            |row| row.get::<_, i64>(0),
        )
        .optional();
    let amount = match updated {
        Ok(Some(units)) => amount_from(units)?,
        Ok(None) => {
            let open: i64 = db
                .prepare_cached("SELECT COUNT(*) FROM sprays WHERE id = ? AND receive_until > ?")?
                .query_row(params![spray_id, now], |row| row.get(0))?;
            return Ok(if open == 0 {
                SlotClaim::Closed
            } else {
                SlotClaim::Taken
            });
        }
        Err(e) if sqlite_unique_violation(&e) == Some(Unique::SharesOnePerReceiver) => {
            return Ok(SlotClaim::AlreadyReceived);
        }
        Err(e) => return Err(e.into()),
    };
    credit(db, spray_id, claim, amount)?;
    record_effect(db, idempotency, &Effect::Received(amount), claim.now)?;
    Ok(SlotClaim::Received(amount))
}

/// The CREDIT of a share `claim` took.
fn credit(db: &Connection, spray_id: i64, claim: &Claim, amount: Amount) -> Result<(), StoreError> {
    db.prepare_cached(CREDIT_SQL)?.execute(params![
        spray_id,
        claim.user.get(),
        stored(amount)?,
        millis(claim.now)
    ])?;
    Ok(())
}

/// Records `effect` on the pending idempotency row, if any: the money and what a retry is
/// answered from commit together. A lost lease (the row was taken over) fails the write.
fn record_effect(
    db: &Connection,
    pending: Option<&PendingKey>,
    effect: &Effect,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    let Some(pending) = pending else {
        return Ok(());
    };
    let recorded = db.prepare_cached(RECORD_EFFECT_SQL)?.execute(params![
        effect.to_column()?,
        millis(now),
        pending.user.get(),
        pending.endpoint.as_str(),
        pending.key.as_str(),
        pending.lease
    ])?;
    if recorded == 1 { Ok(()) } else { Err(lease_lost()) }
}

/// Settles the spray at `now`: marks it settled and, if shares are left, writes one
/// REFUND of their sum to the sprayer. The single writer keeps every claim out meanwhile;
/// the update is conditional all the same, so only one settlement can ever match.
fn settle_in(
    db: &Connection,
    spray_id: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<SettleOutcome, StoreError> {
    let spray = db
        .prepare_cached("SELECT owner_id, receive_until, settled_at FROM sprays WHERE id = ?")?
        .query_row([spray_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<i64>>(2)?,
            ))
        })
        .optional()?;
    let Some((owner_id, receive_until, settled_at)) = spray else {
        return Ok(SettleOutcome::Gone);
    };
    if settled_at.is_some() {
        return Ok(SettleOutcome::AlreadySettled);
    }
    if crate::domain::rules::window_open(now, time_from(receive_until)?) {
        return Ok(SettleOutcome::StillOpen);
    }
    // What nobody received, share by share, summed with overflow checked.
    let free = db
        .prepare_cached("SELECT amount FROM shares WHERE spray_id = ? AND receiver_id IS NULL")?
        .query_map([spray_id], |row| row.get::<_, i64>(0))?
        .collect::<Result<Vec<i64>, _>>()?;
    let refund = sum_amounts(spray_id, free)?;
    let marked = db
        .prepare_cached(SETTLE_SQL)?
        .execute(params![millis(now), stored(refund)?, spray_id])?;
    if marked != 1 {
        return Ok(SettleOutcome::AlreadySettled);
    }
    if refund == Amount::ZERO {
        return Ok(SettleOutcome::Completed);
    }
    db.prepare_cached(REFUND_SQL)?
        .execute(params![spray_id, owner_id, stored(refund)?, millis(now)])?;
    Ok(SettleOutcome::Refunded(refund))
}
