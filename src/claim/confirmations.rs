//! The gate's confirmations, gathered. Every winner's hold is confirmed once SQL has
//! recorded its share (`gated.rs`), and a hot spray's winners come by the dozen, one SQL
//! batch at a time: the confirmations waiting at once go to Redis as one `CONFIRM` call
//! per spray, where each used to be a call of its own (a script call costs Redis, and
//! this process, about the same whatever it holds).
//!
//! Each winner still waits for its confirmation before it is answered, as before, so
//! that when the last winner of a spray is answered the gate already knows no share is
//! held (taken for good, see `exhausted.rs`). A confirmation that fails or is lost (Redis
//! down, the process killed) is what it always was: the hold is taken over after the
//! claim lease, and SQL refuses the taker.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::domain::UserId;
use crate::gate::{CONFIRM_AT_ONCE, GateKeys, RedisGate};

/// Confirmations waiting for the task; past this, winners wait to queue.
const QUEUE: usize = 4096;

/// One hold to confirm, and whom to tell once it is.
struct Pending {
    keys: GateKeys,
    user: UserId,
    slot: i64,
    done: oneshot::Sender<()>,
}

/// The queue in front of the task that sends the confirmations.
pub(super) struct Confirmations {
    queue: mpsc::Sender<Pending>,
}

impl Confirmations {
    /// Starts the task; it ends when the `Confirmations` is dropped.
    pub(super) fn start(gate: Arc<RedisGate>) -> Confirmations {
        let (queue, mut waiting) = mpsc::channel::<Pending>(QUEUE);
        tokio::spawn(async move {
            let mut gathered = Vec::with_capacity(CONFIRM_AT_ONCE);
            while waiting.recv_many(&mut gathered, CONFIRM_AT_ONCE).await > 0 {
                confirm_gathered(&gate, std::mem::take(&mut gathered)).await;
            }
        });
        Confirmations { queue }
    }

    /// Confirms the user's hold of `slot` with the others waiting, and returns once Redis
    /// has answered (or failed: best effort, see the module doc).
    pub(super) async fn confirm(&self, keys: &GateKeys, user: UserId, slot: i64) {
        let (done, confirmed) = oneshot::channel();
        let pending = Pending {
            keys: keys.clone(),
            user,
            slot,
            done,
        };
        if self.queue.send(pending).await.is_ok() {
            let _ = confirmed.await;
        }
    }
}

/// One `CONFIRM` call per spray, all at once, then everyone is told.
async fn confirm_gathered(gate: &RedisGate, gathered: Vec<Pending>) {
    let mut by_spray: HashMap<GateKeys, Vec<(UserId, i64)>> = HashMap::new();
    let mut waiting = Vec::with_capacity(gathered.len());
    for pending in gathered {
        by_spray
            .entry(pending.keys)
            .or_default()
            .push((pending.user, pending.slot));
        waiting.push(pending.done);
    }
    futures_util::future::join_all(by_spray.iter().map(|(keys, holds)| gate.confirm(keys, holds))).await;
    for done in waiting {
        let _ = done.send(());
    }
}
