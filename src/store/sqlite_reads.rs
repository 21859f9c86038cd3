//! SQLite's lookups of a spray (`GET /api/v1/sprays/{token}`), many to a thread crossing,
//! on read-only rusqlite connections of their own.
//!
//! Through sqlx each lookup was a message to a connection's worker thread and one back
//! per row (a spray with five receipts is five rows), each waking a thread: the cost that
//! made the money writes move to rusqlite (`store/sqlite_writes.rs`). Here lookups that
//! arrive together are handed to a blocking thread as one batch, and each runs there as a
//! plain call into SQLite on a cached prepared statement: the same statement as every
//! other backend's (`portable::find_sql`), each in its own implicit read transaction, so
//! each lookup reads one snapshot of the spray and its receipts, and sees every commit
//! made before it began (WAL). One lookup that fails (a corrupt row) fails alone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::convert::{SprayRow, SprayWithReceipt, spray_with_receipts};
use super::queue::{BatchQueue, Linger};
use super::{SprayLookup, StoreError};
use crate::domain::SprayRecord;

/// Batches answered side by side, each on a connection of its own: one per core of the
/// machine this was measured on; more made batches smaller, not answers faster.
const READERS: usize = 2;
/// The most lookups one batch holds.
const MAX_BATCH: usize = 64;

/// The queue in front of the readers: [`SqliteLookups::find`] queues one lookup and waits
/// for the batch that holds it.
pub(super) struct SqliteLookups(BatchQueue<SprayLookup, Option<SprayRecord>>);

/// The read-only connections, opened by the first batches that need them, and where to
/// open more.
struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteLookups {
    /// Starts the readers of the SQLite file at `path`.
    pub(super) fn start(path: PathBuf, busy_timeout: Duration) -> SqliteLookups {
        let readers = Arc::new(Readers {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
        });
        SqliteLookups(BatchQueue::start(
            READERS,
            MAX_BATCH,
            Linger::Never,
            move |batch| {
                let readers = readers.clone();
                async move {
                    let (keys, replies): (Vec<SprayLookup>, Vec<_>) = batch.into_iter().unzip();
                    let answers = match tokio::task::spawn_blocking(move || readers.find_all(&keys)).await {
                        Ok(answers) => answers,
                        Err(e) => {
                            let message = format!("a batch of lookups failed: {e}");
                            replies
                                .iter()
                                .map(|_| Err(StoreError::Other(message.clone())))
                                .collect()
                        }
                    };
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
            },
        ))
    }

    /// The newest spray under `key` with its receipts, or `None`.
    pub(super) async fn find(&self, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
        self.0.send(key.clone()).await
    }
}

impl Readers {
    /// Each lookup's answer, in order; one error for all when no connection could be had.
    fn find_all(&self, keys: &[SprayLookup]) -> Vec<Result<Option<SprayRecord>, StoreError>> {
        let connection = match self.connection() {
            Ok(connection) => connection,
            Err(e) => {
                let message = e.to_string();
                return keys
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(message.clone())))
                    .collect();
            }
        };
        let answers = keys.iter().map(|key| find(&connection, key)).collect();
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(connection);
        }
        answers
    }

    /// An idle connection, or a new one.
    fn connection(&self) -> Result<Connection, StoreError> {
        if let Some(connection) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(connection);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&self.path, flags)?;
        connection.busy_timeout(self.busy_timeout)?;
        Ok(connection)
    }
}

/// One lookup: see `portable::find_sql`.
fn find(db: &Connection, key: &SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
    let mut statement = db.prepare_cached(super::portable::find_sql(key))?;
    let token = match key {
        SprayLookup::Room(_, token) | SprayLookup::Owner(_, token) => token.as_str(),
    };
    let rows = match key {
        SprayLookup::Room(room, _) => statement.query_map((room.as_str(), token), spray_with_receipt)?,
        SprayLookup::Owner(owner, _) => statement.query_map((owner.get(), token), spray_with_receipt)?,
    };
    let rows = rows.collect::<Result<Vec<_>, _>>()?;
    spray_with_receipts(rows)
}

/// A row of the lookup, its columns in `SPRAY_COLUMNS` order, then the receipt's.
fn spray_with_receipt(row: &rusqlite::Row<'_>) -> rusqlite::Result<SprayWithReceipt> {
    Ok(SprayWithReceipt {
        spray: SprayRow {
            id: row.get(0)?,
            room_id: row.get(1)?,
            token: row.get(2)?,
            owner_id: row.get(3)?,
            mode: row.get(4)?,
            total_amount: row.get(5)?,
            recipient_count: row.get(6)?,
            created_at: row.get(7)?,
            receive_until: row.get(8)?,
            lookup_until: row.get(9)?,
            settled_at: row.get(10)?,
            refunded_amount: row.get(11)?,
        },
        slot: row.get(12)?,
        receiver_id: row.get(13)?,
        amount: row.get(14)?,
        received_at: row.get(15)?,
    })
}
