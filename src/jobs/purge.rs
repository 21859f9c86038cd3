//! Retention: sprays leave the store some time after their lookup window, and idempotency
//! keys a day after their last use. The ledger is never purged: money history stays.

use chrono::{DateTime, TimeDelta, Utc};

use crate::store::{Store, StoreError};

/// How long an idempotency key is kept after it was last used (the contract: "at least
/// 24 hours").
pub const IDEMPOTENCY_RETENTION_HOURS: i64 = 24;

/// Deletes up to `batch` settled sprays whose lookup window closed at least `grace` before
/// `now`, with their shares; returns how many. An unsettled spray is never purged: the
/// settlement sweep (`settle_expired_once`, run just before in each pass) settles it first,
/// long before its lookup window closes. Once a spray is purged, its token is free again
/// in its room and for its sprayer, and a lookup answers 404.
pub async fn purge_expired_once(
    store: &dyn Store,
    now: DateTime<Utc>,
    grace: TimeDelta,
    batch: u32,
) -> Result<usize, StoreError> {
    let Some(closed_by) = now.checked_sub_signed(grace) else {
        return Ok(0);
    };
    let purged = store.purge_sprays(closed_by, batch).await?;
    Ok(usize::try_from(purged).unwrap_or(usize::MAX))
}

/// Deletes up to `batch` idempotency keys untouched for more than
/// [`IDEMPOTENCY_RETENTION_HOURS`] at `now`; returns how many. A key used at `t` is kept
/// until `t + 24h` inclusive.
pub async fn purge_idempotency_once(
    store: &dyn Store,
    now: DateTime<Utc>,
    batch: u32,
) -> Result<usize, StoreError> {
    let Some(touched_before) = now.checked_sub_signed(TimeDelta::hours(IDEMPOTENCY_RETENTION_HOURS)) else {
        return Ok(0);
    };
    let purged = store.purge_idempotency(touched_before, batch).await?;
    Ok(usize::try_from(purged).unwrap_or(usize::MAX))
}
