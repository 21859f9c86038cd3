//! Settlement: when a spray's receive window closes with shares left, one REFUND of the
//! remainder goes back to the sprayer. Sprays received in full are marked settled too
//! (without a refund), so that the sweep never visits them again.

use chrono::{DateTime, Utc};

use crate::store::{SettleOutcome, Store, StoreError};

/// Settles up to `batch` sprays whose receive window closed by `now`, the longest closed
/// first; returns how many this call settled. Safe to run on every instance at once: each
/// spray is settled by a conditional update that only one caller wins (the others see
/// `AlreadySettled` and count nothing), and a claim that races it either commits first,
/// and is not refunded, or sees the spray closed (see `Store::settle_spray`).
pub async fn settle_expired_once(
    store: &dyn Store,
    now: DateTime<Utc>,
    batch: u32,
) -> Result<usize, StoreError> {
    let mut settled = 0;
    for spray_id in store.unsettled_sprays(now, batch).await? {
        match store.settle_spray(spray_id, now).await? {
            SettleOutcome::Refunded(amount) => {
                tracing::debug!(spray_id, %amount, "refunded the unreceived rest");
                crate::telemetry::record_refund(amount);
                settled += 1;
            }
            SettleOutcome::Completed => settled += 1,
            SettleOutcome::AlreadySettled | SettleOutcome::StillOpen | SettleOutcome::Gone => {}
        }
    }
    Ok(settled)
}
